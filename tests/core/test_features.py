import numpy as np
import pandas as pd

from federation.features import EVENT_FEATURES, NumericFeature, build_event_features, event_labels, raw_event_features
from federation.featurespec import SYNTHETIC_CATEGORICAL, feature_names
from federation.config import DataConfig
from simulations.synthetic import generate_partner, partner_profile

CUT = "2024-01-01"


def _partner(n=400, seed=3):
    return generate_partner(partner_profile(0, n, seed=seed), seed=seed, cutoff=CUT)


def test_generator_is_deterministic_for_a_seed():
    a, ca = _partner()
    b, cb = _partner()
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(ca, cb)
    c, _ = _partner(seed=4)
    assert not a.equals(c)


def test_events_after_cutoff_never_change_features():
    events, customers = _partner()
    base = build_event_features(events, cutoff=CUT, horizon_days=90, static=customers, categorical=SYNTHETIC_CATEGORICAL)
    rng = np.random.default_rng(0)
    later = events.sample(300, random_state=1).copy()
    later["timestamp"] = pd.Timestamp(CUT) + pd.to_timedelta(rng.integers(0, 200 * 86400, len(later)), unit="s")
    later["event_type"] = "purchase"
    later["amount"] = 10_000.0
    changed = pd.concat([events, later], ignore_index=True)
    other = build_event_features(changed, cutoff=CUT, horizon_days=90, static=customers, categorical=SYNTHETIC_CATEGORICAL)
    np.testing.assert_array_equal(base.customer_ids, other.customer_ids)
    np.testing.assert_array_equal(base.X, other.X)
    # ...while labels do see them (the test would catch a leak the other way too).
    assert (other.y["propensity"] >= base.y["propensity"]).all() and other.y["propensity"].sum() > base.y["propensity"].sum()


def test_an_event_exactly_at_cutoff_is_label_not_feature():
    ev = pd.DataFrame({
        "user_id": ["a", "a"], "timestamp": [pd.Timestamp("2023-12-01"), pd.Timestamp(CUT)],
        "event_type": ["visit", "purchase"], "amount": [0.0, 50.0], "channel": ["web", "web"],
    })
    raw = raw_event_features(ev, cutoff=pd.Timestamp(CUT))
    assert raw.loc["a", "frequency"] == 0 and raw.loc["a", "recency_days"] == 31
    y = event_labels(ev, np.array(["a"]), cutoff=pd.Timestamp(CUT), horizon_days=90)
    assert y["churn"][0] == 0 and y["propensity"][0] == 1


def test_encoding_is_declared_and_bounded():
    events, customers = _partner()
    fs = build_event_features(events, cutoff=CUT, horizon_days=90, static=customers, categorical=SYNTHETIC_CATEGORICAL)
    assert fs.feature_names == feature_names(DataConfig())
    assert fs.X.dtype == np.float32 and fs.X.min() >= 0 and fs.X.max() <= 1
    # one row per customer: the privacy unit
    assert len(set(fs.customer_ids)) == len(fs.customer_ids)


def test_encoding_does_not_depend_on_other_rows():
    f = NumericFeature("x", 0, 100)
    a = f.encode(np.array([5.0, 1000.0]))
    b = f.encode(np.array([5.0]))
    assert a[0] == b[0] and a[1] == 1.0


def test_labels_have_signal_and_partners_differ():
    rates = []
    for p in range(3):
        ev, cu = generate_partner(partner_profile(p, 800, seed=1), seed=1, cutoff=CUT)
        fs = build_event_features(ev, cutoff=CUT, horizon_days=90, static=cu, categorical=SYNTHETIC_CATEGORICAL)
        rates.append(fs.y["churn"].mean())
        assert 0.05 < fs.y["churn"].mean() < 0.6 and 0.2 < fs.y["propensity"].mean() < 0.9
    assert max(rates) - min(rates) > 0.005


def test_partner_disk_cache_returns_identical_features(tmp_path, monkeypatch):
    import simulations.partners as P
    from federation.config import from_dict

    cfg = from_dict({"partners": 2, "data": {"min_customers": 300, "max_customers": 500}})
    node = {"partition-id": 1, "num-partitions": 2}
    key = __import__("os").urandom(32)  # the per-run cache key (simulations/partners.py: files are AES-GCM encrypted)
    first = P.cached_partner(cfg, node, cache_dir=str(tmp_path), key=key)
    monkeypatch.setattr(P, "load_partner", lambda *a: (_ for _ in ()).throw(AssertionError("rebuilt")))
    second = P.cached_partner(cfg, node, cache_dir=str(tmp_path), key=key)  # from disk, not rebuilt
    np.testing.assert_array_equal(first.X, second.X)
    assert list(first.customer_ids) == list(second.customer_ids) and first.feature_names == second.feature_names
    for h in first.y:
        np.testing.assert_array_equal(first.y[h], second.y[h])
