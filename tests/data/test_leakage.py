"""Point-in-time property: events at or after the cutoff never change features; labels see only the horizon."""
from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federation.features import EventSchema, build_event_features, raw_event_features

CUT = pd.Timestamp("2024-01-01")
TYPES = ["visit", "purchase", "support_ticket", "return"]


def _log(seed: int, n: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    offs = rng.integers(-400 * 86400, 120 * 86400, n)
    return pd.DataFrame({
        "user_id": rng.choice([f"c{i}" for i in range(12)], n),
        "timestamp": CUT + pd.to_timedelta(offs, unit="s"),
        "event_type": rng.choice(TYPES, n),
        "amount": np.round(rng.exponential(30.0, n), 2),
        "channel": rng.choice(["web", "app", "store"], n),
        "product": rng.choice(["a", "b", "c", "d"], n),
    })


future_event = st.tuples(
    st.sampled_from([f"c{i}" for i in range(15)]),  # also customers never seen before the cutoff
    st.integers(0, 200 * 86400),  # seconds at or after the cutoff (0 = exactly at it)
    st.sampled_from(TYPES), st.floats(0, 1e4, allow_nan=False), st.sampled_from(["web", "app", "x"]),
    st.sampled_from(["a", "z"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(1, 80), extra=st.lists(future_event, max_size=25),
       move=st.data())
def test_future_events_never_change_features(seed, n, extra, move):
    ev = _log(seed, n)
    base = raw_event_features(ev, cutoff=CUT)
    # 1) add arbitrary events at or after the cutoff
    add = pd.DataFrame(extra, columns=["user_id", "sec", "event_type", "amount", "channel", "product"])
    add["timestamp"] = CUT + pd.to_timedelta(add.pop("sec"), unit="s")
    grown = pd.concat([ev, add[ev.columns]], ignore_index=True)
    # 2) move every already-future event somewhere else in the future
    fut = (grown["timestamp"] >= CUT).to_numpy()
    shift = move.draw(st.integers(0, 300 * 86400))
    grown.loc[fut, "timestamp"] = CUT + pd.to_timedelta(
        ((grown.loc[fut, "timestamp"] - CUT).dt.total_seconds().astype(np.int64) + shift) % (300 * 86400), unit="s")
    after = raw_event_features(grown.sample(frac=1.0, random_state=seed), cutoff=CUT)  # order must not matter
    assert list(base.index) == list(after.index)
    pd.testing.assert_frame_equal(base, after, check_index_type=False)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(5, 80), late=st.lists(st.integers(90 * 86400, 400 * 86400), max_size=20))
def test_labels_depend_only_on_the_horizon(seed, n, late):
    ev = _log(seed, n)
    fs = build_event_features(ev, cutoff=CUT, horizon_days=90)
    # events at or beyond cutoff + horizon (and any type) never change labels or features
    extra = pd.DataFrame({"user_id": "c0", "timestamp": CUT + pd.to_timedelta(late, unit="s"),
                          "event_type": "purchase", "amount": 1.0, "channel": "web", "product": "a"})
    fs2 = build_event_features(pd.concat([ev, extra], ignore_index=True), cutoff=CUT, horizon_days=90)
    np.testing.assert_array_equal(fs.X, fs2.X)
    for k in fs.y:
        np.testing.assert_array_equal(fs.y[k], fs2.y[k])


def test_a_purchase_in_the_horizon_flips_the_labels():
    ev = pd.DataFrame({"user_id": ["a"], "timestamp": [CUT - pd.Timedelta(days=3)], "event_type": ["visit"],
                       "amount": [0.0], "channel": ["web"]})
    fs = build_event_features(ev, cutoff=CUT, horizon_days=30)
    assert fs.y["churn"].tolist() == [1.0] and fs.y["propensity"].tolist() == [0.0]
    ev2 = pd.concat([ev, pd.DataFrame({"user_id": ["a"], "timestamp": [CUT], "event_type": ["purchase"],
                                       "amount": [5.0], "channel": ["web"]})], ignore_index=True)
    fs2 = build_event_features(ev2, cutoff=CUT, horizon_days=30)
    assert fs2.y["churn"].tolist() == [0.0] and fs2.y["propensity"].tolist() == [1.0]
    np.testing.assert_array_equal(fs.X, fs2.X)


def test_features_by_hand():
    ev = pd.DataFrame({
        "user_id": ["a", "a", "a", "a"],
        "timestamp": [CUT - pd.Timedelta(days=d) for d in (100, 40, 10, 2)],
        "event_type": ["purchase", "purchase", "return", "purchase"],
        "amount": [10.0, 20.0, 5.0, 30.0], "channel": ["web", "app", "web", "web"], "product": ["x", "y", "x", "z"],
    })
    r = raw_event_features(ev, cutoff=CUT).loc["a"]
    assert r["recency_days"] == 2 and r["tenure_days"] == 100 and r["frequency"] == 3 and r["monetary"] == 60
    assert r["events_30d"] == 2 and r["purchases_90d"] == 2 and r["returns_90d"] == 1
    assert r["purchase_gap_days"] == 49 and r["distinct_products"] == 3 and r["distinct_channels"] == 2
    assert r["return_ratio"] == 0.25 and r["avg_purchase_amount"] == 20
    assert np.isclose(r["trend_30_vs_60"], (2 / 30 - 1 / 60) / (2 / 30 + 1 / 60))


def test_transaction_counts_occasions_not_lines():
    ev = pd.DataFrame({"user_id": ["a"] * 3, "timestamp": [CUT - pd.Timedelta(days=5)] * 2 + [CUT - pd.Timedelta(days=1)],
                       "event_type": ["purchase"] * 3, "amount": [1.0, 2.0, 3.0], "inv": ["i1", "i1", "i2"]})
    r = raw_event_features(ev, cutoff=CUT, schema=EventSchema(transaction="inv")).loc["a"]
    assert r["frequency"] == 2 and r["monetary"] == 6 and r["purchase_gap_days"] == 4
