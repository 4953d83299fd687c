"""The fast DP-SGD path computes exactly Opacus's mechanism (clipping, noise, scaling, Poisson sampling)."""
from __future__ import annotations

import math

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from clients.fastdp import (
    FastDPSGD,
    FastPathError,
    expected_batch_size,
    poisson_batches,
    supports_fast_path,
    train_steps,
    train_steps_nonprivate,
)
from federation.errors import FedpropError, PrivacyError

D = 7


class TwoHeads(nn.Module):
    """Not a Sequential: shared trunk, two separate heads concatenated (exercises the hook path)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(D, 12), nn.Tanh())
        self.churn = nn.Linear(12, 1)
        self.propensity = nn.Linear(12, 1, bias=False)

    def forward(self, x):
        h = self.trunk(x)
        return torch.cat([self.churn(h), self.propensity(h)], dim=1)


def _models():
    return {
        "logreg": (lambda: nn.Linear(D, 1), 1),
        "logreg_nobias": (lambda: nn.Linear(D, 1, bias=False), 1),
        "mlp_relu": (lambda: nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                                           nn.Linear(8, 1)), 1),
        "mlp_tanh_sigmoid_nested": (lambda: nn.Sequential(
            nn.Sequential(nn.Linear(D, 9, bias=False), nn.Tanh()), nn.Identity(),
            nn.Linear(9, 5), nn.Sigmoid(), nn.Linear(5, 1)), 1),
        "two_output_head": (lambda: nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, 8),
                                                  nn.ReLU(), nn.Linear(8, 2)), 2),
        "two_heads_hooks": (TwoHeads, 2),
    }


def _data(b, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, D, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, b, dtype=torch.float64)[:, None]
    y = (torch.rand(b, k, generator=g, dtype=torch.float64) < 0.4).double()
    return x, y


def _opacus_clipped_sum(model, loss_fn, x, y, C, reduction):
    """Opacus's own per-sample clipping: GradSampleModule + DPOptimizer.clip_and_accumulate."""
    gsm = GradSampleModule(model, loss_reduction=reduction)
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=C,
                      expected_batch_size=max(1, x.shape[0]), loss_reduction=reduction)
    opt.zero_grad()
    loss_fn(gsm(x), y).backward()
    norms = torch.stack([p.grad_sample.reshape(len(x), -1).norm(2, dim=-1) for p in opt.params], 1).norm(2, dim=1)
    opt.clip_and_accumulate()
    sums = [p.summed_grad.detach().clone() for p in opt.params]
    gsm._close()
    return sums, norms


def _seeded(make):
    torch.manual_seed(1234)
    return make().double()


@pytest.mark.parametrize("name", list(_models()))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_clipped_sum_equals_opacus(name, reduction):
    make, k = _models()[name]
    x, y = _data(64, k)
    loss_fn = nn.BCEWithLogitsLoss(reduction=reduction)
    # Pick C so that a good share of samples is clipped and a good share is not.
    _, norms = _opacus_clipped_sum(_seeded(make), loss_fn, x, y, 1.0, reduction)
    C = float(norms.median())
    ref, _ = _opacus_clipped_sum(_seeded(make), loss_fn, x, y, C, reduction)
    clipped = (norms > C).double().mean()
    assert 0.3 < clipped < 0.7

    model = _seeded(make)
    assert supports_fast_path(model)
    with pytest.warns(UserWarning, match="Secure RNG turned off"):
        dp = FastDPSGD(model, loss_fn=loss_fn, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=64, generator=None)
    assert (dp._chain is None) == (name == "two_heads_hooks")
    dp.clipped_grad_sum(x, y)
    got = [dp._views[id(p)] for p in dp.params]
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-10)
    # The precomputed first-layer row norms give the same answer.
    if dp._chain is not None and type(dp._chain[0]) is nn.Linear:
        dp.clipped_grad_sum(x, y, x_sqnorm=(x * x).sum(1))
        for a, b in zip([dp._views[id(p)] for p in dp.params], ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("loss_fn", [nn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0, 0.5], dtype=torch.float64)),
                                     nn.MSELoss(), nn.MSELoss(reduction="sum")])
def test_other_losses_equal_opacus(loss_fn):
    make, k = _models()["two_output_head"]
    x, y = _data(50, k, seed=3)
    red = loss_fn.reduction
    _, norms = _opacus_clipped_sum(_seeded(make), loss_fn, x, y, 1.0, red)
    C = float(norms.median())
    ref, _ = _opacus_clipped_sum(_seeded(make), loss_fn, x, y, C, red)
    assert 0 < (norms > C).sum() < len(x)
    model = _seeded(make)
    dp = FastDPSGD(model, loss_fn=loss_fn, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                   noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=50, generator=None)
    dp.clipped_grad_sum(x, y)
    for a, b in zip([dp._views[id(p)] for p in dp.params], ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-10)


