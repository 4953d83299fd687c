import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from clients.training import DPSGDParams, sampling_plan, train_dp_opacus, train_nonprivate
from federation.config import ModelConfig
from federation.errors import ConfigError, PrivacyError
from federation.models import build_model, federations, predict_proba


def test_models_have_one_output_per_head_and_no_batchnorm():
    for kind in ("logreg", "mlp"):
        m = build_model(ModelConfig(kind=kind), n_features=10, n_outputs=2)
        assert m(torch.zeros(3, 10)).shape == (3, 2)
        assert not any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules())


def test_federation_layouts():
    assert federations("both", "two_head") == [("churn", "propensity")]
    assert federations("both", "separate") == [("churn",), ("propensity",)]
    assert federations("churn", "two_head") == [("churn",)]


def test_bad_model_shape():
    with pytest.raises(ConfigError):
        build_model(ModelConfig(), n_features=0, n_outputs=1)


def _data(n=2000, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=g)
    logit = 4 * (X[:, 0] - X[:, 1])
    Y = (torch.rand(n, generator=g) < torch.sigmoid(logit)).float()[:, None]
    return X, Y


def test_dp_sgd_learns_and_noise_matters():
    X, Y = _data()
    q, steps = sampling_plan(n_train=len(X), batch_size=100, local_epochs=3)
    aucs = {}
    for sigma in (0.8, 200.0):
        torch.manual_seed(0)
        m = build_model(ModelConfig(kind="logreg"), n_features=X.shape[1], n_outputs=1)
        train_dp_opacus(m, X, Y, params=DPSGDParams(noise_multiplier=sigma, max_grad_norm=1.0, sample_rate=q, steps=steps),
                        lr=1.0, generator=torch.Generator().manual_seed(1))
        aucs[sigma] = roc_auc_score(Y[:, 0].numpy(), predict_proba(m, X)[:, 0].numpy())
    assert aucs[0.8] > 0.8
    assert aucs[200.0] < aucs[0.8] - 0.1


def test_dp_params_validated():
    with pytest.raises(PrivacyError, match="sample_rate"):
        DPSGDParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.5, steps=1)
    with pytest.raises(PrivacyError, match="max_grad_norm"):
        DPSGDParams(noise_multiplier=1.0, max_grad_norm=0.0, sample_rate=0.5, steps=1)


def test_empty_poisson_batches_still_step():
    X, Y = _data(n=50)
    m = build_model(ModelConfig(kind="logreg"), n_features=X.shape[1], n_outputs=1)
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.warns(UserWarning, match="PRNG"):
        train_dp_opacus(m, X, Y, params=DPSGDParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1e-6, steps=3),
                        lr=0.1, generator=torch.Generator().manual_seed(0))
    # noise-only steps move the weights
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_nonprivate_baseline_learns():
    X, Y = _data()
    m = build_model(ModelConfig(kind="mlp", hidden=[16]), n_features=X.shape[1], n_outputs=1)
    train_nonprivate(m, X, Y, epochs=5, lr=0.01, generator=torch.Generator().manual_seed(0))
    assert roc_auc_score(Y[:, 0].numpy(), predict_proba(m, X)[:, 0].numpy()) > 0.8


def test_several_rows_per_customer_is_refused_not_silently_accounted_per_row():
    import dataclasses

    from clients.node import load_partner
    from federation.config import from_dict
    from simulations.partners import load_partner as synthetic

    cfg = from_dict({"partners": 2, "data": {"min_customers": 300, "max_customers": 400}, "seed": 5})

    def loader(c, node):
        return dataclasses.replace(synthetic(c, node), max_rows_per_customer=3)

    with pytest.raises(PrivacyError, match="rows per customer"):
        load_partner(cfg, node_config={"partition-id": 0, "num-partitions": 2}, loader=loader, heads_key="churn", split_key=b"k" * 32)
