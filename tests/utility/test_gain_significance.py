"""DeLong's paired AUC comparison (federation.auc_compare) and the summary's significance of per-partner gains."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clients.node import PartnerData
from federation import metrics as M
from federation.auc_compare import (delong_covariance, midrank, paired_auc_difference,
                                    structural_components)
from federation.config import from_dict
from simulations.baselines import run_baselines, scores
from simulations.summary import build_summary, explain_gains, partner_value, render_summary


def _brute(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """V10 (per positive) and V01 (per negative) from the full psi matrix, ties 1/2."""
    X, Y = s[y == 1], s[y == 0]
    psi = (X[:, None] > Y[None, :]) + 0.5 * (X[:, None] == Y[None, :])
    return psi.mean(axis=1), psi.mean(axis=0)


def _correlated(rng: np.random.Generator, n: int, rate: float, sa: float, sb: float, rho: float = 0.6):
    y = (rng.random(n) < rate).astype(np.float64)
    common = rng.normal(size=n)
    a = sa * y + rho * common + math.sqrt(1 - rho**2) * rng.normal(size=n)
    b = sb * y + rho * common + math.sqrt(1 - rho**2) * rng.normal(size=n)
    return y, 1 / (1 + np.exp(-a)), 1 / (1 + np.exp(-b))


def test_midrank_averages_ties():
    assert midrank(np.array([3.0, 1.0, 3.0, 2.0, 3.0])).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    assert midrank(np.array([])).tolist() == []


@pytest.mark.parametrize("seed", range(6))
def test_structural_components_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 40))
    y = (rng.random(n) < 0.4).astype(np.float64)
    y[:2], y[2:4] = 1, 0  # at least 2 of each class
    S = rng.integers(0, 6, size=(3, n)).astype(np.float64)  # few distinct values: many ties, within and across classes
    auc, v10, v01 = structural_components(y, S)
    for r in range(3):
        b10, b01 = _brute(y, S[r])
        np.testing.assert_allclose(v10[r], b10, atol=1e-12)
        np.testing.assert_allclose(v01[r], b01, atol=1e-12)
        assert auc[r] == pytest.approx(M.metrics_from_scores(y, S[r] / 5)["auc_roc"], abs=1e-12)
        assert auc[r] == pytest.approx(b01.mean(), abs=1e-12)
    # the covariance from the brute-force components, DeLong's formula written out
    B10 = np.stack([_brute(y, S[r])[0] for r in range(3)])
    B01 = np.stack([_brute(y, S[r])[1] for r in range(3)])
    m, k = B10.shape[1], B01.shape[1]
    c10 = (B10 - B10.mean(1, keepdims=True)) @ (B10 - B10.mean(1, keepdims=True)).T / (m - 1)
    c01 = (B01 - B01.mean(1, keepdims=True)) @ (B01 - B01.mean(1, keepdims=True)).T / (k - 1)
    _, cov = delong_covariance(y, S)
    np.testing.assert_allclose(cov, c10 / m + c01 / k, atol=1e-12)
    d = paired_auc_difference(y, S[0], S[1])
    var = (c10 / m + c01 / k)
    assert d.diff == pytest.approx(auc[0] - auc[1], abs=1e-12)
    assert d.se == pytest.approx(math.sqrt(max(var[0, 0] + var[1, 1] - 2 * var[0, 1], 0)), abs=1e-12)
    if d.se > 0:
        assert d.half_width == pytest.approx(1.959963984540054 * d.se, rel=1e-9)
        assert (d.ci_low, d.ci_high) == pytest.approx((d.diff - d.half_width, d.diff + d.half_width))


def test_se_matches_paired_bootstrap():
    rng = np.random.default_rng(7)
    y, a, b = _correlated(rng, 600, 0.25, 1.4, 1.1, rho=0.85)
    d = paired_auc_difference(y, a, b)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    diffs = []
    for _ in range(1500):  # stratified paired bootstrap: the same resampled customers for both models
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        auc, _, _ = structural_components(y[idx], np.stack([a[idx], b[idx]]))
        diffs.append(auc[0] - auc[1])
    boot = float(np.std(diffs, ddof=1))
    assert d.se == pytest.approx(boot, rel=0.15)
    # and the pairing matters: the unpaired interval (independent AUC errors) is much wider
    _, cov = delong_covariance(y, np.stack([a, b]))
    assert d.se < 0.8 * math.sqrt(cov[0, 0] + cov[1, 1])


def test_significance_and_degenerate_cases():
    rng = np.random.default_rng(3)
    y, good, _ = _correlated(rng, 2000, 0.3, 2.5, 0.0)
    noise = rng.random(len(y))
    strong = paired_auc_difference(y, good, noise)
    assert strong.significant and strong.direction == 1 and strong.ci_low > 0 and strong.p_value < 1e-6
    assert paired_auc_difference(y, noise, good).direction == -1
    same = paired_auc_difference(y, good, good)
    assert same.diff == 0 and same.se == 0 and not same.significant and same.direction == 0
    one_class = paired_auc_difference(np.ones(10), rng.random(10), rng.random(10))
    assert math.isnan(one_class.diff) and not one_class.significant
    tiny = paired_auc_difference(np.array([1, 0, 0, 0]), rng.random(4), rng.random(4))  # 1 positive: no variance
    assert math.isnan(tiny.se) and not tiny.significant and tiny.direction == 0
    d = strong.as_dict()
    assert d["significant"] is True and d["level"] == 0.95 and d["n_pos"] + d["n_neg"] == len(y)
    with pytest.raises(ValueError, match="same customers"):
        paired_auc_difference(y, good, good[:-1])


def test_small_test_set_gain_is_not_significant():
    """The problem this fixes: 40 test positives, a +0.03 AUC difference is well within the noise."""
    rng = np.random.default_rng(11)
    y, a, b = _correlated(rng, 160, 0.25, 1.3, 1.1, rho=0.3)
    d = paired_auc_difference(y, a, b)
    assert 0.03 < d.half_width < 0.2 and not d.significant


from tests.utility.test_utility_federation import _part  # noqa: E402 - one synthetic partner, shared


def test_run_baselines_pairs_global_and_personalised_with_local_and_summary_reports_it():
    rng = np.random.default_rng(0)
    parts = [_part(0, 1200, rng, np.array([4.0, -4.0, 0.0]), -1.0), _part(1, 160, rng, np.array([4.0, -4.0, 2.0]), 0.0)]
    cfg = from_dict({"task": "churn", "model": {"kind": "logreg", "hidden": []}})
    torch.manual_seed(0)
    g = torch.nn.Sequential(torch.nn.Linear(3, 1))
    with torch.no_grad():  # a decent global model (the true direction), so the comparisons are non-trivial
        g[0].weight.copy_(torch.tensor([[4.0, -4.0, 0.5]]))
        g[0].bias.fill_(0.0)
    base = run_baselines(cfg, parts, global_model=g)
    assert set(base) == {"centralized", "local_only", "personalised"}
    fed_pp = {str(p.partition_id): {"churn": M.metrics_from_scores(p.Y_test.numpy()[:, 0], scores(g, p.X_test)[:, 0])}
              for p in parts}
    for p in parts:
        pid = str(p.partition_id)
        c = base["local_only"]["paired_auc"][pid]["churn"]
        lo = base["local_only"]["per_partner"][pid]["churn"]["auc_roc"]
        assert c["federated_dp_vs_local_only"]["diff"] == pytest.approx(fed_pp[pid]["churn"]["auc_roc"] - lo, abs=1e-12)
        assert c["personalised_vs_local_only"]["diff"] == pytest.approx(
            base["personalised"]["per_partner"][pid]["churn"]["auc_roc"] - lo, abs=1e-12)
        assert c["federated_dp_vs_local_only"]["half_width"] > 0
    results = {"churn": {"heads": ["churn"], "rounds": [],
                         "federated_pooled": {"churn": M.metrics_from_scores(
                             np.concatenate([p.Y_test.numpy()[:, 0] for p in parts]),
                             np.concatenate([scores(g, p.X_test)[:, 0] for p in parts]))},
                         "federated_per_partner": fed_pp, "baselines": base,
                         "partners": {str(p.partition_id): {"n_train": p.n_train, "n_test": p.n_test} for p in parts}}}
    s = build_summary(cfg, results, wall_time_s=1.0, federation_time_s=1.0)
    t = s["tasks"]["churn"]
    for pid, v in t["per_partner"].items():
        c = base["local_only"]["paired_auc"][pid]["churn"]
        assert v["gain_auc_half_width"] == pytest.approx(c["federated_dp_vs_local_only"]["half_width"])
        assert v["personalised_gain_auc_half_width"] == pytest.approx(c["personalised_vs_local_only"]["half_width"])
        assert v["gain_auc_significant"] == c["federated_dp_vs_local_only"]["significant"]
    assert t["partners_gaining_auc_significantly"] == sum(
        v["gain_auc_direction"] == 1 for v in t["per_partner"].values())
    text = render_summary(s)
    rows = [line for line in text.splitlines() if line.startswith("| churn | ") and line.count("|") == 14]
    assert len(rows) == 2 and all(" +-0." in r for r in rows)
    assert "95% paired DeLong" in text and "with their personalised model" in text
    # the small partner (80 test customers) cannot tell its gain from noise
    assert t["per_partner"]["1"]["gain_auc_significant"] is False
    assert "Test set too small to tell" in text


def _row(gain: float, hw: float, *, pers: float | None = None, pers_hw: float | None = None, n_train=100, pos=20):
    def comp(d, h):
        return {"diff": d, "half_width": h, "ci_low": d - h, "ci_high": d + h, "significant": abs(d) > h,
                "direction": (1 if d > h else -1 if d < -h else 0)}

    local = {"churn": {"auc_roc": 0.7, "top_decile_lift": 2.0, "base_rate": pos / 100}}
    paired = {"federated_dp_vs_local_only": comp(gain, hw)}
    personalised = None
    if pers is not None:
        paired["personalised_vs_local_only"] = comp(pers, pers_hw)
        personalised = {"churn": {"auc_roc": 0.7 + pers, "top_decile_lift": 2.0}}
    v = partner_value("churn", "0", federated={"churn": {"auc_roc": 0.7 + gain, "top_decile_lift": 2.0}},
                      local=local, central=None, n_test=100, personalised=personalised, paired=paired)
    v["n_train"] = n_train
    return v


def test_explain_gains_counts_significant_gains_and_names_too_small_test_sets():
    pp = {"0": _row(0.08, 0.05, pers=0.09, pers_hw=0.05, n_train=150, pos=20),  # significant with both
          "1": _row(0.03, 0.06, pers=0.01, pers_hw=0.05, pos=18),              # noise
          "2": _row(-0.02, 0.01, pers=-0.015, pers_hw=0.01, n_train=5000, pos=400),  # a real (small) loss
          "3": _row(-0.002, 0.004, pers=0.0, pers_hw=0.001, n_train=3000, pos=300)}  # the same AUC
    r = {"per_partner": pp, "partners_gaining_auc": 2, "mean_gain_auc": 0.03, "partners_gaining_auc_personalised": 2,
         "mean_gain_auc_personalised": 0.03, "partners_gaining_auc_significantly": 1,
         "partners_losing_auc_significantly": 1, "partners_gaining_auc_significantly_personalised": 1,
         "partners_losing_auc_significantly_personalised": 1}
    text = explain_gains("churn", r)
    assert text.startswith("churn: 2 of 4 partners gain AUC with the federated-DP model (1 significantly, "
                           "95% paired DeLong; 1 significantly worse; mean gain +0.030); 2 of 4 with their "
                           "personalised model (1 significantly; 1 significantly worse; mean gain +0.030).")
    assert ("Gaining significantly (95%): 0 (150 train customers, 20 test positives; fed-DP +0.080 +-0.050*, "
            "personalised +0.090 +-0.050*).") in text
    assert ("Test set too small to tell (every difference from local-only is within its 95% interval): "
            "1 (100 train customers, 18 test positives; fed-DP +0.030 +-0.060, personalised +0.010 +-0.050).") in text
    assert "Significantly worse than local-only (*), and no significant gain: 2 (5000 train customers, 400 test " \
           "positives; fed-DP -0.020 +-0.010*, personalised -0.015 +-0.010*) -- a partner" in text
    assert "Same AUC as local-only (95% intervals inside +-0.02): 3 (3000 train customers" in text
    assert pp["1"]["gain_auc_significant"] is False and pp["0"]["personalised_gain_auc_direction"] == 1


def test_explain_gains_without_paired_tests_keeps_the_former_text():
    v = partner_value("churn", "0", federated={"churn": {"auc_roc": 0.75}}, local={"churn": {"auc_roc": 0.7}},
                      central=None, n_test=100)
    v["n_train"] = 100
    text = explain_gains("churn", {"per_partner": {"0": v}, "partners_gaining_auc": 1, "mean_gain_auc": 0.05})
    assert text == ("churn: 1 of 1 partners gain AUC with the federated-DP model (mean gain +0.050). "
                    "Gaining (best of fed-DP and personalised): 0 (100 train customers, +0.050).")


def test_paired_test_of_other_models_is_ignored():
    """A comparison whose difference is not the row's gain (e.g. the fed-DP AUC fell back on a histogram
    evaluation) is not attached to the gain."""
    v = _row(0.05, 0.02)
    assert v["gain_auc_half_width"] == pytest.approx(0.02)
    w = partner_value("churn", "0", federated={"churn": {"auc_roc": 0.76}}, local={"churn": {"auc_roc": 0.7}},
                      central=None, n_test=100,
                      paired={"federated_dp_vs_local_only": {"diff": 0.05, "half_width": 0.02, "ci_low": 0.03,
                                                             "ci_high": 0.07, "significant": True, "direction": 1}})
    assert w["gain_auc_half_width"] is None and w["gain_auc_significant"] is None


def test_bench_utility_counts_significant_wins_and_losses():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_utility as B

    def row(local, fed, pers, fs, ps):
        return {"partner": "0", "n_train": 100, "local": local, "fed": fed, "personalised": pers, "fed_sig": fs,
                "pers_sig": ps, "choice": "", "central": 0.8}

    head = {"fed_auc": 0.8, "central_auc": 0.82, "central_model": "logreg", "ratio": 0.97, "ece": 0.01,
            "ece_platt": None, "platt": None, "ece_personalised": 0.02, "pers_beats_local": 0.5, "pers_no_loss": 1.0,
            "fed_beats_local": 0.5,
            "per_partner": [row(0.7, 0.75, 0.78, 0, 1), row(0.8, 0.78, 0.8, -1, 0), row(0.6, 0.62, 0.61, 0, 0)]}
    text = B.render([{"data": "d", "epsilon": 1.0, "heads": {"churn": head}, "train_loss": [1, 0.9, 0.8],
                      "diverged": False}])
    last = text.splitlines()[-1]
    assert last.startswith("All runs: personalised > local-only for 2 of 3 partner-runs")
    assert "personalised vs local-only 1 significant wins / 0 significant losses of 3" in last
    assert "fed-DP vs local-only 0 significant wins / 1 significant losses of 3" in last