def test_float32_matches_opacus():
    make, k = _models()["mlp_relu"]
    x, y = _data(256, k)
    x, y = x.float(), y.float()
    torch.manual_seed(0)
    m_ref = make()
    m_fast = make()
    m_fast.load_state_dict(m_ref.state_dict())
    loss_fn = nn.BCEWithLogitsLoss()
    C = 0.8
    ref, norms = _opacus_clipped_sum(m_ref, loss_fn, x, y, C, "mean")
    assert 0.2 * len(x) < (norms > C).sum() < 0.8 * len(x)
    dp = FastDPSGD(m_fast, loss_fn=loss_fn, optimizer=torch.optim.SGD(m_fast.parameters(), lr=0.1),
                   noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=256, generator=None)
    dp.clipped_grad_sum(x, y)
    for a, b in zip([dp._views[id(p)] for p in dp.params], ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_full_step_equals_opacus_dpoptimizer_step():
    """noise 0: the parameter update equals Opacus's DPOptimizer.step (sum / expected batch size)."""
    make, k = _models()["mlp_relu"]
    x, y = _data(40, k)
    loss_fn = nn.BCEWithLogitsLoss()
    gsm = GradSampleModule(_seeded(make))
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.5, momentum=0.9), noise_multiplier=0.0,
                      max_grad_norm=0.2, expected_batch_size=32)
    model = _seeded(make)
    dp = FastDPSGD(model, loss_fn=loss_fn, optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
                   noise_multiplier=0.0, max_grad_norm=0.2, expected_batch_size=32, generator=None)
    for _ in range(3):  # several steps: momentum state and the live grad views stay right
        opt.zero_grad()
        loss_fn(gsm(x), y).backward()
        opt.step()
        dp.step(x, y)
    for a, b in zip(model.parameters(), gsm._module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
    gsm._close()


@pytest.mark.parametrize("name", ["mlp_relu", "two_heads_hooks"])
def test_empty_batch_takes_a_pure_noise_step(name):
    make, k = _models()[name]
    model = _seeded(make)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.empty(0, D, dtype=torch.float64), torch.empty(0, k, dtype=torch.float64)
    dp = FastDPSGD(model, loss_fn=nn.BCEWithLogitsLoss(), optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                   noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=8, generator=None)
    dp.step(x, y)
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)  # zero clipped sum, no noise: no change
    dp.noise_multiplier = 2.0
    dp.step(x, y)
    delta = torch.cat([(a - b).reshape(-1) for a, b in zip(before, model.parameters())])
    assert delta.abs().min() > 0  # every parameter moved by noise alone
    # update = lr * noise / ebs, noise ~ N(0, (sigma C)^2) -> std 2/8 over a few hundred coordinates
    assert abs(delta.std().item() - 0.25) < 0.04


def test_noise_std_and_scaling():
    model = nn.Linear(200, 50).double()  # 10,050 parameters -> one draw estimates std to ~1%
    g = torch.Generator().manual_seed(7)
    sigma, C, ebs = 1.3, 0.7, 16
    dp = FastDPSGD(model, loss_fn=nn.MSELoss(), optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                   noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=ebs, generator=g)
    draws = []
    for _ in range(5):
        dp._flat.zero_()
        dp._add_noise_and_scale()
        draws.append(dp._flat.clone() * ebs)
    noise = torch.cat(draws)
    assert abs(noise.mean().item()) < 4 * sigma * C / math.sqrt(noise.numel())
    assert noise.std().item() == pytest.approx(sigma * C, rel=0.02)
    assert not torch.equal(draws[0], draws[1])
    # Same seed -> same noise (the generator is the only source of randomness).
    g2 = torch.Generator().manual_seed(7)
    dp.generator = g2
    dp._flat.zero_()
    dp._add_noise_and_scale()
    torch.testing.assert_close(dp._flat * ebs, draws[0])


def test_secure_mode_noise_std():
    model = nn.Linear(100, 50).double()
    dp = FastDPSGD(model, loss_fn=nn.MSELoss(), optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                   noise_multiplier=1.0, max_grad_norm=2.0, expected_batch_size=1,
                   generator=torch.Generator().manual_seed(1), secure_mode=True)
    dp._flat.zero_()
    dp._add_noise_and_scale()
    assert dp._flat.std().item() == pytest.approx(2.0, rel=0.05)
    with pytest.raises(PrivacyError, match="secure generator"):
        FastDPSGD(model, loss_fn=nn.MSELoss(), optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                  noise_multiplier=1.0, max_grad_norm=2.0, expected_batch_size=1, generator=None,
                  secure_mode=True)


