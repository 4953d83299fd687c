"""The data contract: one declaration, applied identically at every partner.

A contract says which columns mean what, which event values count as activity / purchase / return,
the cutoff and label horizon, and the declared bounds, transforms and vocabularies of every feature.
Because all encodings are declared, partners produce comparable features without sharing any statistic.

Contracts are YAML files (``conf/contracts/<name>.yaml``); a Hydra data config (``conf/data/<name>.yaml``)
points at one with ``contract: contracts/<name>.yaml``. ``load_contract`` accepts either file.
Relative data paths are resolved against ``$FEDPROP_DATA_DIR``, else ``<repo>/../shared/data``.

``contract_hash()`` covers everything that shapes features and labels, and deliberately not the local
file locations (``source``), so every partner's model card shows the same hash for the same contract.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from federation.errors import ConfigError
from federation.features import (
    EVENT_FEATURES,
    TRANSFORMS,
    CategoricalFeature,
    EventSchema,
    FeatureSet,
    NumericFeature,
    build_event_features,
    build_table_features,
    static_from_events,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR_ENV = "FEDPROP_DATA_DIR"
KINDS = ("events", "table")
FORMATS = ("auto", "csv", "parquet", "sql")


def data_dir() -> Path:
    """Where relative data paths point: $FEDPROP_DATA_DIR, else <repo>/../shared/data."""
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(env).expanduser() if env else (REPO_ROOT.parent / "shared" / "data")


@dataclass(frozen=True)
class SourceSpec:
    files: tuple[str, ...] = ()
    format: str = "auto"  # auto (from suffix) | csv | parquet | sql
    sep: str = ","
    decimal: str = "."  # CSV: the decimal mark of numbers ("," for 12,5 exports; then sep must not be ",")
    encoding: str = "utf-8"
    chunksize: int = 200_000  # CSV rows per chunk (memory stays bounded by the contract's columns)
    url: str = ""  # sql: SQLAlchemy URL
    query: str = ""  # sql: SELECT ...


@dataclass(frozen=True)
class ColumnMap:
    customer_id: str = ""  # empty for a customer table without ids: each row is one customer
    timestamp: str = ""
    timestamp_format: str = ""  # strptime format; empty = ISO 8601
    event_type: str = ""
    amount: tuple[str, ...] = ()  # one column, or several multiplied (e.g. Quantity x UnitPrice)
    channel: str = ""
    product: str = ""
    transaction: str = ""
    label: str = ""


@dataclass(frozen=True)
class EventRules:
    event_type_rule: str = "value"  # value: the column holds the type | prefix: map value prefixes
    event_type_map: tuple[tuple[str, str], ...] = ()  # prefix -> type (rule=prefix)
    event_type_default: str = ""  # type of values matching no prefix (rule=prefix)
    activity: tuple[str, ...] = ("visit", "purchase", "support_ticket", "return")
    purchase: tuple[str, ...] = ("purchase",)
    returns: tuple[str, ...] = ("return",)
    support: tuple[str, ...] = ("support_ticket",)
    amount_nonnegative: bool = True  # purchase events with a negative amount are a problem
    drop_missing_customer: bool = False  # rows without a customer id cannot be attributed: drop (reported)
    cutoff: str = ""
    horizon_days: int = 90
    lookback_days: int = 365
    feature_bounds: tuple[NumericFeature, ...] = EVENT_FEATURES


@dataclass(frozen=True)
class TableFeature:
    column: str
    kind: str = "numeric"  # numeric | categorical
    lo: float = 0.0
    hi: float = 1.0
    transform: str = "identity"
    vocabulary: tuple[str, ...] = ()
    fill: float | None = None  # numeric: value for missing cells; None = missing is a problem

    def encoder(self) -> NumericFeature | CategoricalFeature:
        if self.kind == "numeric":
            return NumericFeature(self.column, float(self.lo), float(self.hi), self.transform)
        return CategoricalFeature(self.column, tuple(str(v) for v in self.vocabulary))


@dataclass(frozen=True)
class LabelSpec:
    column: str = ""
    positive: tuple[str, ...] = ("1",)
    negative: tuple[str, ...] = ("0",)
    task: str = "churn"  # the FeatureSet.y key: churn | propensity


CHECK_LEVELS = ("note", "error")


@dataclass(frozen=True)
class CheckSpec:
    """How strict validation is (does not shape features, so not part of the contract hash)."""

    out_of_vocabulary: str = "note"  # categorical values outside the vocabulary (encoded as __other__)
    out_of_bounds: str = "note"  # numeric values outside [lo, hi] (clipped by the encoding)


@dataclass(frozen=True)
class DataContract:
    name: str
    kind: str  # events | table
    source: SourceSpec = field(default_factory=SourceSpec)
    columns: ColumnMap = field(default_factory=ColumnMap)
    events: EventRules = field(default_factory=EventRules)
    features: tuple[TableFeature, ...] = ()  # table: the declared features
    static: tuple[TableFeature, ...] = ()  # events: per-customer attributes (last value before cutoff)
    label: LabelSpec = field(default_factory=LabelSpec)
    deduplicate: bool = False  # drop exact duplicate rows before anything else (reported)
    max_rows_per_customer: int = 1  # > 1 allows snapshots; privacy accounting must use this group size
    excluded_columns: tuple[str, ...] = ()  # documented exclusions (e.g. leaking columns): never features
    min_customers: int = 100  # fewer customers at one partner: DP noise swamps the signal
    description: str = ""
    checks: CheckSpec = field(default_factory=CheckSpec)

    # ---- derived views
    def schema(self) -> EventSchema:
        """The event schema of a validated frame (``federation.validation`` names the core columns)."""
        c, e = self.columns, self.events
        return EventSchema(
            customer_id="__cid", timestamp="__ts", event_type="__event_type",
            amount="__amount", channel=c.channel, product=c.product, transaction=c.transaction,
            activity_types=e.activity, purchase_types=e.purchase, support_types=e.support, return_types=e.returns,
        )

    def required_columns(self) -> list[str]:
        """Every source column the contract reads, in a stable order, without duplicates."""
        c = self.columns
        cols = [c.customer_id, c.timestamp, c.event_type, *c.amount, c.channel, c.product, c.transaction]
        cols += [f.column for f in self.static] + [f.column for f in self.features]
        cols += [self.label.column if self.kind == "table" else ""]
        return list(dict.fromkeys(x for x in cols if x))

    def identity(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        d.pop("checks")  # strictness of validation, not the features: the hash is the same at every partner
        return d

    def contract_hash(self) -> str:
        """SHA-256 over the canonical JSON of everything that shapes features and labels (not file paths)."""
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"), default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def replace(self, **kw: Any) -> "DataContract":
        return dataclasses.replace(self, **kw)

    def with_events(self, **kw: Any) -> "DataContract":
        return dataclasses.replace(self, events=dataclasses.replace(self.events, **kw))

    def feature_names(self) -> tuple[str, ...]:
        """Encoded column names, in order, known without reading data (the server builds the model from it)."""
        if self.kind == "events":
            names = [f.name for f in self.events.feature_bounds]
            cats = [f.encoder() for f in self.static if f.kind == "categorical"]
        else:
            names = [f.column for f in self.features if f.kind == "numeric"]
            cats = [f.encoder() for f in self.features if f.kind == "categorical"]
        for c in cats:
            names += c.columns
        return tuple(names)

    def tasks(self) -> tuple[str, ...]:
        """The label heads this data provides: both for event logs, the declared one for a table."""
        return ("churn", "propensity") if self.kind == "events" else (self.label.task,)

    def resolve_files(self) -> list[Path]:
        return [resolve_data_path(f) for f in self.source.files]


def build_features(frame, contract: DataContract) -> FeatureSet:
    """Validated frame (from ``federation.validation.read_validated``) -> encoded FeatureSet.

    Event logs: point-in-time features at ``events.cutoff``, labels {"churn", "propensity"}.
    Customer tables: the declared features, label under ``label.task``; customer ids are the id column,
    or ``row-<i>`` (the source's data row i, 0 = the first row after the header) when the table has none.
    """
    import numpy as np

    c = contract
    if c.kind == "events":
        static = None
        if c.static:
            static = static_from_events(frame, [f.column for f in c.static], cutoff=c.events.cutoff, schema=c.schema())
        fs = build_event_features(
            frame, cutoff=c.events.cutoff, horizon_days=c.events.horizon_days, schema=c.schema(), static=static,
            categorical=tuple(f.encoder() for f in c.static if f.kind == "categorical"),
            lookback_days=c.events.lookback_days, numeric=c.events.feature_bounds,
        )
        return fs
    ids = frame["__cid"].to_numpy() if "__cid" in frame else np.array([f"row-{i}" for i in frame.index], dtype=object)
    return build_table_features(
        frame, customer_ids=ids, numeric=tuple(f.encoder() for f in c.features if f.kind == "numeric"),
        categorical=tuple(f.encoder() for f in c.features if f.kind == "categorical"),
        labels={c.label.task: frame["__label"].to_numpy()}, max_rows_per_customer=c.max_rows_per_customer,
    )


def contract_feature_names(data_cfg: Any) -> tuple[str, ...]:
    """Feature layout of the contract a ``DataConfig`` names (no data is read)."""
    return load_contract(data_cfg.contract).feature_names()


def resolve_data_path(p: str | os.PathLike) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else data_dir() / path


def resolve_conf_path(p: str | os.PathLike) -> Path:
    """A contract path: absolute, relative to the cwd, or relative to <repo>/conf or <repo>."""
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path
    for base in (REPO_ROOT / "conf", REPO_ROOT):
        if (base / path).exists():
            return base / path
    return path


# ---------------------------------------------------------------------------- parsing (closed, typed)
def _tuple(v: Any, key: str) -> tuple:
    if v is None:
        return ()
    if isinstance(v, (str, int, float)):
        return (str(v),)
    if isinstance(v, (list, tuple)):
        return tuple(v)
    raise ConfigError(f"{key} must be a list, got {v!r}")


def _strs(v: Any, key: str) -> tuple[str, ...]:
    return tuple(str(x) for x in _tuple(v, key))


def _check_keys(data: Mapping[str, Any], cls: type, prefix: str) -> None:
    known = [f.name for f in fields(cls)]
    for k in data:
        if k not in known:
            near = difflib.get_close_matches(str(k), known, n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; known: {', '.join(known)}"
            raise ConfigError(f"unknown contract key {prefix}{k}{hint}")


def _num(v: Any, key: str, kind: type = float) -> Any:
    try:
        if kind is int and (isinstance(v, bool) or (isinstance(v, float) and not v.is_integer())):
            raise ValueError
        return kind(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={v!r} must be {'an integer' if kind is int else 'a number'}") from None


def _feature(d: Mapping[str, Any], key: str) -> TableFeature:
    if not isinstance(d, Mapping) or "column" not in d:
        raise ConfigError(f"{key} must be a mapping with at least 'column', got {d!r}")
    _check_keys(d, TableFeature, key + ".")
    kind = d.get("kind", "numeric")
    if kind not in ("numeric", "categorical"):
        raise ConfigError(f"{key}.kind={kind!r}: use numeric or categorical")
    tr = d.get("transform", "identity")
    if tr not in TRANSFORMS:
        raise ConfigError(f"{key}.transform={tr!r}: use one of {', '.join(TRANSFORMS)}")
    f = TableFeature(
        column=str(d["column"]), kind=kind, lo=_num(d.get("lo", 0.0), key + ".lo"),
        hi=_num(d.get("hi", 1.0), key + ".hi"), transform=tr, vocabulary=_strs(d.get("vocabulary"), key + ".vocabulary"),
        fill=None if d.get("fill") is None else _num(d["fill"], key + ".fill"),
    )
    if kind == "numeric" and math.isfinite(f.lo) and math.isfinite(f.hi) and not f.hi > f.lo:
        raise ConfigError(f"{key}: need hi > lo (declared bounds), got lo={f.lo}, hi={f.hi}")
    if kind == "categorical" and not f.vocabulary:
        raise ConfigError(f"{key}: a categorical feature needs a declared vocabulary")
    return f


def contract_from_dict(data: Mapping[str, Any]) -> DataContract:
    """Plain dict (parsed YAML) -> DataContract; unknown or ill-typed keys raise ConfigError by full key."""
    _check_keys(data, DataContract, "")
    for req in ("name", "kind"):
        if req not in data:
            raise ConfigError(f"contract key {req!r} is required")
    if data["kind"] not in KINDS:
        raise ConfigError(f"kind={data['kind']!r}: use one of {', '.join(KINDS)}")
    src = dict(data.get("source") or {})
    _check_keys(src, SourceSpec, "source.")
    src["files"] = _strs(src.get("files"), "source.files")
    source = SourceSpec(**src)
    if source.format not in FORMATS:
        raise ConfigError(f"source.format={source.format!r}: use one of {', '.join(FORMATS)}")
    if source.decimal not in (".", ","):
        raise ConfigError(f"source.decimal={source.decimal!r}: use '.' or ','")
    if source.decimal == source.sep:
        raise ConfigError(f"source.decimal and source.sep are both {source.sep!r}: a file with decimal commas is "
                          "separated by another character (set source.sep, e.g. ';')")
    cols = dict(data.get("columns") or {})
    _check_keys(cols, ColumnMap, "columns.")
    cols["amount"] = _strs(cols.get("amount"), "columns.amount")
    columns = ColumnMap(**{k: (v if k == "amount" else ("" if v is None else str(v))) for k, v in cols.items()})
    ev = dict(data.get("events") or {})
    _check_keys(ev, EventRules, "events.")
    for k in ("activity", "purchase", "returns", "support"):
        if k in ev:
            ev[k] = _strs(ev[k], f"events.{k}")
    if "event_type_map" in ev:
        m = ev["event_type_map"] or {}
        if not isinstance(m, Mapping):
            raise ConfigError("events.event_type_map must be a mapping prefix -> event type")
        ev["event_type_map"] = tuple((str(k), str(v)) for k, v in m.items())
    if ev.get("event_type_rule", "value") not in ("value", "prefix"):
        raise ConfigError(f"events.event_type_rule={ev['event_type_rule']!r}: use value or prefix")
    if "feature_bounds" in ev:
        base = {f.name: f for f in EVENT_FEATURES}
        over = ev["feature_bounds"] or {}
        for name, spec in over.items():
            if name not in base:
                near = difflib.get_close_matches(str(name), list(base), n=1)
                raise ConfigError(f"events.feature_bounds.{name}: no such event feature"
                                  + (f"; did you mean {near[0]}?" if near else ""))
            spec = list(spec)
            tr = spec[2] if len(spec) > 2 else base[name].transform
            try:
                base[name] = NumericFeature(name, float(spec[0]), float(spec[1]), tr)
            except (ValueError, IndexError) as exc:
                raise ConfigError(f"events.feature_bounds.{name}: {exc} (write [lo, hi] or [lo, hi, transform])")
        ev["feature_bounds"] = tuple(base[f.name] for f in EVENT_FEATURES)
    if "cutoff" in ev:
        ev["cutoff"] = str(ev["cutoff"])
    events = EventRules(**ev)
    lab = dict(data.get("label") or {})
    _check_keys(lab, LabelSpec, "label.")
    for k in ("positive", "negative"):
        if k in lab:
            lab[k] = _strs(lab[k], f"label.{k}")
    label = LabelSpec(**lab)
    if label.task not in ("churn", "propensity"):
        raise ConfigError(f"label.task={label.task!r}: use churn or propensity")
    c = DataContract(
        name=str(data["name"]), kind=data["kind"], source=source, columns=columns, events=events,
        features=tuple(_feature(f, f"features[{i}]") for i, f in enumerate(data.get("features") or [])),
        static=tuple(_feature(f, f"static[{i}]") for i, f in enumerate(data.get("static") or [])),
        label=label, deduplicate=bool(data.get("deduplicate", False)),
        max_rows_per_customer=_num(data.get("max_rows_per_customer", 1), "max_rows_per_customer", int),
        excluded_columns=_strs(data.get("excluded_columns"), "excluded_columns"),
        min_customers=_num(data.get("min_customers", 100), "min_customers", int), description=str(data.get("description", "")),
        checks=_checks(data.get("checks")),
    )
    problems = contract_problems(c)
    if len(problems) == 1:
        raise ConfigError(f"contract {c.name!r}: {problems[0]}")
    if problems:
        raise ConfigError(f"contract {c.name!r} is inconsistent ({len(problems)} problems):\n"
                          + "\n".join(f"  - {p}" for p in problems))
    return c


def _checks(d: Any) -> CheckSpec:
    d = dict(d or {})
    _check_keys(d, CheckSpec, "checks.")
    spec = CheckSpec(**{k: str(v) for k, v in d.items()})
    for k in ("out_of_vocabulary", "out_of_bounds"):
        if getattr(spec, k) not in CHECK_LEVELS:
            raise ConfigError(f"checks.{k}={getattr(spec, k)!r}: use one of {', '.join(CHECK_LEVELS)}")
    return spec


def _bound_problems(key: str, lo: float, hi: float, transform: str) -> list[str]:
    import math

    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [f"{key}: bounds must be finite numbers, got lo={lo}, hi={hi} (a non-finite bound encodes every "
                "value to the same number, so the feature carries nothing): declare a public domain bound"]
    if transform == "log1p" and lo < 0:
        return [f"{key}: lo={lo} is negative but the transform is log1p (for counts and amounts >= 0): use lo: 0 "
                "or transform: identity"]
    return []


def _date_problem(key: str, value: str) -> list[str]:
    import datetime as _dt

    try:
        _dt.datetime.fromisoformat(str(value))
    except ValueError:
        return [f"{key}={value!r} is not a valid date (write YYYY-MM-DD, a real calendar day): fix the contract "
                "or the data config, not the data"]
    return []


def contract_problems(c: DataContract) -> list[str]:
    p: list[str] = []
    if c.min_customers < 1:
        p.append(f"min_customers={c.min_customers} must be >= 1 (the fewest customers a partner may train on; "
                 "the defaults use 100)")
    for group, feats in (("features", c.features), ("static", c.static)):
        for i, f in enumerate(feats):
            if f.kind == "numeric":
                p += _bound_problems(f"{group}[{i}] ({f.column})", f.lo, f.hi, f.transform)
                if f.fill is not None and not (f.lo <= f.fill <= f.hi):
                    p.append(f"{group}[{i}] ({f.column}): fill={f.fill} is outside [lo, hi] = [{f.lo}, {f.hi}]")
    for f in c.events.feature_bounds:
        p += _bound_problems(f"events.feature_bounds.{f.name}", f.lo, f.hi, f.transform)
    if c.max_rows_per_customer < 1:
        p.append(f"max_rows_per_customer={c.max_rows_per_customer} must be >= 1 (1 = one row per customer)")
    if c.max_rows_per_customer > 1 and not c.columns.customer_id:
        p.append("max_rows_per_customer > 1 needs columns.customer_id, or the cap cannot be enforced")
    used = {f.column for f in c.features + c.static}
    for x in c.excluded_columns:
        if x in used:
            p.append(f"column {x!r} is listed in excluded_columns and used as a feature; remove one")
    if c.label.column and c.label.column in used:
        p.append(f"label column {c.label.column!r} is also a feature: that leaks the label")
    if set(c.label.positive) & set(c.label.negative):
        p.append(f"label values {sorted(set(c.label.positive) & set(c.label.negative))} are both positive and negative")
    if c.kind == "events":
        for k in ("customer_id", "timestamp", "event_type"):
            if not getattr(c.columns, k):
                p.append(f"columns.{k} is required for an event log")
        if not c.events.cutoff:
            p.append("events.cutoff is required for an event log (the point-in-time boundary)")
        else:
            p += _date_problem("events.cutoff", c.events.cutoff)
        if c.events.horizon_days < 1 or c.events.lookback_days < 1:
            p.append("events.horizon_days and events.lookback_days must be >= 1")
        if c.events.event_type_rule == "prefix" and not c.events.event_type_default:
            p.append("events.event_type_default is required with event_type_rule: prefix")
    else:
        if not c.label.column:
            p.append("label.column is required for a customer table")
        if not c.features:
            p.append("a customer table needs declared features")
    if c.source.format == "sql" and not (c.source.url and c.source.query):
        p.append("source.format=sql needs source.url and source.query")
    return p


def load_contract(path: str | os.PathLike) -> DataContract:
    """Load a contract YAML, or a Hydra data config whose ``contract:`` key points at one."""
    p = resolve_conf_path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"contract file {str(path)!r} not found (looked in the cwd, {REPO_ROOT / 'conf'}, {REPO_ROOT})")
    except yaml.YAMLError as exc:
        raise ConfigError(f"contract file {str(p)!r} is not valid YAML: {exc}")
    if not isinstance(data, Mapping):
        raise ConfigError(f"contract file {str(p)!r} must hold a mapping")
    if "contract" in data and "columns" not in data:
        return load_contract(data["contract"])
    try:
        return contract_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"contract file {str(p)!r}: {exc}") from None


def contract_to_yaml(c: DataContract) -> str:
    d = dataclasses.asdict(c)
    d["events"]["event_type_map"] = dict(c.events.event_type_map)
    d["events"]["feature_bounds"] = {f.name: [f.lo, f.hi, f.transform] for f in c.events.feature_bounds}
    return yaml.safe_dump(json.loads(json.dumps(d)), sort_keys=False)


# ---------------------------------------------------------------------------- proposing a contract
PROPOSAL_WARNING = (
    "WARNING: these bounds and vocabularies were proposed from ONE partner's data. They are NOT differentially\n"
    "private (min/max and category lists reveal individual records) and they may not fit other partners.\n"
    "Review and coarsen them (round bounds to public domain knowledge, drop rare categories) before the\n"
    "federation uses this contract."
)


LABEL_NAMES = ("churn", "churned", "exited", "attrition", "attrited", "label", "target", "y", "class", "outcome",
               "response", "responded", "converted", "conversion", "purchased", "subscribed", "deposit", "default",
               "status")
CHURN_NAMES = ("churn", "churned", "exited", "attrition", "attrited", "left", "cancelled", "canceled")
POSITIVE_VALUES = ("1", "yes", "y", "true", "t", "churn", "churned", "exited", "attrited", "positive", "1.0")
ID_NAMES = ("id", "customerid", "customer_id", "customer", "clientid", "client_id", "accountid", "account_id", "userid",
            "user_id", "cust_id", "custid", "rownumber", "row_number", "index")
TIME_NAMES = ("timestamp", "time", "date", "datetime", "ts", "event_time", "eventtime", "created_at", "invoicedate")


# names that exact lists miss in real exports ("Client Number", "Order Time", "Subscriber Key"): a customer-ish
# word followed by an id-ish one; a name ending in date/time/timestamp (or "_at")
ID_PATTERN = r"^(customer|client|cust|account|acct|user|member|subscriber|contract|policyholder)_?(id|number|no|num|key|ref|code)$"
TIME_PATTERN = r"(date|time|timestamp|datetime)$|_at$|_ts$"


def _pick_pattern(columns, pattern: str, accept=lambda c: True) -> str:
    """The first column whose normalised name matches ``pattern`` and whose values ``accept``; else ""."""
    import re

    for c in columns:
        if re.search(pattern, _norm(c)) and accept(c):
            return c
    return ""


def _norm(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum() or ch == "_")


def _pick(columns, names: tuple[str, ...]) -> str:
    by = {_norm(c): c for c in columns}
    for n in names:
        if n in by:
            return by[n]
    return ""


def _id_like(s) -> bool:
    """Unique per row and not a measurement: an identifier, never a feature."""
    n = int(s.notna().sum())
    if n <= 20 or int(s.nunique(dropna=True)) != n:
        return False
    import pandas as pd

    num = pd.to_numeric(s.astype("string").str.strip(), errors="coerce")
    # text ids, or whole numbers (a unique float measurement such as a balance is not an id)
    return bool(num.isna().any() or (num.dropna() == num.dropna().round()).all())


def _date_like(text) -> bool:
    """Most of a text column's values are dates (03/15/2021, 2021-03-15, 15.03.2021; with or without a time)."""
    import re

    head = text.head(2000)
    return bool(head.str.fullmatch(r"\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}([ T]\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?)?",
                                   flags=re.ASCII).mean() > 0.9)


def _draft_cutoff(ts, *, horizon_days: int) -> str:
    """The last day whose whole label horizon lies inside the sample (review it: it must be the same everywhere)."""
    import pandas as pd

    import warnings

    text = ts.dropna().astype("string").str.strip()
    if len(text) and text.str.fullmatch(r"\d{9,13}").mean() > 0.9:  # epoch numbers: not dates fedprop reads
        return "YYYY-MM-DD"
    with warnings.catch_warnings():  # pandas' "could not infer format" is not the user's concern here
        warnings.simplefilter("ignore", UserWarning)
        t = pd.to_datetime(ts, errors="coerce", utc=True).dropna()
    if t.empty:
        return "YYYY-MM-DD"
    return str((t.max() - pd.Timedelta(days=horizon_days)).date())


def _decimal_mark(frame, cols: list[str], sep: str) -> str:
    """"," when the sample's numbers are written with a decimal comma (some column mostly "12,5"-shaped, none
    "12.5"-shaped), else ".". Never "," in a comma-separated file."""
    if sep == ",":
        return "."
    comma = dot = False
    for col in cols:
        t = frame[col].dropna().astype("string").str.strip()
        t = t[t != ""].head(2000)
        if not len(t):
            continue
        frac = t.str.fullmatch(r"-?\d+,\d+").mean()
        if frac > 0.2 and t.str.fullmatch(r"-?\d+(,\d+)?").mean() > 0.95:
            comma = True
        if t.str.fullmatch(r"-?\d+\.\d+").mean() > 0.2:
            dot = True
    return "," if comma and not dot else "."


def propose_contract(frame, *, name: str, file: str, max_categories: int = 20, sep: str = ",", label: str = "", id_column: str = "",
                     task: str = "", kind: str = "table", timestamp: str = "", event_type: str = "",
                     amount: str = "", notes: list[str] | None = None) -> dict[str, Any]:
    """A draft contract from a sample frame: numeric bounds (outward-rounded), top categories.

    Table (``kind="table"``): the label column is ``label`` or inferred from its name (churn, exited, target, ...)
    among two-valued columns; ``ConfigError`` when none can be inferred (name it with ``--label``). The label
    and identifier columns (``id_column``, or a unique-per-row column with an id-like name) are never features.
    Events (``kind="events"``): the customer id, timestamp (inferred by name), event type and amount columns
    map onto the event schema; other low-cardinality columns become static attributes. ``file`` is written
    as an absolute path so the draft passes ``fedprop data check`` from any folder. The caller must show
    PROPOSAL_WARNING: nothing here is private.
    """
    import numpy as np
    import pandas as pd

    cols = [str(c) for c in frame.columns]

    def need(col: str, what: str) -> str:
        if col and col not in cols:
            near = difflib.get_close_matches(col, cols, n=1)
            raise ConfigError(f"{what} {col!r} is not a column of {file}" + (f" (did you mean {near[0]!r}?)" if near else "")
                              + f"; columns: {', '.join(cols)}")
        return col

    id_col = need(id_column, "--id column") or _pick(cols, ID_NAMES) or _pick_pattern(
        cols, ID_PATTERN, (lambda c: _id_like(frame[c])) if kind == "table" else (lambda c: True))
    if id_col and not id_column and kind == "table" and not _id_like(frame[id_col]):
        id_col = ""  # in a customer table, an id-like NAME whose values repeat is not an identifier
    ids = {id_col} if id_col else set()
    ids |= {c for c in cols if c != id_col and _norm(c) in ID_NAMES and _id_like(frame[c])}
    path = str(Path(file).expanduser().resolve())
    notes = notes if notes is not None else []
    decimal = _decimal_mark(frame, cols, sep)
    source = {"files": [path], **({"sep": sep} if sep != "," else {}), **({"decimal": decimal} if decimal != "." else {})}
    if decimal != ".":
        notes.append("numbers are written with a decimal comma (e.g. 12,5): drafted source.decimal ','")

    def number(s):
        t = s.astype("string").str.strip().replace("", pd.NA)
        return pd.to_numeric(t.str.replace(",", ".", regex=False) if decimal == "," else t, errors="coerce")

    def features(skip: set[str]) -> list[dict[str, Any]]:
        feats: list[dict[str, Any]] = []
        for col in cols:
            if col in skip:
                continue
            s = frame[col]
            t = s.dropna().astype("string").str.strip()
            t = t[t != ""]
            if kind == "table" and len(t) and not pd.api.types.is_numeric_dtype(s.dtype):
                if t.str.fullmatch(r"\d+").mean() > 0.95 and t.str.fullmatch(r"0\d+").mean() > 0.05 and _id_like(s):
                    notes.append(f"column {col!r} left out of the features: unique per row and written with leading "
                                 "zeros (a code, not a number): an identifier; if it is the customer id, rerun with "
                                 f"--id {col!r}")
                    continue
                if _date_like(t):
                    notes.append(f"column {col!r} left out of the features: it holds dates, and a customer table has "
                                 "no date features (as a category, each day would be its own value); derive a number "
                                 "in the export (e.g. days since signup at one fixed date) and declare it, or list the "
                                 "column in excluded_columns")
                    continue
            if kind == "table" and pd.api.types.is_datetime64_any_dtype(s.dtype):
                notes.append(f"column {col!r} left out of the features: it holds dates, and a customer table has no "
                             "date features; derive a number in the export (e.g. days since signup at one fixed "
                             "date) and declare it, or list the column in excluded_columns")
                continue
            num = number(s)
            if num.notna().mean() > 0.95 and s.nunique(dropna=True) > 2:
                lo, hi = float(np.floor(num.min())), float(np.ceil(num.max()))
                hi = hi if hi > lo else lo + 1
                tr = "log1p" if lo >= 0 and hi > 1000 else "identity"
                feats.append({"column": col, "kind": "numeric", "lo": lo, "hi": hi, "transform": tr,
                              **({"fill": lo} if num.isna().any() else {})})
                odd = int((num.isna() & s.notna() & (s.astype("string").str.strip() != "")).sum())
                if odd:  # e.g. "?" for missing: data check refuses them until the export writes them blank
                    notes.append(f"column {col!r} drafted as numeric, but {odd} of its values are not numbers (a "
                                 "missing-value marker such as '?' or '-'?): data check refuses them; write them blank "
                                 "in the export (blanks get the drafted fill), or declare the column categorical")
            else:
                top = s.astype("string").value_counts().head(max_categories).index.tolist()
                if s.nunique(dropna=True) > max(50, len(s) // 2):  # free text / another identifier
                    if kind == "table":
                        notes.append(f"column {col!r} left out of the features: {s.nunique(dropna=True)} distinct "
                                     f"values in {len(s)} rows, neither a number nor a category (free text, a date or "
                                     "another identifier); declare it by hand if it is a feature, or list it in "
                                     "excluded_columns")
                    continue
                feats.append({"column": col, "kind": "categorical", "vocabulary": [str(v) for v in top]})
        return feats

    if kind == "events":
        def parses(c: str) -> bool:  # most sampled values read as dates
            sample = frame[c].dropna().astype("string").head(200)
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if len(sample) and sample.str.strip().str.fullmatch(r"\d{9,13}").mean() > 0.9:
                    return True  # epoch numbers: the event time, which the draft's review says check refuses
                return len(sample) > 0 and pd.to_datetime(sample, errors="coerce", format="mixed").notna().mean() > 0.9

        ts = need(timestamp, "--timestamp column") or _pick(cols, TIME_NAMES) or _pick_pattern(cols, TIME_PATTERN, parses)
        missing = [w for w, got in (("the customer id (--id COLUMN)", id_col), ("the event time (--timestamp COLUMN)", ts))
                   if not got]
        if missing:  # every flag the draft needs, at once
            raise ConfigError(f"cannot tell which column of {file} holds {' or '.join(missing)}: name "
                              f"{'them' if len(missing) > 1 else 'it'}; columns: {', '.join(cols)}")
        et = need(event_type, "--event-type column") or _pick(cols, ("event_type", "eventtype", "event", "type", "action"))
        am = need(amount, "--amount column") or _pick(cols, ("amount", "value", "revenue", "price", "total", "spend"))
        amounts = [am] if am else []
        if not am:  # an order-line log: quantity x unit price
            qty = _pick(cols, ("qty", "quantity", "units", "unitssold"))
            price = _pick(cols, ("unitprice", "unit_price", "priceeach", "unitcost", "itemprice", "priceper"))
            price = price or _pick_pattern(cols, r"price", lambda c: c != qty)
            if qty and price:
                amounts = [qty, price]
                notes.append(f"amount drafted as {qty!r} x {price!r} (line value; a list is multiplied)")
        taken = {id_col, ts, et, *amounts}
        product = _pick([c for c in cols if c not in taken], (
            "product", "productid", "sku", "item", "itemcode", "itemid", "stockcode", "article", "productcode"))
        tx = _pick([c for c in cols if c not in taken | {product}], (
            "transaction", "transactionid", "invoice", "invoiceno", "invoicenumber", "receipt", "receiptno", "orderno",
            "orderid", "ordernumber", "order", "basket", "basketid"))
        for what, col in (("product", product), ("transaction (purchases are counted per transaction)", tx)):
            if col:
                notes.append(f"column {col!r} drafted as the {what}")
        types = [str(v) for v in frame[et].astype("string").value_counts().head(max_categories).index] if et else []
        mapped = (taken | {product, tx}) - {""}
        static = [f for f in features(mapped | ids) if f["kind"] == "categorical"]
        return {"name": name, "kind": "events", "source": source,
                "columns": {"customer_id": id_col, "timestamp": ts, **({"event_type": et} if et else {}),
                            **({"amount": amounts} if amounts else {}), **({"product": product} if product else {}),
                            **({"transaction": tx} if tx else {})},
                "events": {"activity": types or ["purchase"],
                           "purchase": [t for t in types if "purchase" in t.lower() or "order" in t.lower()] or types[:1]
                           or ["purchase"],
                           "returns": [t for t in types if "return" in t.lower() or "refund" in t.lower()],
                           "support": [t for t in types if "support" in t.lower() or "ticket" in t.lower()],
                           "cutoff": _draft_cutoff(frame[ts], horizon_days=90), "horizon_days": 90, "lookback_days": 365},
                "static": static, "min_customers": 100}

    lab = need(label, "--label column")
    if not lab:
        two = [c for c in cols if c not in ids and frame[c].nunique(dropna=True) == 2]
        lab = _pick(two, LABEL_NAMES)
        if not lab:
            raise ConfigError(f"cannot tell which column of {file} is the label (two-valued columns: "
                              f"{', '.join(two) or 'none'}): name it with --label COLUMN")
    text = frame[lab].dropna().astype("string").str.strip()
    text = text[text != ""]
    # spellings of one value that differ only in case (" Yes", "yes", "YES "): one class, every spelling declared
    # (data check strips values but compares them case-sensitively)
    spellings: dict[str, list[str]] = {}
    for v in text.unique():
        spellings.setdefault(str(v).casefold(), []).append(str(v))
    if len(spellings) != 2:
        raise ConfigError(f"label column {lab!r} has {len(spellings)} distinct values (ignoring case and surrounding "
                          "spaces); a label needs exactly 2: recode it in the export, or draft with another --label "
                          "and declare label.positive / label.negative (every spelling) by hand")
    classes = sorted(spellings, key=lambda k: (-int((text.str.casefold() == k).sum()), k))  # majority first
    pos_key = [k for k in classes if k in POSITIVE_VALUES]
    # no recognisable "yes": the minority class is the event a churn/propensity model predicts
    pos_key = pos_key[0] if len(pos_key) == 1 else classes[-1]
    pos = sorted(spellings[pos_key])
    neg = sorted(next(v for k, v in spellings.items() if k != pos_key))
    if len(pos) + len(neg) > 2:
        notes.append(f"label column {lab!r} writes its two values in {len(pos) + len(neg)} spellings (case, spaces): "
                     "each is drafted in label.positive / label.negative")
    task = task or ("churn" if any(k in _norm(lab) for k in CHURN_NAMES) else "propensity")
    return {"name": name, "kind": "table", "source": source,
            "columns": {"customer_id": id_col, "label": lab},
            "label": {"column": lab, "positive": pos, "negative": neg, "task": task},
            **({"excluded_columns": sorted(ids - {id_col})} if ids - {id_col} else {}),
            "features": features({lab} | ids)}
