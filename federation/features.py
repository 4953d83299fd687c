"""Point-in-time customer features and labels from a raw event log, with a data-independent encoding.

Every partner applies the same declared bounds and transforms (clip -> log1p/identity -> fixed affine
map to [0, 1]) and fixed category vocabularies, so encodings agree across partners without sharing any
statistic. Nothing at or after the cutoff reaches a feature; only events in (cutoff, cutoff+horizon]
feed the labels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from federation.errors import DataValidationError

DAY = pd.Timedelta(days=1)


@dataclass(frozen=True)
class NumericFeature:
    name: str
    lo: float
    hi: float
    transform: str = "log1p"  # log1p | identity

    def encode(self, x: np.ndarray) -> np.ndarray:
        x = np.clip(np.nan_to_num(np.asarray(x, dtype=np.float64), nan=self.lo), self.lo, self.hi)
        if self.transform == "log1p":
            lo, hi = math.log1p(self.lo), math.log1p(self.hi)
            t = np.log1p(x)
        else:
            lo, hi, t = self.lo, self.hi, x
        return ((t - lo) / (hi - lo)).astype(np.float32)


@dataclass(frozen=True)
class CategoricalFeature:
    name: str
    vocabulary: tuple[str, ...]  # fixed, declared; anything else -> "__other__"

    @property
    def columns(self) -> list[str]:
        return [f"{self.name}={v}" for v in self.vocabulary] + [f"{self.name}=__other__"]

    def encode(self, x: pd.Series) -> np.ndarray:
        vals = x.astype("string").fillna("__other__").to_numpy()
        out = np.zeros((len(vals), len(self.vocabulary) + 1), dtype=np.float32)
        index = {v: i for i, v in enumerate(self.vocabulary)}
        idx = np.array([index.get(v, len(self.vocabulary)) for v in vals], dtype=np.int64)
        if len(vals):
            out[np.arange(len(vals)), idx] = 1.0
        return out


@dataclass(frozen=True)
class EventSchema:
    """Which columns of an event log mean what, and which event types count as what."""

    customer_id: str = "user_id"
    timestamp: str = "timestamp"
    event_type: str = "event_type"
    amount: str = "amount"
    channel: str = "channel"
    activity_types: tuple[str, ...] = ("visit", "purchase", "support_ticket", "return")
    purchase_types: tuple[str, ...] = ("purchase",)
    support_types: tuple[str, ...] = ("support_ticket",)
    return_types: tuple[str, ...] = ("return",)


# Declared, data-independent encodings for the event-log features.
EVENT_FEATURES: tuple[NumericFeature, ...] = (
    NumericFeature("recency_days", 0, 365),
    NumericFeature("tenure_days", 0, 3650),
    NumericFeature("frequency", 0, 500),  # purchases in the lookback window
    NumericFeature("monetary", 0, 50_000),  # purchase amount in the lookback window
    NumericFeature("events_7d", 0, 100),
    NumericFeature("events_30d", 0, 300),
    NumericFeature("events_90d", 0, 1000),
    NumericFeature("purchases_30d", 0, 100),
    NumericFeature("purchases_90d", 0, 300),
    NumericFeature("amount_30d", 0, 10_000),
    NumericFeature("amount_90d", 0, 30_000),
    NumericFeature("support_90d", 0, 50),
    NumericFeature("returns_90d", 0, 50),
    NumericFeature("trend_30_vs_60", -1, 1, transform="identity"),
    NumericFeature("mean_gap_days", 0, 365),
    NumericFeature("distinct_channels", 0, 10, transform="identity"),
)


@dataclass(frozen=True)
class FeatureSet:
    """Encoded features and labels for one partner, one row per customer (the privacy unit)."""

    customer_ids: np.ndarray
    X: np.ndarray  # float32 [n, d], every column in [0, 1] (trend: [0, 1] after affine map)
    y: dict[str, np.ndarray] = field(default_factory=dict)  # task -> float32 {0,1} [n]
    feature_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.customer_ids)


def raw_event_features(
    events: pd.DataFrame, *, cutoff: pd.Timestamp, schema: EventSchema = EventSchema(), lookback_days: int = 365
) -> pd.DataFrame:
    """Per-customer raw (un-encoded) features from events strictly before ``cutoff``.

    Customers are those with at least one activity event in the lookback window before the cutoff.
    """
    s = schema
    cutoff = pd.Timestamp(cutoff)
    ts = pd.to_datetime(events[s.timestamp])
    before = events.loc[(ts < cutoff).to_numpy()]
    before_ts = ts[(ts < cutoff).to_numpy()]
    age = ((cutoff - before_ts) / DAY).to_numpy()  # > 0
    etype = before[s.event_type].astype("string").to_numpy()
    is_act = np.isin(etype, s.activity_types)
    is_buy = np.isin(etype, s.purchase_types)
    is_sup = np.isin(etype, s.support_types)
    is_ret = np.isin(etype, s.return_types)
    amount = pd.to_numeric(before[s.amount], errors="coerce").fillna(0.0).to_numpy() if s.amount in before else 0.0
    cid = before[s.customer_id].to_numpy()
    win = age <= lookback_days

    frame = pd.DataFrame(
        {
            "cid": cid,
            "age": age,
            "act": is_act & win,
            "buy": is_buy & win,
            "buy_amt": np.where(is_buy & win, amount, 0.0),
            "e7": is_act & (age <= 7),
            "e30": is_act & (age <= 30),
            "e90": is_act & (age <= 90),
            "e30_90": is_act & (age > 30) & (age <= 90),
            "p30": is_buy & (age <= 30),
            "p90": is_buy & (age <= 90),
            "a30": np.where(is_buy & (age <= 30), amount, 0.0),
            "a90": np.where(is_buy & (age <= 90), amount, 0.0),
            "s90": is_sup & (age <= 90),
            "r90": is_ret & (age <= 90),
            "act_age": np.where(is_act, age, np.nan),
        }
    )
    g = frame.groupby("cid", sort=True)
    out = pd.DataFrame(
        {
            "recency_days": g["act_age"].min(),
            "tenure_days": g["age"].max(),
            "frequency": g["buy"].sum(),
            "monetary": g["buy_amt"].sum(),
            "events_7d": g["e7"].sum(),
            "events_30d": g["e30"].sum(),
            "events_90d": g["e90"].sum(),
            "purchases_30d": g["p30"].sum(),
            "purchases_90d": g["p90"].sum(),
            "amount_30d": g["a30"].sum(),
            "amount_90d": g["a90"].sum(),
            "support_90d": g["s90"].sum(),
            "returns_90d": g["r90"].sum(),
            "_e30_90": g["e30_90"].sum(),
            "_n_act": g["act"].sum(),
        }
    )
    # Trend: last 30 days against the 60 before, per-day rates, in [-1, 1].
    r_recent = out["events_30d"] / 30.0
    r_before = out.pop("_e30_90") / 60.0
    out["trend_30_vs_60"] = ((r_recent - r_before) / (r_recent + r_before)).fillna(0.0)
    # Mean gap between activity events in the window (span / (n-1)), lookback if fewer than 2 events.
    n_act = out.pop("_n_act")
    span = frame.loc[frame["act"]].groupby("cid")["age"].agg(lambda a: a.max() - a.min())
    span = span.reindex(out.index).fillna(0.0)
    out["mean_gap_days"] = np.where(n_act > 1, span / (n_act - 1).clip(lower=1), float(lookback_days))
    if s.channel in before:
        ch = pd.DataFrame({"cid": cid, "ch": before[s.channel].to_numpy()})
        out["distinct_channels"] = ch.groupby("cid")["ch"].nunique().reindex(out.index).fillna(0)
    else:
        out["distinct_channels"] = 0.0
    # Population: customers active in the lookback window.
    out = out.loc[out["recency_days"].notna() & (out["recency_days"] <= lookback_days)]
    out["recency_days"] = out["recency_days"].fillna(float(lookback_days))
    out.index.name = "customer_id"
    return out.astype(np.float64)


def event_labels(
    events: pd.DataFrame,
    customer_ids: np.ndarray,
    *,
    cutoff: pd.Timestamp,
    horizon_days: int,
    schema: EventSchema = EventSchema(),
) -> dict[str, np.ndarray]:
    """churn = no activity in (cutoff, cutoff+horizon]; propensity = a purchase in that horizon."""
    s = schema
    cutoff = pd.Timestamp(cutoff)
    ts = pd.to_datetime(events[s.timestamp])
    in_h = ((ts >= cutoff) & (ts < cutoff + horizon_days * DAY)).to_numpy()
    h = events.loc[in_h]
    et = h[s.event_type].astype("string").to_numpy()
    active = set(h.loc[np.isin(et, s.activity_types), s.customer_id].tolist())
    bought = set(h.loc[np.isin(et, s.purchase_types), s.customer_id].tolist())
    ids = list(customer_ids)
    return {
        "churn": np.array([c not in active for c in ids], dtype=np.float32),
        "propensity": np.array([c in bought for c in ids], dtype=np.float32),
    }


def encode(raw: pd.DataFrame, numeric: tuple[NumericFeature, ...], categorical: tuple[CategoricalFeature, ...] = ()):
    """Apply declared encodings; returns (X float32, feature names). Missing columns are an error."""
    missing = [f.name for f in numeric + categorical if f.name not in raw.columns]
    if missing:
        raise DataValidationError(
            [f"column {m!r} is required by the feature encoding but absent" for m in missing], source="features"
        )
    blocks = [np.stack([f.encode(raw[f.name].to_numpy()) for f in numeric], axis=1)] if numeric else []
    names = [f.name for f in numeric]
    for c in categorical:
        blocks.append(c.encode(raw[c.name]))
        names += c.columns
    X = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(raw), 0), np.float32)
    return X.astype(np.float32), tuple(names)


def build_event_features(
    events: pd.DataFrame,
    *,
    cutoff: str | pd.Timestamp,
    horizon_days: int,
    schema: EventSchema = EventSchema(),
    static: pd.DataFrame | None = None,
    categorical: tuple[CategoricalFeature, ...] = (),
    lookback_days: int = 365,
) -> FeatureSet:
    """Event log (+ optional static attributes indexed by customer id) -> encoded FeatureSet."""
    cutoff = pd.Timestamp(cutoff)
    raw = raw_event_features(events, cutoff=cutoff, schema=schema, lookback_days=lookback_days)
    if static is not None and categorical:
        raw = raw.join(static[[c.name for c in categorical]], how="left")
    X, names = encode(raw, EVENT_FEATURES, categorical)
    ids = raw.index.to_numpy()
    y = event_labels(events, ids, cutoff=cutoff, horizon_days=horizon_days, schema=schema)
    return FeatureSet(customer_ids=ids, X=X, y=y, feature_names=names)