@pytest.mark.parametrize("method", ["geometric", "mask"])
def test_poisson_sampling_rate(method):
    n, q, steps = 500, 0.03, 3000  # > one geometric chunk of steps
    g = torch.Generator().manual_seed(11)
    counts = torch.zeros(n)
    sizes = []
    for idx in poisson_batches(n, sample_rate=q, steps=steps, generator=g, method=method):
        assert idx.dtype == torch.long
        if idx.numel():
            assert idx.min() >= 0 and idx.max() < n
            assert torch.all(idx[1:] > idx[:-1])  # sorted, no duplicates
        counts[idx] += 1
        sizes.append(idx.numel())
    assert len(sizes) == steps
    sizes = torch.tensor(sizes, dtype=torch.float64)
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean().item() - mean) < 4 * math.sqrt(var / steps)
    assert sizes.var().item() == pytest.approx(var, rel=0.1)
    # Each row is included in Binomial(steps, q) steps, independently of its position.
    assert abs(counts.mean().item() / steps - q) < 4 * math.sqrt(q * (1 - q) / (steps * n))
    assert counts.var().item() == pytest.approx(steps * q * (1 - q), rel=0.15)
    first, second = counts[: n // 2].mean(), counts[n // 2:].mean()
    assert abs(first - second) < 4 * math.sqrt(2 * steps * q / (n // 2))


def test_poisson_empty_batches_and_edges():
    g = torch.Generator().manual_seed(0)
    sizes = [i.numel() for i in poisson_batches(20, sample_rate=0.01, steps=400, generator=g)]
    assert sizes.count(0) > 250  # (0.99)^20 = 0.82 of steps are empty
    assert [i.tolist() for i in poisson_batches(4, sample_rate=1.0, steps=2, generator=g)] == [[0, 1, 2, 3]] * 2
    assert [i.numel() for i in poisson_batches(0, sample_rate=0.5, steps=3, generator=g)] == [0, 0, 0]
    a = [i.tolist() for i in poisson_batches(1000, sample_rate=0.1, steps=5, generator=torch.Generator().manual_seed(5))]
    b = [i.tolist() for i in poisson_batches(1000, sample_rate=0.1, steps=5, generator=torch.Generator().manual_seed(5))]
    assert a == b


def test_privacy_parameters_validated_all_at_once():
    model = nn.Linear(D, 1)
    X, y = torch.randn(10, D), torch.rand(10, 1)
    with pytest.raises(PrivacyError) as err:
        train_steps(model, X, y, loss_fn=nn.BCEWithLogitsLoss(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                    noise_multiplier=-1.0, max_grad_norm=0.0, sample_rate=1.5, steps=3, generator=None)
    msg = str(err.value)
    assert "noise_multiplier" in msg and "max_grad_norm" in msg and "sample_rate" in msg
    assert isinstance(err.value, FedpropError) and isinstance(err.value, ValueError)
    for bad in (float("nan"), True, 0.0):
        with pytest.raises(PrivacyError):
            next(poisson_batches(10, sample_rate=bad, steps=1, generator=None))
    with pytest.raises(PrivacyError, match="expected batch size"):
        expected_batch_size(10, sample_rate=0.05)
    assert expected_batch_size(1000, sample_rate=0.0125) == 12  # int(n * q), as make_private
    with pytest.raises(TypeError):
        train_steps(model, X, y, nn.BCEWithLogitsLoss())  # privacy parameters are keyword-only


def test_supports_fast_path():
    assert supports_fast_path(nn.Linear(3, 1))
    assert supports_fast_path(TwoHeads())
    for bad in (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)),
                nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Linear(4, 1)),
                nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(), nn.Linear(4, 1)),
                nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)),
                nn.Conv1d(1, 1, 3), nn.Sequential(nn.ReLU())):
        assert not supports_fast_path(bad)
    with pytest.raises(FastPathError, match="Dropout"):
        m = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Linear(4, 1))
        FastDPSGD(m, loss_fn=nn.MSELoss(), optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                  noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, generator=None)


def test_train_steps_refuses_unsupported_model():
    m = nn.Sequential(nn.Linear(D, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(FastPathError, match="BatchNorm1d"):
        train_steps(m, torch.randn(20, D), torch.rand(20, 1), loss_fn=nn.BCEWithLogitsLoss(),
                    optimizer=torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                    sample_rate=0.5, steps=2, generator=None)


def test_shared_weights_refused_in_hook_path():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(torch.relu(self.a(x)))

    m = Tied()
    dp = FastDPSGD(m, loss_fn=nn.MSELoss(), optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                   noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, generator=None)
    with pytest.raises(FastPathError, match="shared weights"):
        dp.clipped_grad_sum(torch.randn(5, 4), torch.randn(5, 4))


def test_train_steps_learns_and_counts_examples():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4000, D, generator=g)
    w = torch.randn(D, 1, generator=g)
    y = ((X @ w) > 0).float()
    loss_fn = nn.BCEWithLogitsLoss()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = loss_fn(model(X), y).item()
    stats = train_steps(model, X, y, loss_fn=loss_fn, optimizer=opt, noise_multiplier=0.5, max_grad_norm=1.0,
                        sample_rate=0.05, steps=200, generator=torch.Generator().manual_seed(1))
    assert stats.steps == 200 and abs(stats.examples - 200 * 200) < 4 * math.sqrt(200 * 200)
    after = loss_fn(model(X), y).item()
    assert after < 0.6 * before
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, 1))
    stats_np = train_steps_nonprivate(ref, X, y, loss_fn=loss_fn, optimizer=torch.optim.SGD(ref.parameters(), lr=0.5),
                                      sample_rate=0.05, steps=200, generator=torch.Generator().manual_seed(1))
    assert stats_np.examples == stats.examples  # same generator seed -> the very same batches
    assert loss_fn(ref(X), y).item() < 0.6 * before
