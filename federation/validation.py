"""Validate partner data against its contract BEFORE anything is trained, collecting every problem.

``read_validated(contract, path)`` reads only the contract's columns chunk by chunk, converts each chunk
to compact types while recording every problem (with the file, the column, example rows and what to do),
runs the whole-table checks, and then either returns the typed frame or raises ONE DataValidationError.
Nothing is written; the input is only read.

Problems (raise): missing or misspelled columns (nearest name suggested), values of the wrong type,
unparseable / missing / future timestamps, NaN or inf in numeric columns, negative purchase amounts
when forbidden, missing customer ids, duplicate customers in a customer table (beyond the contract's
cap), labels that are not binary, a label without positives (or without negatives), too few customers
for differential privacy, an event log with no events in the label horizon.
Notes (reported, not fatal): rows dropped as the contract declares, values outside a vocabulary.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from federation.contract import DataContract
from federation.errors import DataValidationError
from federation.readers import Source, open_source

EXAMPLES = 3
PRIVACY_WHY = (
    "with n customers, delta must be well below 1/n (delta is the probability that the guarantee fails "
    "for someone), and the DP-SGD noise, calibrated to one customer, swamps the signal of a small table"
)


@dataclass
class Report:
    source: str
    contract: str
    contract_hash: str
    rows_read: int = 0
    rows_used: int = 0
    customers: int = 0
    positives: dict[str, float] = field(default_factory=dict)  # task -> positive rate
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"OK: {self.source} satisfies contract {self.contract!r} (hash {self.contract_hash[:12]})",
                 f"  rows read {self.rows_read}, rows used {self.rows_used}, customers {self.customers}"]
        lines += [f"  {t} positive rate {r:.3f}" for t, r in self.positives.items()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class Validated:
    frame: pd.DataFrame
    report: Report


class _Problems:
    """Per (column, kind): a count and the first few (row, value) examples, across chunks."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.fixed: list[str] = []
        self.rows: dict[tuple[str, str], list] = {}  # key -> [count, examples, advice]

    def add(self, msg: str) -> None:
        self.fixed.append(msg)

    def rows_bad(self, column: str, kind: str, mask: np.ndarray, values: pd.Series, offset: int, advice: str) -> None:
        m = np.asarray(mask, dtype=bool)
        k = int(m.sum())
        if not k:
            return
        entry = self.rows.setdefault((column, kind), [0, [], advice])
        entry[0] += k
        if len(entry[1]) < EXAMPLES:
            pos = np.flatnonzero(m)[: EXAMPLES - len(entry[1])]
            for i in pos:
                entry[1].append((offset + int(i), values.iloc[int(i)]))

    def messages(self) -> list[str]:
        out = list(self.fixed)
        for (col, kind), (count, ex, advice) in self.rows.items():
            shown = ", ".join(f"{self.source.row_label(i)}: {v!r}" for i, v in ex)
            out.append(f"column {col!r}: {count} row(s) {kind} (e.g. {shown}); {advice}")
        return out


def _text(s: pd.Series) -> pd.Series:
    """String view of a column without a copy when it already is text (pandas 3 ``str``)."""
    return s if pd.api.types.is_string_dtype(s.dtype) and s.dtype != object else s.astype("str")


def _blank(s: pd.Series) -> np.ndarray:
    if s.dtype.kind in "fiub":
        return s.isna().to_numpy()
    t = s.pipe(_text)
    return (t.isna() | (t.str.strip() == "")).to_numpy(dtype=bool)


def _to_number(s: pd.Series) -> pd.Series:
    if s.dtype.kind in "fiub":
        return s.astype("float64")
    t = s.pipe(_text).str.strip()
    return pd.to_numeric(t.where(t != ""), errors="coerce").astype("float64")


def _label_text(s: pd.Series) -> pd.Series:
    """Canonical text of label values: 1.0 -> '1', ' yes' -> 'yes'."""
    if s.dtype.kind in "fiub":
        v = s.astype("float64")
        return pd.Series(np.where(v.isna(), None, v.map(lambda x: str(int(x)) if float(x).is_integer() else str(x))),
                         index=s.index, dtype="str")
    return s.pipe(_text).str.strip()


def _parse_ts(s: pd.Series, fmt: str) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(s):
        ts = s
    else:
        t = s.pipe(_text).str.strip()
        ts = pd.to_datetime(t, format=fmt or "ISO8601", errors="coerce")
    if getattr(ts.dt, "tz", None) is not None:
        ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
    return ts.astype("datetime64[ns]")


