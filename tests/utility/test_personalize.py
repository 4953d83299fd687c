"""Personalised models and the non-private references: chosen on training data only, and they do what they claim."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from clients.personalize import fit_reference, personalise, validation_split


def _linear_data(n, rng, w, shift=0.0):
    X = rng.random((n, len(w))).astype(np.float32)
    z = (X - 0.5) @ w + shift
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.float32)
    return X, y


def test_validation_split_is_a_partition():
    fit, val = validation_split(101, seed=3)
    assert len(val) == 25 and sorted(np.concatenate([fit, val]).tolist()) == list(range(101))


def test_reference_picks_boosting_on_interactions_and_keeps_logreg_on_linear_data():
    rng = np.random.default_rng(0)
    X = rng.random((3000, 4)).astype(np.float32)
    y = ((X[:, 0] > 0.5) ^ (X[:, 1] > 0.5)).astype(np.float32)  # XOR: no linear model separates it
    assert fit_reference(X, y, seed=1).kind == "hist_gbm"
    X2, y2 = _linear_data(3000, rng, np.array([4.0, -3.0, 2.0, 0.0]))
    lin = fit_reference(X2, y2, seed=1)
    assert lin.kind.startswith("logreg")  # on linear data the boosted trees do not win validation
    assert roc_auc_score(y2, lin.logit(X2)) > 0.75


def test_reference_with_one_class_is_constant_not_an_error():
    X = np.random.default_rng(0).random((50, 3)).astype(np.float32)
    m = fit_reference(X, np.zeros(50, dtype=np.float32), seed=0)
    assert np.all(m.logit(X) < -10)


def _global_model(w):
    m = nn.Sequential(nn.Linear(len(w), 1))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor(w, dtype=torch.float32)[None])
        m[0].bias.copy_(torch.tensor([-float(np.sum(w)) / 2]))
    return m


def test_personalisation_recovers_a_partner_whose_behaviour_differs_from_the_global_model():
    rng = np.random.default_rng(1)
    w_partner = np.array([0.0, 0.0, 5.0, -5.0])  # this partner's churn depends on other features
    Xtr, ytr = _linear_data(2000, rng, w_partner)
    Xte, yte = _linear_data(2000, rng, w_partner)
    g = _global_model(np.array([5.0, -5.0, 0.0, 0.0]))
    pm = personalise(g, torch.from_numpy(Xtr), torch.from_numpy(ytr)[:, None], heads=("churn",), seed=0)
    assert pm.choices["churn"].kind in ("local", "blend", "fine_tune")
    auc_p = roc_auc_score(yte, pm.predict_proba(torch.from_numpy(Xte))[:, 0])
    auc_g = roc_auc_score(yte, torch.sigmoid(g(torch.from_numpy(Xte)))[:, 0].detach().numpy())
    assert auc_p > auc_g + 0.2


def test_personalisation_keeps_a_good_global_model_for_a_tiny_partner():
    rng = np.random.default_rng(2)
    w = np.array([5.0, -5.0, 3.0, 0.0])
    Xtr, ytr = _linear_data(40, rng, w)  # too few validation positives to decide anything
    pm = personalise(_global_model(w), torch.from_numpy(Xtr), torch.from_numpy(ytr)[:, None], heads=("churn",), seed=0)
    assert pm.choices["churn"].kind == "global"
    X = torch.rand(10, 4)
    assert np.allclose(pm.predict_proba(X)[:, 0], torch.sigmoid(_global_model(w)(X))[:, 0].detach().numpy(), atol=1e-6)


def test_personalise_sees_training_data_only():
    import inspect

    params = set(inspect.signature(personalise).parameters)
    assert params == {"global_model", "X", "Y", "heads", "seed", "local", "min_gain_se"}  # no test split can enter a choice


def test_blend_weight_zero_is_exactly_the_given_local_only_model():
    """The personalised model's candidate set contains the partner's own local-only model, unchanged."""
    from clients.personalize import HeadChoice, PersonalisedModel

    rng = np.random.default_rng(4)
    Xtr, ytr = _linear_data(600, rng, np.array([0.0, 0.0, 5.0, -5.0]))
    loc = fit_reference(Xtr, ytr, seed=0)
    pm = PersonalisedModel(("churn",), _global_model(np.array([5.0, -5.0, 0.0, 0.0])),
                           {"churn": HeadChoice("blend", alpha=0.0)}, {"churn": loc})
    X = torch.from_numpy(Xtr[:50])
    assert np.allclose(pm.predict_proba(X)[:, 0], loc.estimator.predict_proba(Xtr[:50])[:, 1], atol=1e-6)


def test_personalisation_uses_the_given_local_model_and_never_scores_below_it_on_validation():
    rng = np.random.default_rng(5)
    w = np.array([4.0, -4.0, 2.0, 0.0])
    Xtr, ytr = _linear_data(1500, rng, w)
    loc = fit_reference(Xtr, ytr, seed=0)
    pm = personalise(_global_model(np.array([0.0, 0.0, 0.0, 5.0])), torch.from_numpy(Xtr), torch.from_numpy(ytr)[:, None],
                     heads=("churn",), seed=0, local={"churn": loc})  # a useless global model
    c = pm.choices["churn"]
    assert c.validation_auc >= c.local_validation_auc
    if c.kind in ("local", "blend"):
        assert pm.local["churn"] is loc


def test_a_small_partner_gains_from_a_good_global_model():
    """30 features, 4 informative: 300 customers overfit alone; the (slightly wrong) global model knows the signal."""
    w = np.zeros(30)
    w[:4] = [3.0, -3.0, 3.0, -3.0]
    rng = np.random.default_rng(3)
    Xtr, ytr = _linear_data(300, rng, w)
    Xte, yte = _linear_data(4000, rng, w)
    wg = w.copy()
    wg[4:8] = 1.0  # a DP global model: right direction, some error
    g = _global_model(wg)
    loc = fit_reference(Xtr, ytr, seed=0)
    pm = personalise(g, torch.from_numpy(Xtr), torch.from_numpy(ytr)[:, None], heads=("churn",), seed=0,
                     local={"churn": loc})
    assert pm.choices["churn"].kind != "local"
    auc_p = roc_auc_score(yte, pm.predict_proba(torch.from_numpy(Xte))[:, 0])
    assert auc_p > roc_auc_score(yte, loc.logit(Xte)) + 0.02


def test_personalised_probabilities_match_this_partners_own_rate():
    """The global model was trained where half the customers churn; this partner's base rate is far lower. The
    node-side Platt scaling (on out-of-fold logits) brings the probabilities to its own rate; ranking unchanged."""
    from clients.personalize import binned_ece

    rng = np.random.default_rng(6)
    w = np.array([4.0, -4.0, 2.0, 0.0])
    Xtr, ytr = _linear_data(3000, rng, w, shift=-2.5)
    Xte, yte = _linear_data(20000, rng, w, shift=-2.5)
    g = _global_model(w)  # right ranking, intercept of a 50% base rate
    pm = personalise(g, torch.from_numpy(Xtr), torch.from_numpy(ytr)[:, None], heads=("churn",), seed=0)
    c = pm.choices["churn"]
    p = pm.predict_proba(torch.from_numpy(Xte))[:, 0]
    raw = torch.sigmoid(g(torch.from_numpy(Xte)))[:, 0].detach().numpy()
    assert binned_ece(raw, yte) > 0.15  # the global model's probabilities are far off here
    assert (c.platt_a, c.platt_b) != (1.0, 0.0) and c.ece < 0.03 and c.ece <= c.ece_uncalibrated
    assert binned_ece(p, yte) < 0.03  # on customers it never saw
    assert abs(p.mean() - yte.mean()) < 0.02


def test_binned_ece_is_the_metrics_definition():
    from clients.personalize import binned_ece
    from federation import metrics as M

    rng = np.random.default_rng(7)
    p = rng.random(5000)
    y = (rng.random(5000) < p ** 2).astype(float)
    assert abs(binned_ece(p, y) - M.ece(M.histogram_from_scores(y, p))) < 1e-9
    assert abs(binned_ece(p, p > 2) - np.mean(p)) < 1e-12  # no positives: ECE is the mean prediction
