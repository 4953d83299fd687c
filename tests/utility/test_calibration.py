"""Federated Platt scaling from DP evaluation counts: fixes a miscalibrated model, keeps its ranking."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from federation import metrics as M
from federation.calibration import calibrate_last_linear, fit_platt, platt_from_release
from federation.privacy.discrete import sample_discrete_gaussian


def _release(y, p, sigma):
    flat = M.release_histogram(y, p, edges=M.logit_edges(20), sigma=sigma, sampler=sample_discrete_gaussian,
                               prefix="h.")
    return M.combine_releases([flat], prefix="h.")


def test_platt_recovers_a_known_miscalibration_from_exact_bin_counts():
    z = np.linspace(-6, 6, 25)
    n = 10_000
    true = 1 / (1 + np.exp(-(0.5 * z - 1.0)))  # the model's logit z is twice too confident and 1 too high
    s = fit_platt(z, true * n, (1 - true) * n, prior=0.0)
    assert s.a == pytest.approx(0.5, abs=1e-6) and s.b == pytest.approx(-1.0, abs=1e-6)


def test_dp_platt_lowers_ece_and_keeps_auc():
    rng = np.random.default_rng(0)
    n = 20_000
    X = torch.from_numpy(rng.normal(size=(n, 3)).astype(np.float32))
    z_true = X @ torch.tensor([1.0, -1.0, 0.5]) - 2.0
    y = (rng.random(n) < torch.sigmoid(z_true).numpy()).astype(np.float32)
    model = torch.nn.Sequential(torch.nn.Linear(3, 1))
    with torch.no_grad():  # right direction, 2x overconfident, shifted: badly calibrated
        model[0].weight.copy_(torch.tensor([[2.0, -2.0, 1.0]]))
        model[0].bias.fill_(-1.0)
    p0 = torch.sigmoid(model(X))[:, 0].detach().numpy()
    before = M.metrics_from_scores(y, p0)
    scaling = platt_from_release(_release(y, p0, sigma=5.0))
    assert scaling.applied
    calibrate_last_linear(model, 0, scaling)
    p1 = torch.sigmoid(model(X))[:, 0].detach().numpy()
    after = M.metrics_from_scores(y, p1)
    assert before["ece"] > 0.1 and after["ece"] < 0.03
    assert after["auc_roc"] == pytest.approx(before["auc_roc"], abs=1e-6)  # float32 ties only


def test_calibrate_refuses_a_head_the_model_does_not_have():
    from federation.calibration import PlattScaling

    with pytest.raises(ValueError, match="head 2"):
        calibrate_last_linear(torch.nn.Sequential(torch.nn.Linear(3, 2)), 2, PlattScaling(1.0, 0.0, 1))


def test_a_release_that_is_mostly_noise_is_not_used_to_recalibrate():
    rng = np.random.default_rng(1)
    p = rng.random(150)
    y = (rng.random(150) < p).astype(np.float32)
    s = platt_from_release(_release(y, p, sigma=40.0))  # 150 customers, noise std 40 per bin
    assert not s.applied and (s.a, s.b) == (1.0, 0.0) and s.spread > 0.15


def test_shift_only_matches_the_observed_rate():
    from federation.calibration import fit_shift

    z = np.linspace(-6, 6, 25)
    n = 1000
    true = 1 / (1 + np.exp(-(z - 0.7)))
    b = fit_shift(z, true * n, (1 - true) * n, prior=0.0)
    assert b == pytest.approx(-0.7, abs=1e-6)