def column_problems(available: list[str], required: list[str]) -> list[str]:
    """Missing columns, each with the nearest available name (difflib), case-insensitive."""
    out = []
    lower = {a.lower(): a for a in available}
    for col in required:
        if col in available:
            continue
        near = difflib.get_close_matches(col.lower(), list(lower), n=1, cutoff=0.6)
        hint = f"did you mean {lower[near[0]]!r}?" if near else f"available columns: {', '.join(available[:20])}."
        out.append(f"column {col!r} is required by the contract but absent; {hint} "
                   "Rename the column in the export or fix the contract's column mapping.")
    return out


def _convert_chunk(raw: pd.DataFrame, c: DataContract, offset: int, P: _Problems, now: pd.Timestamp,
                   notes: dict[str, int]) -> pd.DataFrame:
    cols = c.columns
    out = pd.DataFrame(index=raw.index)
    keep = np.ones(len(raw), dtype=bool)
    if cols.customer_id:
        miss = _blank(raw[cols.customer_id])
        if c.kind == "events" and c.events.drop_missing_customer:
            notes["rows without a customer id dropped (the contract declares them unattributable)"] += int(miss.sum())
            keep &= ~miss
        else:
            P.rows_bad(cols.customer_id, "have no customer id", miss, raw[cols.customer_id], offset,
                       "every row must belong to a customer (the privacy unit); fix the export or set "
                       "events.drop_missing_customer in the contract")
        cid = raw[cols.customer_id]
        if cid.dtype.kind == "f":  # e.g. a nullable integer id read as float: 17850.0 -> '17850'
            cid = cid.map(lambda x: None if pd.isna(x) else str(int(x)) if float(x).is_integer() else str(x))
        out["__cid"] = cid.pipe(_text).str.strip()
    if c.kind == "events":
        ts_raw = raw[cols.timestamp]
        ts = _parse_ts(ts_raw, cols.timestamp_format)
        missing = _blank(ts_raw)
        P.rows_bad(cols.timestamp, "have no timestamp", missing & keep, ts_raw, offset,
                   "every event needs a time; drop or repair these rows in the export")
        bad = ts.isna().to_numpy() & ~missing
        P.rows_bad(cols.timestamp, "cannot be parsed as timestamps", bad & keep, ts_raw, offset,
                   f"use ISO 8601 (YYYY-MM-DD HH:MM:SS) or declare columns.timestamp_format"
                   + (f" (declared {cols.timestamp_format!r})" if cols.timestamp_format else ""))
        fut = (ts > now).fillna(False).to_numpy(dtype=bool)
        P.rows_bad(cols.timestamp, f"are in the future (after {now:%Y-%m-%d %H:%M})", fut & keep, ts_raw, offset,
                   "future events are clock or time-zone errors and would leak into labels; fix the source clock "
                   "or the time zone of the export")
        out["__ts"] = ts
        et = raw[cols.event_type].pipe(_text).str.strip()
        if c.events.event_type_rule == "prefix":
            mapped = pd.Series(c.events.event_type_default, index=raw.index, dtype="str")
            for prefix, typ in c.events.event_type_map:
                mapped = mapped.mask(et.str.startswith(prefix).fillna(False), typ)
            et = mapped
        out["__event_type"] = et.astype("category")
        known = set(c.events.activity) | set(c.events.purchase) | set(c.events.returns) | set(c.events.support)
        unknown = ~et.isin(list(known)).fillna(False).to_numpy(dtype=bool) & keep
        notes["events of a type the contract does not count (ignored)"] += int(unknown.sum())
        if cols.amount:
            amount = pd.Series(1.0, index=raw.index)
            for a in cols.amount:
                v = _to_number(raw[a])
                P.rows_bad(a, "are not numbers", (v.isna().to_numpy() & ~_blank(raw[a])) & keep, raw[a], offset,
                           "amounts must be plain numbers (no currency symbols or thousands separators)")
                P.rows_bad(a, "are missing (NaN)", _blank(raw[a]) & keep, raw[a], offset,
                           "fill or drop these rows in the export; a missing amount cannot be summed")
                P.rows_bad(a, "are infinite", np.isinf(v.to_numpy()) & keep, raw[a], offset, "repair these values")
                amount = amount * v
            if c.events.amount_nonnegative:
                buy = et.isin(list(c.events.purchase)).fillna(False).to_numpy(dtype=bool)
                neg = (amount < 0).to_numpy() & buy & keep
                P.rows_bad("*".join(cols.amount), "are purchases with a negative amount", neg,
                           amount, offset, "refunds must be separate return events; fix the sign or the event type")
            out["__amount"] = amount.fillna(0.0)
        for opt in (cols.channel, cols.product, cols.transaction):
            if opt:
                out[opt] = raw[opt].pipe(_text).str.strip().astype("category")
        for f in c.static:
            out[f.column] = raw[f.column].pipe(_text).str.strip()
    else:
        for f in c.features:
            s = raw[f.column]
            if f.kind == "numeric":
                v = _to_number(s)
                blank = _blank(s)
                P.rows_bad(f.column, "are not numbers (wrong dtype)", v.isna().to_numpy() & ~blank, s, offset,
                           "the contract declares this column numeric; repair the values or declare it categorical")
                if f.fill is None:
                    P.rows_bad(f.column, "are missing (NaN)", blank, s, offset,
                               "impute in the export or declare `fill:` for this feature in the contract")
                P.rows_bad(f.column, "are infinite", np.isinf(v.to_numpy()), s, offset, "repair these values")
                out[f.column] = v if f.fill is None else v.fillna(f.fill)
            else:
                t = s.pipe(_text).str.strip()
                notes[f"values of {f.column!r} outside the declared vocabulary (encoded as __other__)"] += int(
                    (~t.isin(list(f.vocabulary)).fillna(False)).sum())
                out[f.column] = t
        if c.label.column not in raw:  # labels=False: scoring, no label read
            return out.loc[keep]
        lab = _label_text(raw[c.label.column])
        pos, neg = lab.isin(list(c.label.positive)).fillna(False), lab.isin(list(c.label.negative)).fillna(False)
        nonbin = ~(pos | neg).to_numpy(dtype=bool)
        P.rows_bad(c.label.column, "have a label that is neither positive "
                   f"{list(c.label.positive)} nor negative {list(c.label.negative)}", nonbin, raw[c.label.column],
                   offset, "labels must be binary; map the other values in the export or declare them in label.*")
        out["__label"] = pos.to_numpy(dtype=np.float32)
    return out.loc[keep]


