"""Point-in-time customer features and labels, with a data-independent encoding.

Every partner applies the same declared bounds and transforms (clip -> log1p/identity -> fixed affine
map to [0, 1]) and fixed category vocabularies, so encodings agree across partners without sharing any
statistic.

Event logs: nothing at or after the cutoff reaches a feature (``ts < cutoff``); only events in
``[cutoff, cutoff + horizon)`` feed the labels. The population is every customer with at least one
activity event in the lookback window before the cutoff. Customer tables: one row per customer (unless a
contract allows capped snapshots), the label is a declared column.

The aggregation is vectorised over integer customer codes (bincount / ufunc.at), so it scales to tens of
millions of events; see benchmarks/bench_features.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from federation.errors import DataValidationError

DAY = pd.Timedelta(days=1)
TRANSFORMS = ("log1p", "identity")


@dataclass(frozen=True)
class NumericFeature:
    name: str
    lo: float
    hi: float
    transform: str = "log1p"  # log1p | identity

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"feature {self.name!r}: transform {self.transform!r} not in {TRANSFORMS}")
        if not self.hi > self.lo:
            raise ValueError(f"feature {self.name!r}: need hi > lo, got lo={self.lo}, hi={self.hi}")
        if self.transform == "log1p" and self.lo <= -1:
            raise ValueError(f"feature {self.name!r}: log1p needs lo > -1, got {self.lo}")

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
    vocabulary: tuple[str, ...]  # fixed, declared; anything else (and missing) -> "__other__"

    @property
    def columns(self) -> list[str]:
        return [f"{self.name}={v}" for v in self.vocabulary] + [f"{self.name}=__other__"]

    def encode(self, x: pd.Series) -> np.ndarray:
        vals = pd.Series(x).astype("string")
        idx = pd.Index(list(self.vocabulary)).get_indexer(vals.fillna("\x00__missing__"))
        idx = np.where(idx < 0, len(self.vocabulary), idx)
        out = np.zeros((len(vals), len(self.vocabulary) + 1), dtype=np.float32)
        if len(vals):
            out[np.arange(len(vals)), idx] = 1.0
        return out


@dataclass(frozen=True)
class EventSchema:
    """Which columns of an event log mean what, and which event types count as what.

    ``product`` and ``transaction`` are optional: a column that is absent from the log is skipped
    (distinct_products is then 0; each purchase row is its own purchase occasion).
    """

    customer_id: str = "user_id"
    timestamp: str = "timestamp"
    event_type: str = "event_type"
    amount: str = "amount"
    channel: str = "channel"
    activity_types: tuple[str, ...] = ("visit", "purchase", "support_ticket", "return")
    purchase_types: tuple[str, ...] = ("purchase",)
    support_types: tuple[str, ...] = ("support_ticket",)
    return_types: tuple[str, ...] = ("return",)
    product: str = "product"
    transaction: str = ""  # e.g. an invoice number: purchases are counted per distinct transaction


# Declared, data-independent encodings for the event-log features (a contract may override bounds).
EVENT_FEATURES: tuple[NumericFeature, ...] = (
    NumericFeature("recency_days", 0, 365),
    NumericFeature("tenure_days", 0, 3650),
    NumericFeature("frequency", 0, 500),  # purchase occasions in the lookback window
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
    NumericFeature("mean_gap_days", 0, 365),  # between activity events
    NumericFeature("distinct_channels", 0, 10, transform="identity"),
    NumericFeature("purchase_gap_days", 0, 365),  # mean inter-purchase gap (lookback if < 2 purchases)
    NumericFeature("distinct_products", 0, 1000),
    NumericFeature("return_ratio", 0, 1, transform="identity"),  # returns / (returns + purchases)
    NumericFeature("avg_purchase_amount", 0, 5_000),  # monetary / frequency
)
EVENT_FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in EVENT_FEATURES)


@dataclass(frozen=True)
class FeatureSet:
    """Encoded features and labels for one partner, one row per customer (the privacy unit).

    ``max_rows_per_customer`` > 1 only when a contract allows several snapshots per customer; the
    privacy accounting must then use group privacy of that size (or per-customer clipping).
    """

    customer_ids: np.ndarray
    X: np.ndarray  # float32 [n, d], every column in [0, 1] (trend: [0, 1] after affine map)
    y: dict[str, np.ndarray] = field(default_factory=dict)  # task -> float32 {0,1} [n]
    feature_names: tuple[str, ...] = ()
    max_rows_per_customer: int = 1

    def __len__(self) -> int:
        return len(self.customer_ids)


# ---------------------------------------------------------------------------- vectorised helpers
def _isin(values: pd.Series | np.ndarray, allowed: tuple[str, ...]) -> np.ndarray:
    """Boolean membership that stays fast for categoricals (looks up categories, not rows)."""
    s = values if isinstance(values, pd.Series) else pd.Series(values)
    if isinstance(s.dtype, pd.CategoricalDtype):
        hit = np.isin(np.asarray(s.cat.categories.astype(str)), list(allowed))
        codes = s.cat.codes.to_numpy()
        return np.where(codes >= 0, hit[np.maximum(codes, 0)], False)
    return s.astype("string").isin(list(allowed)).fillna(False).to_numpy(dtype=bool)


def _count(codes: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(codes[mask], minlength=n).astype(np.float64)


def _sum(codes: np.ndarray, mask: np.ndarray, w: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(codes[mask], weights=w[mask], minlength=n)


def _min(codes: np.ndarray, mask: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, np.inf)
    np.minimum.at(out, codes[mask], v[mask])
    return out


def _max(codes: np.ndarray, mask: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, -np.inf)
    np.maximum.at(out, codes[mask], v[mask])
    return out


def _distinct(codes: np.ndarray, mask: np.ndarray, other: np.ndarray, n: int) -> np.ndarray:
    """Per-customer number of distinct values of ``other`` (integer codes, -1 = missing) under mask."""
    m = mask & (other >= 0)
    pairs = pd.DataFrame({"c": codes[m], "o": other[m]}).drop_duplicates()
    return np.bincount(pairs["c"].to_numpy(), minlength=n).astype(np.float64)


def _days_before(ts: pd.Series, cutoff: pd.Timestamp) -> np.ndarray:
    t = ts.to_numpy()
    if not np.issubdtype(t.dtype, np.datetime64):
        t = pd.to_datetime(ts).to_numpy()
    return (np.datetime64(cutoff.to_datetime64()) - t) / np.timedelta64(1, "D")


ENGINES = ("pandas", "duckdb")


def raw_event_features(
    events: pd.DataFrame, *, cutoff: pd.Timestamp, schema: EventSchema = EventSchema(), lookback_days: int = 365,
    engine: str = "pandas",
) -> pd.DataFrame:
    """Per-customer raw (un-encoded) features from events strictly before ``cutoff``.

    Customers are those with at least one activity event in the lookback window before the cutoff;
    the frame is indexed by customer id (sorted), one column per name in ``EVENT_FEATURE_NAMES``.
    ``engine="duckdb"`` computes the same aggregates with DuckDB (federation.engine_duckdb); files too large for
    memory go through ``federation.engine_duckdb.read_event_features`` instead.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: use one of {ENGINES}")
    if engine == "duckdb":
        from federation.engine_duckdb import frame_event_features

        return frame_event_features(events, cutoff=pd.Timestamp(cutoff), schema=schema, lookback_days=lookback_days)
    s = schema
    cutoff = pd.Timestamp(cutoff)
    age_all = _days_before(events[s.timestamp], cutoff)
    b = age_all > 0  # strictly before the cutoff; NaT compares False
    ev = events.loc[b]
    age = age_all[b]
    codes, uniques = pd.factorize(ev[s.customer_id], sort=True)
    codes = codes.astype(np.int64)
    n = len(uniques)
    ok = codes >= 0  # rows with a missing customer id are not attributable: ignored
    win = ok & (age <= lookback_days)
    et = ev[s.event_type]
    act = _isin(et, s.activity_types) & win
    buy = _isin(et, s.purchase_types) & win
    sup = _isin(et, s.support_types) & win
    ret = _isin(et, s.return_types) & win
    if s.amount in ev:
        amount = pd.to_numeric(ev[s.amount], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        amount = np.nan_to_num(amount, nan=0.0, posinf=0.0, neginf=0.0)
    else:
        amount = np.zeros(len(ev))
    cz = np.where(ok, codes, 0)

    def occasions(mask: np.ndarray) -> np.ndarray:
        if s.transaction and s.transaction in ev:
            tx = pd.factorize(ev[s.transaction])[0].astype(np.int64)
            return _distinct(cz, mask, tx, n)
        return _count(cz, mask, n)

    a7, a30, a90 = act & (age <= 7), act & (age <= 30), act & (age <= 90)
    b30, b90 = buy & (age <= 30), buy & (age <= 90)
    base = {
        "recency_days": _min(cz, act, age, n), "tenure_days": _max(cz, ok, age, n), "frequency": occasions(buy),
        "monetary": _sum(cz, buy, amount, n), "events_7d": _count(cz, a7, n), "events_30d": _count(cz, a30, n),
        "events_90d": _count(cz, a90, n), "purchases_30d": occasions(b30), "purchases_90d": occasions(b90),
        "amount_30d": _sum(cz, b30, amount, n), "amount_90d": _sum(cz, b90, amount, n),
        "support_90d": _count(cz, sup & (age <= 90), n), "returns_90d": _count(cz, ret & (age <= 90), n),
        "events_30_90": _count(cz, act & (age > 30) & (age <= 90), n), "activity_events": _count(cz, act, n),
        "activity_oldest": _max(cz, act, age, n), "purchase_newest": _min(cz, buy, age, n),
        "purchase_oldest": _max(cz, buy, age, n), "return_rows": _count(cz, ret, n), "purchase_rows": _count(cz, buy, n),
        "distinct_channels": _distinct(cz, win, pd.factorize(ev[s.channel])[0].astype(np.int64), n)
        if s.channel and s.channel in ev else np.zeros(n),
        "distinct_products": _distinct(cz, win, pd.factorize(ev[s.product])[0].astype(np.int64), n)
        if s.product and s.product in ev else np.zeros(n),
    }
    return features_from_aggregates(pd.Index(uniques, name="customer_id"), base, lookback_days=lookback_days)


# Per-customer aggregates an engine computes; features_from_aggregates derives the features from them. Empty
# min/max are +inf/-inf, empty counts and sums 0. Every engine shares this arithmetic, so they agree exactly
# wherever their aggregates do (integer counts, min/max; sums of amounts up to floating-point summation order).
EVENT_AGGREGATES: tuple[str, ...] = (
    "recency_days", "tenure_days", "frequency", "monetary", "events_7d", "events_30d", "events_90d", "purchases_30d",
    "purchases_90d", "amount_30d", "amount_90d", "support_90d", "returns_90d", "events_30_90", "activity_events",
    "activity_oldest", "purchase_newest", "purchase_oldest", "return_rows", "purchase_rows", "distinct_channels",
    "distinct_products",
)


def features_from_aggregates(index: pd.Index, base: dict[str, np.ndarray], *, lookback_days: int) -> pd.DataFrame:
    """The feature frame (population = customers with an activity event in the lookback window) from the
    per-customer aggregates named in EVENT_AGGREGATES."""
    n = len(index)
    g = {k: np.asarray(base[k], dtype=np.float64) for k in EVENT_AGGREGATES}
    out = pd.DataFrame(index=index)
    for k in ("recency_days", "tenure_days", "frequency", "monetary", "events_7d", "events_30d", "events_90d",
              "purchases_30d", "purchases_90d", "amount_30d", "amount_90d", "support_90d", "returns_90d"):
        out[k] = g[k]
    recency, freq = g["recency_days"], g["frequency"]
    # Trend: last 30 days against the 60 before, per-day rates, in [-1, 1].
    r_recent = g["events_30d"] / 30.0
    r_before = g["events_30_90"] / 60.0
    denom = r_recent + r_before
    out["trend_30_vs_60"] = np.divide(r_recent - r_before, denom, out=np.zeros(n), where=denom > 0)
    # Mean gap between activity events (span / (n-1)); the lookback if fewer than 2 events.
    n_act = g["activity_events"]
    with np.errstate(invalid="ignore"):
        span = g["activity_oldest"] - recency
        pspan = g["purchase_oldest"] - g["purchase_newest"]
    out["mean_gap_days"] = np.where(n_act > 1, span / np.maximum(n_act - 1, 1), float(lookback_days))
    out["distinct_channels"] = g["distinct_channels"]
    # Inter-purchase gap: span of purchase times over (occasions - 1).
    out["purchase_gap_days"] = np.where(freq > 1, pspan / np.maximum(freq - 1, 1), float(lookback_days))
    out["distinct_products"] = g["distinct_products"]
    n_ret, n_buy_rows = g["return_rows"], g["purchase_rows"]
    tot = n_ret + n_buy_rows
    out["return_ratio"] = np.divide(n_ret, tot, out=np.zeros(n), where=tot > 0)
    out["avg_purchase_amount"] = np.divide(out["monetary"].to_numpy(), freq, out=np.zeros(n), where=freq > 0)
    # Population: customers active in the lookback window.
    out = out.loc[np.isfinite(recency)]
    return out[list(EVENT_FEATURE_NAMES)].astype(np.float64)


def event_labels(
    events: pd.DataFrame,
    customer_ids: np.ndarray,
    *,
    cutoff: pd.Timestamp,
    horizon_days: int,
    schema: EventSchema = EventSchema(),
) -> dict[str, np.ndarray]:
    """churn = no activity in [cutoff, cutoff+horizon); propensity = a purchase in that horizon."""
    s = schema
    cutoff = pd.Timestamp(cutoff)
    age = _days_before(events[s.timestamp], cutoff)  # <= 0 at/after the cutoff
    in_h = (age <= 0) & (age > -float(horizon_days))
    h = events.loc[in_h]
    pos = pd.Index(customer_ids).get_indexer(h[s.customer_id])
    et = h[s.event_type]
    n = len(customer_ids)
    active = np.bincount(pos[(pos >= 0) & _isin(et, s.activity_types)], minlength=n) > 0
    bought = np.bincount(pos[(pos >= 0) & _isin(et, s.purchase_types)], minlength=n) > 0
    return {"churn": (~active).astype(np.float32), "propensity": bought.astype(np.float32)}


def static_from_events(
    events: pd.DataFrame, columns: list[str], *, cutoff: pd.Timestamp, schema: EventSchema = EventSchema()
) -> pd.DataFrame:
    """Per-customer static attributes taken from the event log: the last value strictly before the cutoff."""
    cutoff = pd.Timestamp(cutoff)
    ev = events.loc[_days_before(events[schema.timestamp], cutoff) > 0, [schema.customer_id, schema.timestamp, *columns]]
    ev = ev.sort_values(schema.timestamp, kind="stable")
    return ev.groupby(schema.customer_id, sort=True)[columns].last()


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
    numeric: tuple[NumericFeature, ...] = EVENT_FEATURES,
    engine: str = "pandas",
) -> FeatureSet:
    """Event log (+ optional static attributes indexed by customer id) -> encoded FeatureSet.

    ``numeric`` lets a contract override the declared bounds of the event features (same names);
    ``engine`` picks the aggregation engine (see ``raw_event_features``; the result is the same).
    """
    cutoff = pd.Timestamp(cutoff)
    raw = raw_event_features(events, cutoff=cutoff, schema=schema, lookback_days=lookback_days, engine=engine)
    if static is not None and categorical:
        raw = raw.join(static[[c.name for c in categorical]], how="left")
    X, names = encode(raw, numeric, categorical)
    ids = raw.index.to_numpy()
    y = event_labels(events, ids, cutoff=cutoff, horizon_days=horizon_days, schema=schema)
    return FeatureSet(customer_ids=ids, X=X, y=y, feature_names=names)


def build_table_features(
    table: pd.DataFrame,
    *,
    customer_ids: np.ndarray,
    numeric: tuple[NumericFeature, ...],
    categorical: tuple[CategoricalFeature, ...] = (),
    labels: dict[str, np.ndarray],
    max_rows_per_customer: int = 1,
) -> FeatureSet:
    """Customer table (one row per customer, or capped snapshots) -> encoded FeatureSet."""
    X, names = encode(table, numeric, categorical)
    y = {k: np.asarray(v, dtype=np.float32) for k, v in labels.items()}
    return FeatureSet(customer_ids=np.asarray(customer_ids), X=X, y=y, feature_names=names,
                      max_rows_per_customer=int(max_rows_per_customer))
