"""Federated evaluation metrics: histograms combined across partners vs the pooled per-example computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

from federation import metrics as M
from federation.errors import ConfigError, DataValidationError, FedpropError, PrivacyError


def _partner_data(rng: np.random.Generator, n: int, base_rate: float, separation: float, decimals: int | None):
    y = (rng.random(n) < base_rate).astype(int)
    logit = rng.normal(size=n) + separation * (2 * y - 1)
    p = 1.0 / (1.0 + np.exp(-logit))
    if decimals is not None:
        p = np.round(p, decimals)  # real ties between examples
    return y, p


@st.composite
def federations(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    k = draw(st.integers(1, 6))
    sizes = draw(st.lists(st.integers(1, 300), min_size=k, max_size=k))
    bins = draw(st.sampled_from([1, 7, 10, 100, 1000]))
    base_rate = draw(st.floats(0.05, 0.6))
    separation = draw(st.floats(0.0, 2.0))
    decimals = draw(st.sampled_from([None, 1, 2, 3]))
    rng = np.random.default_rng(seed)
    parts = [_partner_data(rng, n, base_rate, separation, decimals) for n in sizes]
    return bins, parts


def _pooled(parts):
    return np.concatenate([y for y, _ in parts]), np.concatenate([p for _, p in parts])


@settings(max_examples=150, deadline=None)
@given(federations())
def test_combined_auc_matches_pooled_auc_within_tie_bound(fed):
    bins, parts = fed
    combined = M.combine(M.histogram_from_scores(y, p, bins=bins) for y, p in parts)
    y, p = _pooled(parts)
    if y.min() == y.max():
        assert math.isnan(M.auc_roc(combined))
        return
    pooled = roc_auc_score(y, p)
    bound = M.auc_tie_bound(combined)
    assert abs(M.auc_roc(combined) - pooled) <= bound + 1e-12
    # the bound is the within-bin tie mass, so it is what resolution costs: never more than 1/2
    assert 0.0 <= bound <= 0.5
    # PR-AUC is average precision of the pooled scores rounded to their bins
    assert M.pr_auc(combined) == pytest.approx(average_precision_score(y, M.bin_index(p, bins)), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(federations())
def test_combine_equals_histogram_of_pooled_predictions(fed):
    bins, parts = fed
    combined = M.combine(M.histogram_from_scores(y, p, bins=bins) for y, p in parts)
    pooled = M.histogram_from_scores(*_pooled(parts), bins=bins)
    assert np.array_equal(combined.pos, pooled.pos) and np.array_equal(combined.neg, pooled.neg)
    np.testing.assert_allclose(combined.sum_score, pooled.sum_score, rtol=1e-12, atol=1e-9)
    assert combined.sum_logloss == pytest.approx(pooled.sum_logloss, rel=1e-12)
    assert combined.sum_brier == pytest.approx(pooled.sum_brier, rel=1e-12, abs=1e-12)


def test_auc_is_exact_when_bins_separate_all_distinct_scores():
    rng = np.random.default_rng(3)
    y, p = _partner_data(rng, 3000, 0.3, 0.8, decimals=2)  # 101 distinct values, each in its own bin of 1000
    h = M.histogram_from_scores(y, p, bins=1000)
    assert M.auc_roc(h) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_default_resolution_auc_error_is_small_for_continuous_scores():
    rng = np.random.default_rng(4)
    parts = [_partner_data(rng, n, 0.2, 1.0, None) for n in (500, 2000, 7000)]
    combined = M.combine(M.histogram_from_scores(y, p) for y, p in parts)
    y, p = _pooled(parts)
    assert abs(M.auc_roc(combined) - roc_auc_score(y, p)) <= M.auc_tie_bound(combined) < 1e-3


def test_log_loss_and_brier_are_exact_vs_sklearn():
    rng = np.random.default_rng(5)
    parts = [_partner_data(rng, n, 0.25, 1.5, None) for n in (50, 400, 999)]
    parts.append((np.array([1, 0, 1, 0]), np.array([0.0, 1.0, 1.0, 0.0])))  # clipped extremes
    combined = M.combine(M.histogram_from_scores(y, p, bins=10) for y, p in parts)
    y, p = _pooled(parts)
    clipped = np.clip(p, M.PROB_CLIP, 1 - M.PROB_CLIP)
    assert M.log_loss(combined) == pytest.approx(log_loss(y, clipped), rel=1e-12)
    assert M.brier(combined) == pytest.approx(brier_score_loss(y, p), rel=1e-12)
    assert M.MAX_LOGLOSS == pytest.approx(16.118, abs=1e-3)


def _direct_ece(y, p, n_bins, fine_bins):
    coarse = M.bin_index(p, fine_bins) * n_bins // fine_bins
    total = 0.0
    for b in range(n_bins):
        m = coarse == b
        if m.any():
            total += m.sum() / len(y) * abs(p[m].mean() - y[m].mean())
    return total


@pytest.mark.parametrize("n_bins", [1, 5, 10, 20])
def test_ece_and_reliability_are_exact_vs_direct_computation(n_bins):
    rng = np.random.default_rng(6)
    parts = [_partner_data(rng, n, 0.3, 0.7, None) for n in (300, 1200)]
    combined = M.combine(M.histogram_from_scores(y, p) for y, p in parts)
    y, p = _pooled(parts)
    assert M.ece(combined, n_bins=n_bins) == pytest.approx(_direct_ece(y, p, n_bins, 1000), abs=1e-12)
    assert M.metrics_from_scores(y, p, n_bins=n_bins)["ece"] == pytest.approx(_direct_ece(y, p, n_bins, 1000), abs=1e-12)
    curve = M.reliability_curve(combined, n_bins=n_bins)
    assert sum(curve["count"]) == len(y)
    assert len(curve["mean_predicted"]) == len(curve["observed_rate"]) == n_bins


def test_reliability_bins_must_divide_histogram_bins():
    h = M.histogram_from_scores([0, 1], [0.2, 0.9], bins=1000)
    with pytest.raises(ConfigError, match="must divide"):
        M.ece(h, n_bins=7)


def test_perfect_ranker_top_decile_lift_is_one_over_base_rate():
    rng = np.random.default_rng(7)
    for base_rate, expected in [(0.25, 4.0), (0.5, 2.0), (0.05, 10.0)]:  # capped at 1/0.1 when base < 10%
        n = 10_000
        y = np.zeros(n, dtype=int)
        y[: int(base_rate * n)] = 1
        p = np.where(y == 1, rng.uniform(0.6, 1.0, n), rng.uniform(0.0, 0.4, n))
        h = M.histogram_from_scores(y, p)
        assert M.gains_and_lift(h)["cumulative_lift"][0] == pytest.approx(min(1 / base_rate, 10.0), rel=1e-12)
        assert M.summarize(h)["top_decile_lift"] == pytest.approx(expected, rel=1e-12)
        assert M.metrics_from_scores(y, p)["top_decile_lift"] == pytest.approx(expected, rel=1e-12)


def test_random_ranker_lift_is_about_one():
    rng = np.random.default_rng(8)
    n = 200_000
    y = (rng.random(n) < 0.2).astype(int)
    h = M.histogram_from_scores(y, rng.random(n))
    g = M.gains_and_lift(h)
    assert np.allclose(g["cumulative_lift"], 1.0, atol=0.05)
    assert np.allclose(g["group_lift"], 1.0, atol=0.08)
    assert g["cumulative_gains"][-1] == pytest.approx(1.0)
    assert g["fraction"] == pytest.approx([i / 10 for i in range(1, 11)])


def test_exact_gains_match_sorting_when_there_are_no_ties():
    rng = np.random.default_rng(9)
    y, p = _partner_data(rng, 1000, 0.3, 1.0, None)
    order = np.argsort(-p)
    direct = [y[order[: k * 100]].sum() / y.sum() for k in range(1, 11)]
    assert M.metrics_from_scores(y, p)["gains"]["cumulative_gains"] == pytest.approx(direct, abs=1e-12)


def test_histogram_gains_equal_exact_gains_on_binned_scores():
    """The proportional split of a boundary bin is the tie rule of the exact computation."""
    rng = np.random.default_rng(10)
    y, p = _partner_data(rng, 1237, 0.15, 1.2, None)
    bins = 50
    h = M.histogram_from_scores(y, p, bins=bins)
    centers = (M.bin_index(p, bins) + 0.5) / bins
    exact = M.metrics_from_scores(y, centers)["gains"]
    hist = M.gains_and_lift(h)
    for key in ("cumulative_gains", "cumulative_lift", "group_lift"):
        assert hist[key] == pytest.approx(exact[key], rel=1e-12)


def test_summarize_and_metrics_from_scores_share_one_shape():
    rng = np.random.default_rng(11)
    y, p = _partner_data(rng, 500, 0.3, 1.0, None)
    for yy, pp in [(y, p), (np.zeros(5, dtype=int), p[:5]), (np.array([], dtype=int), np.array([]))]:
        s = M.summarize(M.histogram_from_scores(yy, pp))
        e = M.metrics_from_scores(yy, pp)
        assert s.keys() == e.keys()
        assert s["gains"].keys() == e["gains"].keys() and s["reliability"].keys() == e["reliability"].keys()
        assert {k: type(v) for k, v in s.items()} == {k: type(v) for k, v in e.items()}
    assert math.isnan(M.summarize(M.histogram_from_scores(np.zeros(5, dtype=int), p[:5]))["auc_roc"])
    s, e = M.summarize(M.histogram_from_scores(y, p)), M.metrics_from_scores(y, p)
    assert s["score_resolution"] == 0.001 and e["score_resolution"] == 0.0 and e["auc_tie_bound"] == 0.0
    assert abs(s["auc_roc"] - e["auc_roc"]) <= s["auc_tie_bound"]


def test_flat_round_trip_for_flower_metric_record():
    rng = np.random.default_rng(12)
    h = M.histogram_from_scores(*_partner_data(rng, 200, 0.3, 1.0, None), bins=100)
    flat = M.to_flat(h, prefix="eval.churn.")
    assert all(k.startswith("eval.churn.") for k in flat)
    for v in flat.values():  # MetricRecord value types only
        assert type(v) in (int, float) or (type(v) is list and len({type(x) for x in v}) == 1
                                           and type(v[0]) in (int, float))
    flat["other.key"] = 1.0
    assert M.from_flat(flat, prefix="eval.churn.") == h
    with pytest.raises(DataValidationError) as err:
        M.from_flat(flat, prefix="eval.propensity.")
    assert len(err.value.problems) == 7  # every missing key reported at once


def test_from_flat_rejects_malformed_records():
    h = M.histogram_from_scores([0, 1, 1], [0.1, 0.5, 0.9], bins=10)
    flat = M.to_flat(h)
    bad = dict(flat)
    bad[M.DEFAULT_PREFIX + "format_version"] = 99
    bad[M.DEFAULT_PREFIX + "pos"] = [0.5] * 10
    with pytest.raises(DataValidationError) as err:
        M.from_flat(bad)
    assert len(err.value.problems) == 2
    short = dict(flat)
    short[M.DEFAULT_PREFIX + "neg"] = [0] * 9
    with pytest.raises(DataValidationError, match="shape"):
        M.from_flat(short)


def test_unequal_bins_refuse_to_combine():
    a = M.histogram_from_scores([0, 1], [0.2, 0.8], bins=100)
    b = M.histogram_from_scores([0, 1], [0.2, 0.8], bins=1000)
    with pytest.raises(M.HistogramMismatchError, match="different resolutions") as err:
        M.combine([a, b])
    assert isinstance(err.value, FedpropError)
    with pytest.raises(M.HistogramMismatchError):
        M.combine([])


def test_invalid_inputs_report_every_problem():
    with pytest.raises(DataValidationError) as err:
        M.histogram_from_scores([0, 2, 1], [0.1, float("nan"), 1.5])
    assert len(err.value.problems) == 2
    with pytest.raises(DataValidationError, match="pair up"):
        M.metrics_from_scores([0, 1], [0.5])


def test_histogram_is_immutable():
    h = M.histogram_from_scores([0, 1], [0.2, 0.8], bins=10)
    with pytest.raises(ValueError):
        h.pos[0] = 5
    with pytest.raises(AttributeError):
        h.bins = 3  # type: ignore[misc]


def _exact_sampler(sigma, size):
    from federation.privacy.discrete import sample_discrete_gaussian

    return sample_discrete_gaussian(sigma, size)


def test_dp_release_holds_only_noisy_counts_on_public_edges():
    rng = np.random.default_rng(13)
    y, p = _partner_data(rng, 5000, 0.3, 1.0, None)
    edges = M.logit_edges(20)
    flat = M.release_histogram(y, p, edges=edges, sigma=3.0, sampler=_exact_sampler, prefix="churn.hist.")
    assert set(flat) == {f"churn.hist.{k}" for k in ("format_version", "edges", "pos", "neg", "sigma")}
    assert all(isinstance(v, int) for v in flat["churn.hist.pos"] + flat["churn.hist.neg"])
    exact = M.histogram_from_scores(y, p, bins=20, edges=edges)
    noise = np.array(flat["churn.hist.pos"]) - exact.pos
    assert noise.any() and np.abs(noise).max() < 30  # noisy, at the declared scale
    nc = M.combine_releases([flat], prefix="churn.hist.")
    s = M.summarize_release(nc)
    assert abs(s["auc_roc"] - M.metrics_from_scores(y, p)["auc_roc"]) < max(0.03, 3 * s["auc_roc_half_width"])
    assert 0 < s["auc_roc_half_width"] < 0.05 and s["auc_roc_meaningful"]
    # one release, one interval: the round log and the signed card summarise it separately and must agree
    again = M.summarize_release(M.combine_releases([dict(flat)], prefix="churn.hist."))
    assert all(again[f"{k}_half_width"] == s[f"{k}_half_width"] for k in M.ERROR_BAR_KEYS)
    other = dict(flat, **{"churn.hist.pos": [v + (i == 3) for i, v in enumerate(flat["churn.hist.pos"])]})
    assert M._release_seed(M.combine_releases([other], prefix="churn.hist.")) != M._release_seed(nc)


def test_release_combination_sums_raw_counts_and_noise():
    edges = M.logit_edges(10)
    flats = [M.release_histogram([0, 1] * 50, [0.2, 0.8] * 50, edges=edges, sigma=s, sampler=_exact_sampler, prefix="x.")
             for s in (3.0, 4.0)]
    nc = M.combine_releases(flats, prefix="x.")
    assert nc.sigma == pytest.approx(5.0) and nc.partners == 2
    assert np.array_equal(nc.pos, np.add(flats[0]["x.pos"], flats[1]["x.pos"]))  # raw sums, projected only later
    bad = dict(flats[1], **{"x.edges": list(M.logit_edges(12))})
    with pytest.raises(Exception, match="edges"):
        M.combine_releases([flats[0], bad], prefix="x.")


def test_tiny_partner_metrics_are_flagged_not_meaningful():
    edges = M.logit_edges(20)
    flat = M.release_histogram([0, 1] * 20, [0.3, 0.7] * 20, edges=edges, sigma=20.0, sampler=_exact_sampler, prefix="x.")
    s = M.summarize_release(M.combine_releases([flat], prefix="x."))
    # the half-width is > 0.05, or undefined (NaN) when the noise swamps a class's total: never "meaningful"
    assert not s["auc_roc_meaningful"] and not s["auc_roc_half_width"] <= 0.05


@pytest.mark.parametrize("sigma", [0, -1.0, float("inf"), float("nan")])
def test_release_rejects_invalid_sigma(sigma):
    with pytest.raises(PrivacyError, match="sigma"):
        M.release_histogram([0, 1], [0.2, 0.8], edges=M.logit_edges(10), sigma=sigma, sampler=_exact_sampler, prefix="x.")


def test_boundary_bin_is_split_proportionally_hand_computed():
    # 15 customers, 3 positives. Top bin: 3 customers, 1 positive; next: 2 customers, both positive.
    y = [1, 0, 0, 1, 1] + [0] * 10
    p = [0.95] * 3 + [0.5] * 2 + [0.1] * 10
    g = M.gains_and_lift(M.histogram_from_scores(y, p, bins=10))
    # decile 1 = 1.5 customers: half of the top bin's share -> 1.5 * 1/3 = 0.5 positives of 3
    # decile 2 = 3 customers: the whole top bin -> 1 positive; decile 3 = 4.5 -> 1 + 1.5 * 2/2 = 2.5
    assert g["cumulative_gains"][:3] == pytest.approx([0.5 / 3, 1 / 3, 2.5 / 3], rel=1e-12)
    assert g["cumulative_lift"][0] == pytest.approx((0.5 / 3) / 0.1, rel=1e-12)
    assert g["group_lift"][2] == pytest.approx((1.5 / 1.5) / (3 / 15), rel=1e-12)
    assert g["cumulative_gains"][-1] == pytest.approx(1.0)


def test_projection_keeps_the_total_and_is_the_nearest_nonnegative_point():
    y = np.array([-7, 3, 0, 12, -2, 1])
    x = M.project_counts(y)
    assert x.dtype == np.int64 and (x >= 0).all() and x.sum() == y.sum()
    assert np.array_equal(M.project_counts([4, 0, 9]), [4, 0, 9])  # non-negative input is left alone
    assert M.project_counts([-3, -1]).sum() == 0 and M.project_counts([]).size == 0
    # no other non-negative integer point with the same total is closer (exhaustive over a small grid)
    best = min((((np.array(c) - y) ** 2).sum(), c) for c in __import__("itertools").product(range(8), repeat=6)
               if sum(c) == y.sum())
    assert ((x - y) ** 2).sum() <= best[0] + 1.0  # rounding costs at most one unit move


def test_released_auc_on_a_small_test_set_is_less_biased_than_clipping():
    """Clipping noisy counts at 0 inflates empty bins and drags AUC to 0.5; the projection cuts that bias by about a third."""
    rng = np.random.default_rng(5)
    y, p = _partner_data(rng, 600, 0.2, 1.5, None)
    edges = M.logit_edges(20)
    exact = M.histogram_from_scores(y, p, bins=20, edges=edges)
    truth = M.auc_roc(exact)
    proj, clip = [], []
    for _ in range(300):
        nc = M.NoisyCounts(edges=edges, pos=exact.pos + np.rint(rng.normal(0, 5, 20)).astype(np.int64),
                           neg=exact.neg + np.rint(rng.normal(0, 5, 20)).astype(np.int64), sigma=5.0, partners=1)
        proj.append(M.auc_roc(nc.histogram()))
        clip.append(M._ranked(np.maximum(nc.pos, 0), np.maximum(nc.neg, 0))["auc_roc"])
    bias_proj, bias_clip = np.mean(proj) - truth, np.mean(clip) - truth
    assert abs(bias_proj) < 0.8 * abs(bias_clip), (bias_proj, bias_clip)  # measured -0.083 vs -0.120