def read_validated(
    contract: DataContract,
    path: str | None = None,
    *,
    delta: float | None = None,
    now: pd.Timestamp | str | None = None,
    min_customers: int | None = None,
    labels: bool = True,
) -> Validated:
    """Read and validate one input; return the typed frame or raise one DataValidationError.

    ``path`` overrides the contract's first file. ``delta`` (the run's DP delta) adds the 1/n check.
    ``labels=False`` (scoring current customers): a table's label column is not read and the label checks
    (table: both classes present; event log: data in the label horizon, positives) are skipped.
    """
    c = contract
    now = pd.Timestamp.now() if now is None else pd.Timestamp(now)
    src_spec = c.source
    if src_spec.format == "sql" and path is None:
        source = open_source(src_spec.url, format="sql", query=src_spec.query, chunksize=src_spec.chunksize)
    else:
        location = path if path is not None else (str(c.resolve_files()[0]) if c.source.files else "")
        if not location:
            raise DataValidationError(["no input: give a file or set source.files in the contract"], source=c.name)
        source = open_source(location, format=src_spec.format if path is None else "auto", sep=src_spec.sep,
                             encoding=src_spec.encoding, chunksize=src_spec.chunksize, query=src_spec.query)
    P = _Problems(source)
    available = source.columns()
    required = [x for x in c.required_columns() if labels or c.kind != "table" or x != c.label.column]
    missing = column_problems(available, required)
    if missing:  # nothing else can be checked reliably without the columns
        raise DataValidationError(missing, source=source.describe)
    for x in c.excluded_columns:
        if x in required:
            P.add(f"column {x!r} is excluded by the contract but read as a feature; remove it from the features")
    notes: dict[str, int] = _Counter()
    parts, offset = [], 0
    for chunk in source.chunks(required):
        parts.append(_convert_chunk(chunk.reset_index(drop=True), c, offset, P, now, notes))
        offset += len(chunk)
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    report = Report(source=source.describe, contract=c.name, contract_hash=c.contract_hash(), rows_read=offset)
    if c.deduplicate and len(frame):
        dup = frame.duplicated().to_numpy()
        notes["exact duplicate rows dropped (the contract declares deduplicate: true)"] += int(dup.sum())
        frame = frame.loc[~dup].reset_index(drop=True)
    n = _whole_table_checks(frame, c, P, source, delta=delta, min_customers=min_customers, report=report, labels=labels)
    problems = P.messages()
    if problems:
        raise DataValidationError(problems, source=source.describe)
    report.rows_used, report.customers = len(frame), n
    report.notes = [f"{v} {k}" for k, v in notes.items() if v]
    return Validated(frame=frame, report=report)


class _Counter(dict):
    def __missing__(self, key):
        return 0


def _whole_table_checks(frame: pd.DataFrame, c: DataContract, P: _Problems, source: Source, *,
                        delta: float | None, min_customers: int | None, report: Report, labels: bool = True) -> int:
    if not len(frame):
        P.add("the input has no usable rows; check the file and the contract's filters")
        return 0
    if c.kind == "table":
        if c.columns.customer_id:
            counts = frame["__cid"].value_counts()
            over = counts[counts > c.max_rows_per_customer]
            if len(over):
                ex = ", ".join(f"{k!r} x{v}" for k, v in over.head(EXAMPLES).items())
                P.add(f"column {c.columns.customer_id!r}: {len(over)} customer id(s) appear more than "
                      f"max_rows_per_customer={c.max_rows_per_customer} time(s) (e.g. {ex}); the privacy unit is the "
                      "customer, so extra rows would silently weaken the guarantee: deduplicate the export, or raise "
                      "max_rows_per_customer in the contract (the accounting then uses group privacy of that size)")
            n = int(frame["__cid"].nunique())
        else:
            n = len(frame)
        y = frame["__label"].to_numpy() if labels else frame.index.to_numpy()[:0]
        if len(y) and y.sum() == 0:
            P.add(f"column {c.label.column!r}: the label has no positive rows (positive values "
                  f"{list(c.label.positive)}); a model cannot learn {c.label.task} without positives: check "
                  "label.positive in the contract or the export's filter")
        elif len(y) and y.sum() == len(y):
            P.add(f"column {c.label.column!r}: every row is positive; check label.negative or the export's filter")
        if len(y):
            report.positives[c.label.task] = float(y.mean())
    else:
        n = _event_checks(frame, c, P, report, labels=labels)
    need = c.min_customers if min_customers is None else min_customers
    if n < need:
        P.add(f"only {n} customer(s), fewer than the contract's min_customers={need}: {PRIVACY_WHY}. "
              "Pool more history, join a larger partner group, or leave this partner out of DP training")
    if delta is not None and n and not delta < 1.0 / n:
        P.add(f"privacy.delta={delta:g} is not below 1/n = {1.0 / n:.3g} for n={n} customers: {PRIVACY_WHY}. "
              f"Use delta <= {0.1 / n:.1g}")
    return n


def _event_checks(frame: pd.DataFrame, c: DataContract, P: _Problems, report: Report, labels: bool = True) -> int:
    e = c.events
    cutoff = pd.Timestamp(e.cutoff)
    ts = frame["__ts"]
    et = frame["__event_type"].pipe(_text)
    before = (ts < cutoff) & (ts >= cutoff - pd.Timedelta(days=e.lookback_days)) & et.isin(list(e.activity))
    pop = pd.Index(frame.loc[before.fillna(False), "__cid"].unique())
    n = len(pop)
    if not labels:
        return n
    horizon = (ts >= cutoff) & (ts < cutoff + pd.Timedelta(days=e.horizon_days))
    if not bool(horizon.any()):
        last = ts.max()
        P.add(f"column {c.columns.timestamp!r}: no events in the label horizon [{cutoff:%Y-%m-%d}, "
              f"{cutoff + pd.Timedelta(days=e.horizon_days):%Y-%m-%d}) (last event {last}); every customer would "
              "count as churned: move events.cutoff earlier or export more recent data")
    elif ts.max() < cutoff + pd.Timedelta(days=e.horizon_days - 1):
        P.add(f"column {c.columns.timestamp!r}: the log ends at {ts.max()}, before the label horizon ends "
              f"({cutoff + pd.Timedelta(days=e.horizon_days):%Y-%m-%d}); labels would overstate churn: move "
              "events.cutoff earlier or shorten events.horizon_days")
    if n:
        h = frame.loc[horizon.fillna(False)]
        het = h["__event_type"].pipe(_text)
        act = pd.Index(h.loc[het.isin(list(e.activity)).to_numpy(dtype=bool), "__cid"].unique()).get_indexer(pop) >= 0
        buy = pd.Index(h.loc[het.isin(list(e.purchase)).to_numpy(dtype=bool), "__cid"].unique()).get_indexer(pop) >= 0
        report.positives = {"churn": float(1 - act.mean()), "propensity": float(buy.mean())}
        if act.all():
            P.add("label churn has no positives at this cutoff (every customer is active in the horizon); "
                  "check events.activity or the cutoff")
        if not buy.any():
            P.add("label propensity has no positives (no purchase in the horizon); check events.purchase")
    return n
