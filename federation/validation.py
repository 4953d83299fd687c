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
from federation.errors import DataValidationError, Problem
from federation.readers import Source, open_source

EXAMPLES = 3
UNKNOWN_TYPES_NOTE = "events of a type the contract does not count (ignored)"
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


# whole-population findings, reported after the row problems that may cause them
POPULATION_CODES = frozenset({"no_rows", "too_few_customers", "no_horizon_events", "log_ends_early", "no_positives",
                              "no_negatives", "delta_too_large"})


class _Problems:
    """Per (column, code): a count and the first few row positions, across chunks. Messages carry row
    numbers and column names, never a value: a cell may be a customer id (the privacy unit)."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.fixed: list[Problem] = []
        self.rows: dict[tuple[str, str], list] = {}  # (column, code) -> [count, rows, kind, advice]

    def add(self, msg: str, *, code: str, column: str = "", count: int = 0) -> None:
        self.fixed.append(Problem(msg, code=code, column=column, count=count))

    def rows_bad(self, column: str, kind: str, mask: np.ndarray, offset: int, advice: str, *, code: str,
                 rows: np.ndarray | None = None) -> None:
        """``mask`` marks bad rows of a chunk starting at data row ``offset`` (or ``rows``: their positions)."""
        m = np.asarray(mask, dtype=bool)
        k = int(m.sum())
        if not k:
            return
        entry = self.rows.setdefault((column, code), [0, [], kind, advice])
        entry[0] += k
        if len(entry[1]) < EXAMPLES:
            pos = np.flatnonzero(m)[: EXAMPLES - len(entry[1])]
            entry[1].extend(int(rows[i]) if rows is not None else offset + int(i) for i in pos)

    def count(self, code: str) -> int:
        return sum(v[0] for (_, c), v in self.rows.items() if c == code) + sum(p.code == code for p in self.fixed)

    def messages(self) -> list[Problem]:
        """Structural problems, then bad rows, then the population findings (too few customers, no horizon
        events...), which are often consequences of the bad rows: the cause is read first."""
        out = [p for p in self.fixed if p.code not in POPULATION_CODES]
        for (col, code), (count, rows, kind, advice) in self.rows.items():
            where = f"column {col!r}: " if col else ""
            out.append(Problem(f"{where}{count} row(s) {kind} ({self.source.rows_text(rows, count)}); {advice}",
                               code=code, column=col, count=count))
        return out + [p for p in self.fixed if p.code in POPULATION_CODES]


def _text(s: pd.Series) -> pd.Series:
    """String view of a column without a copy when it already is text (pandas 3 ``str``)."""
    return s if pd.api.types.is_string_dtype(s.dtype) and s.dtype != object else s.astype("str")


def _blank(s: pd.Series) -> np.ndarray:
    if s.dtype.kind in "fiub":
        return s.isna().to_numpy()
    t = s.pipe(_text)
    return (t.isna() | (t.str.strip() == "")).to_numpy(dtype=bool)


def _to_number(s: pd.Series, decimal: str = ".") -> pd.Series:
    """Numbers of a column (blank -> NaN, not a number -> NaN). ``decimal=","``: "12,5" is 12.5 (source.decimal);
    a value that also holds a "." ("1.234,5": thousands separators) is then not a number."""
    if s.dtype.kind in "fiub":
        return s.astype("float64")
    t = s.pipe(_text).str.strip()
    if decimal != ".":
        t = t.where(~t.str.contains(".", regex=False).fillna(False), "not a number").str.replace(decimal, ".", regex=False)
    return pd.to_numeric(t.where(t != ""), errors="coerce").astype("float64")


def _label_text(s: pd.Series) -> pd.Series:
    """Canonical text of label values: 1.0 -> '1', ' yes' -> 'yes'."""
    if s.dtype.kind in "fiub":
        v = s.astype("float64")
        return pd.Series(np.where(v.isna(), None, v.map(lambda x: str(int(x)) if float(x).is_integer() else str(x))),
                         index=s.index, dtype="str")
    return s.pipe(_text).str.strip()


_TZ = r"(?:[zZ]|[+-]\d\d(?::?\d\d)?)$"
_TS_MIN, _TS_MAX = pd.Timestamp.min.tz_localize(None), pd.Timestamp.max.tz_localize(None)


# whole numbers of 9-13 digits: Unix epoch seconds (2001-2286) or milliseconds, which no strptime format reads
EPOCH_RE = r"\d{9,13}"
EPOCH_ADVICE = ("they are whole numbers, like Unix epoch seconds or milliseconds: declare columns.timestamp_format: "
                "epoch_s (10 digits today) or epoch_ms (13 digits)")
# columns.timestamp_format values that are not strptime formats: Unix time (UTC by definition), whole or decimal
EPOCH_FORMATS = {"epoch_s": "s", "epoch_ms": "ms"}
_EPOCH_NUMBER = r"-?\d+(?:\.\d+)?"


def _parse_ts(s: pd.Series, fmt: str, column: str, offset: int, P: _Problems, keep: np.ndarray) -> pd.Series:
    """Timestamps as naive UTC datetime64[ns]; offsets are converted to UTC, a column that MIXES rows with and
    without a UTC offset is a problem (the naive rows' zone is unknown), out-of-range dates are unparseable."""
    if fmt in EPOCH_FORMATS:  # Unix time: seconds or ms since 1970-01-01 UTC, as numbers or their text
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            x = pd.to_numeric(s, errors="coerce").astype("float64")
        else:
            t = s.pipe(_text).str.strip()
            x = pd.to_numeric(t.where(t.str.fullmatch(_EPOCH_NUMBER).fillna(False)), errors="coerce").astype("float64")
        lo, hi = (v.value / {"s": 1e9, "ms": 1e6}[EPOCH_FORMATS[fmt]] for v in (_TS_MIN, _TS_MAX))
        x = x.where((x >= lo) & (x <= hi))
        return pd.to_datetime(x, unit=EPOCH_FORMATS[fmt], errors="coerce").astype("datetime64[ns]")
    if pd.api.types.is_datetime64_any_dtype(s):
        ts = s
        if getattr(ts.dt, "tz", None) is not None:
            ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
        if ts.dtype != "datetime64[ns]":
            # e.g. Parquet timestamp[us] holding year 1 or 9999: outside what the features can use
            out = ((ts < _TS_MIN) | (ts > _TS_MAX)).fillna(False).to_numpy(dtype=bool)
            ts = ts.where(~out).astype("datetime64[ns]")
        return ts
    t = s.pipe(_text).str.strip()
    aware = t.str.contains(_TZ, regex=True).fillna(False).to_numpy(dtype=bool) & ~_blank(s)
    naive = ~aware & ~_blank(s)
    P.rows_bad(column, "carry a UTC offset", aware & keep, offset, "", code="tz_aware")
    P.rows_bad(column, "have no UTC offset", naive & keep, offset, "", code="tz_naive")
    if fmt:
        ts = pd.to_datetime(t, format=fmt, errors="coerce", utc=bool(aware.any()))
    else:
        ts = pd.to_datetime(t, format="ISO8601", errors="coerce", utc=True) if aware.any() else \
            pd.to_datetime(t, format="ISO8601", errors="coerce")
    if getattr(ts.dt, "tz", None) is not None:
        ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
    out = ((ts < _TS_MIN) | (ts > _TS_MAX)).fillna(False).to_numpy(dtype=bool)
    return ts.where(~out).astype("datetime64[ns]")


def _mixed_timezones(P: _Problems, column: str) -> None:
    """Turn the per-chunk offset bookkeeping into one problem when a column mixes both kinds."""
    aware, naive = P.rows.pop((column, "tz_aware"), None), P.rows.pop((column, "tz_naive"), None)
    if aware and naive:
        minority = aware if aware[0] <= naive[0] else naive
        rows = P.source.rows_text(minority[1], minority[0])
        a_txt, n_txt = (f"{aware[0]} row(s) carry a UTC offset ({rows})", f"{naive[0]} do not") if minority is aware \
            else (f"{aware[0]} row(s) carry a UTC offset", f"{naive[0]} do not ({rows})")
        P.add(f"column {column!r}: mixed time zones: {a_txt} and {n_txt}; export every timestamp in one zone "
              "(UTC, or all with an offset): a time without a zone cannot be ordered against one with a zone",
              code="mixed_timezones", column=column, count=minority[0])


_TIMESTAMP_TYPES = ("timestamp", "date", "string", "large_string")
_NUMERIC_TYPES = ("int", "uint", "float", "double", "decimal", "bool", "string", "large_string", "halffloat")


def _arrow_type_problems(types: dict[str, str], c: DataContract) -> list[Problem]:
    """Parquet columns whose stored type cannot hold what the contract declares (checked before reading)."""
    want: dict[str, tuple[str, tuple[str, ...]]] = {}
    if c.kind == "events":
        want[c.columns.timestamp] = (("a Unix time (a number, or its text)", ("int", "uint", "float", "double",
                                                                                "decimal", "string", "large_string"))
                                     if c.columns.timestamp_format in EPOCH_FORMATS
                                     else ("a timestamp (or ISO 8601 text)", _TIMESTAMP_TYPES))
        for a in c.columns.amount:
            want[a] = ("a number", _NUMERIC_TYPES)
    for f in c.features:
        if f.kind == "numeric":
            want[f.column] = ("a number", _NUMERIC_TYPES)
    out = []
    for col, (what, ok) in want.items():
        t = types.get(col)
        if t is not None and not t.startswith(ok):
            out.append(Problem(f"column {col!r} is stored as Parquet type {t}, but the contract declares {what}; "
                               "write the column with that type in the export (or as text) and export again",
                               code="wrong_dtype", column=col))
    return out


def column_problems(available: list[str], required: list[str]) -> list[Problem]:
    """Missing columns, each with the nearest available name (difflib), case-insensitive."""
    out = []
    lower = {a.lower(): a for a in available}
    for col in required:
        if col in available:
            continue
        near = difflib.get_close_matches(col.lower(), list(lower), n=1, cutoff=0.6)
        hint = f"did you mean {lower[near[0]]!r}?" if near else f"available columns: {', '.join(available[:20])}."
        out.append(Problem(f"column {col!r} is required by the contract but absent; {hint} "
                           "Rename the column in the export or fix the contract's column mapping.",
                           code="missing_column", column=col))
    return out


def _out_of(P: _Problems, level: str, column: str, kind: str, mask: np.ndarray, offset: int, advice: str,
            code: str) -> None:
    """An out-of-vocabulary / out-of-bounds finding: a note by default, an error when the contract says so."""
    P.rows_bad(column, kind, mask, offset, advice + ("" if level == "error" else f" (checks.{code}: error makes this "
               "an error)"), code=code if level == "error" else "note:" + code)


def _convert_chunk(raw: pd.DataFrame, c: DataContract, offset: int, P: _Problems, now: pd.Timestamp,
                   notes: dict[str, int]) -> pd.DataFrame:
    cols = c.columns
    out = pd.DataFrame(index=raw.index)
    out["__row"] = np.arange(offset, offset + len(raw), dtype=np.int64)
    keep = np.ones(len(raw), dtype=bool)
    if cols.customer_id:
        miss = _blank(raw[cols.customer_id])
        if c.kind == "events" and c.events.drop_missing_customer:
            notes["rows without a customer id dropped (the contract declares them unattributable)"] += int(miss.sum())
            keep &= ~miss
        else:
            P.rows_bad(cols.customer_id, "have no customer id", miss, offset,
                       "every row must belong to a customer (the privacy unit); fix the export or set "
                       "events.drop_missing_customer in the contract", code="missing_customer_id")
        cid = raw[cols.customer_id]
        if cid.dtype.kind == "f":  # e.g. a nullable integer id read as float: 17850.0 -> '17850'
            cid = cid.map(lambda x: None if pd.isna(x) else str(int(x)) if float(x).is_integer() else str(x))
        out["__cid"] = cid.pipe(_text).str.strip()
    if c.kind == "events":
        ts_raw = raw[cols.timestamp]
        ts = _parse_ts(ts_raw, cols.timestamp_format, cols.timestamp, offset, P, keep)
        missing = _blank(ts_raw)
        P.rows_bad(cols.timestamp, "have no timestamp", missing & keep, offset,
                   "every event needs a time; drop or repair these rows in the export", code="missing_timestamp")
        bad = ts.isna().to_numpy() & ~missing
        epoch = bad & keep & (ts_raw.pipe(_text).str.strip().str.fullmatch(EPOCH_RE).fillna(False).to_numpy(dtype=bool)
                              if not pd.api.types.is_datetime64_any_dtype(ts_raw)
                              and cols.timestamp_format not in EPOCH_FORMATS else False)
        P.rows_bad(cols.timestamp, "cannot be parsed as timestamps (or are impossible dates)", bad & keep, offset,
                   (f"columns.timestamp_format {cols.timestamp_format} reads numbers of "
                    f"{'seconds' if cols.timestamp_format == 'epoch_s' else 'milliseconds'} since 1970-01-01 UTC: "
                    "repair these rows in the export, or check the unit" if cols.timestamp_format in EPOCH_FORMATS else
                    EPOCH_ADVICE if epoch.sum() > 0.9 * (bad & keep).sum() else
                    f"use ISO 8601 (YYYY-MM-DD HH:MM:SS), real calendar days between 1678 and 2261, or declare "
                    f"columns.timestamp_format" + (f" (declared {cols.timestamp_format!r})" if cols.timestamp_format else "")),
                   code="bad_timestamp")
        fut = (ts > now).fillna(False).to_numpy(dtype=bool)
        P.rows_bad(cols.timestamp, f"are in the future (after {now:%Y-%m-%d %H:%M})", fut & keep, offset,
                   "future events are clock or time-zone errors and would leak into labels; fix the source clock "
                   "or the time zone of the export", code="future_timestamp")
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
        notes[UNKNOWN_TYPES_NOTE] += int(unknown.sum())
        if cols.amount:
            amount = pd.Series(1.0, index=raw.index)
            # only purchases' amounts are summed (monetary, amount_30d/90d): a page view or ticket without one is fine
            buy = et.isin(list(c.events.purchase)).fillna(False).to_numpy(dtype=bool)
            for a in cols.amount:
                v = _to_number(raw[a], c.source.decimal)
                P.rows_bad(a, "are not numbers", (v.isna().to_numpy() & ~_blank(raw[a])) & keep, offset,
                           "amounts must be plain numbers (no currency symbols or thousands separators"
                           + ("; a decimal comma needs source.decimal: ','" if c.source.decimal == "." else "") + ")",
                           code="not_a_number")
                P.rows_bad(a, "are purchases without an amount", _blank(raw[a]) & buy & keep, offset,
                           "fill them in the export (or check events.purchase); a purchase's amount is summed into "
                           "the monetary features (other events may leave it blank)", code="missing_value")
                P.rows_bad(a, "are infinite", np.isinf(v.to_numpy()) & keep, offset, "repair these values",
                           code="infinite")
                amount = amount * v
            if c.events.amount_nonnegative:
                neg = (amount < 0).to_numpy() & buy & keep
                P.rows_bad("*".join(cols.amount), "are purchases with a negative amount", neg, offset,
                           "refunds must be separate return events; fix the sign or the event type",
                           code="negative_purchase")
            out["__amount"] = amount.fillna(0.0)
        for opt in (cols.channel, cols.product, cols.transaction):
            if opt:
                out[opt] = raw[opt].pipe(_text).str.strip().astype("category")
        for f in c.static:
            t = raw[f.column].pipe(_text).str.strip()
            if f.kind == "categorical":
                oov = ~t.isin(list(f.vocabulary)).fillna(False).to_numpy(dtype=bool) & ~_blank(raw[f.column]) & keep
                _out_of(P, c.checks.out_of_vocabulary, f.column, "have a value outside the declared vocabulary", oov,
                        offset, "they are encoded as __other__; add legitimate values to the contract's vocabulary",
                        "out_of_vocabulary")
            out[f.column] = t
    else:
        for f in c.features:
            s = raw[f.column]
            if f.kind == "numeric":
                v = _to_number(s, c.source.decimal)
                blank = _blank(s)
                P.rows_bad(f.column, "are not numbers (wrong dtype)", v.isna().to_numpy() & ~blank, offset,
                           "the contract declares this column numeric; repair the values or declare it categorical"
                           + (" (numbers written with a decimal comma need source.decimal: ',')"
                              if c.source.decimal == "." else "")
                           + "; a missing value written as a marker such as '?' or '-' must be left blank in the "
                           "export (blank, NA, N/A and NULL are read as missing and get the feature's fill)",
                           code="not_a_number")
                if f.fill is None:
                    P.rows_bad(f.column, "are missing (NaN)", blank, offset,
                               "impute in the export or declare `fill:` for this feature in the contract",
                               code="missing_value")
                arr = v.to_numpy()
                P.rows_bad(f.column, "are infinite", np.isinf(arr), offset, "repair these values", code="infinite")
                with np.errstate(invalid="ignore"):
                    oob = np.isfinite(arr) & ((arr < f.lo) | (arr > f.hi))
                _out_of(P, c.checks.out_of_bounds, f.column, f"are outside the declared bounds [{f.lo:g}, {f.hi:g}]",
                        oob, offset, "the encoding clips them to the bound; widen the contract's bounds (from public "
                        "domain knowledge) or repair the values", "out_of_bounds")
                if f.fill is not None and blank.any():
                    notes[f"missing value(s) of column {f.column!r} filled with the contract's fill: {f.fill:g}"] += int(blank.sum())
                out[f.column] = v if f.fill is None else v.fillna(f.fill)
            else:
                t = s.pipe(_text).str.strip()
                oov = ~t.isin(list(f.vocabulary)).fillna(False).to_numpy(dtype=bool)
                _out_of(P, c.checks.out_of_vocabulary, f.column, "have a value outside the declared vocabulary", oov,
                        offset, "they are encoded as __other__; add legitimate values to the contract's vocabulary "
                        "(or map them in the export)", "out_of_vocabulary")
                out[f.column] = t
        if c.label.column not in raw:  # labels=False: scoring, no label read
            return out.loc[keep]
        lab = _label_text(raw[c.label.column])
        pos, neg = lab.isin(list(c.label.positive)).fillna(False), lab.isin(list(c.label.negative)).fillna(False)
        nonbin = ~(pos | neg).to_numpy(dtype=bool)
        P.rows_bad(c.label.column, "have a label that is neither positive "
                   f"{list(c.label.positive)} nor negative {list(c.label.negative)}", nonbin, offset,
                   "labels must be binary; map the other values in the export or declare them in label.*",
                   code="label_not_binary")
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
    Every message names the column and row numbers, never a cell's value (see federation.errors.public_reason).
    """
    c = contract
    now = pd.Timestamp.now() if now is None else pd.Timestamp(now)
    source = contract_source(c, path)
    P = _Problems(source)
    required = _preflight(c, source, P, labels=labels)
    notes: dict[str, int] = _Counter()
    parts, offset = [], 0
    for chunk in source.chunks(required):
        parts.append(_convert_chunk(chunk.reset_index(drop=True), c, offset, P, now, notes))
        offset += len(chunk)
    if c.kind == "events":
        _mixed_timezones(P, c.columns.timestamp)
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    report = Report(source=source.describe, contract=c.name, contract_hash=c.contract_hash(), rows_read=offset)
    frame = _duplicates(frame, c, P, notes, drop=labels or c.kind != "table")
    n = _whole_table_checks(frame, c, P, source, delta=delta, min_customers=min_customers, report=report, labels=labels)
    problems = [p for p in P.messages() if not p.code.startswith("note:")]
    if problems:
        raise DataValidationError(problems, source=source.describe)
    if c.kind == "table" and "__cid" not in frame and "__row" in frame:
        # no id column: a customer is its data row (0 = the first row after the header), so "row-<i>" in features
        # and scores is row i of the source file, whatever was dropped before it
        frame.index = pd.Index(frame["__row"].to_numpy())
    frame = frame.drop(columns="__row") if "__row" in frame else frame
    report.rows_used, report.customers = len(frame), n
    report.notes = [f"{v} {k}" for k, v in notes.items() if v] + [
        str(p) for p in P.messages() if p.code.startswith("note:")]
    return Validated(frame=frame, report=report)


def contract_source(c: DataContract, path: str | None = None) -> Source:
    """The input a contract names (``path`` overrides its first file); shared by the streaming path."""
    src_spec = c.source
    if src_spec.format == "sql" and path is None:
        return open_source(src_spec.url, format="sql", query=src_spec.query, chunksize=src_spec.chunksize)
    location = path if path is not None else (str(c.resolve_files()[0]) if c.source.files else "")
    if not location:
        raise DataValidationError([Problem("no input: give a file or set source.files in the contract",
                                           code="no_input")], source=c.name)
    return open_source(location, format=src_spec.format if path is None else "auto", sep=src_spec.sep,
                       encoding=src_spec.encoding, chunksize=src_spec.chunksize, query=src_spec.query)


def _preflight(c: DataContract, source: Source, P: _Problems, *, labels: bool = True,
               stats: dict | None = None) -> list[str]:
    """Checks before any value is read (separator, field counts, columns, Parquet types, excluded columns);
    raises on the structural ones, returns the columns to read. ``stats`` receives the CSV record count."""
    required = [x for x in c.required_columns() if labels or c.kind != "table" or x != c.label.column]
    structure = source.structure_problems(required, stats=stats)  # CSV: wrong separator, field counts
    if any(p.code == "wrong_separator" for p in structure):
        raise DataValidationError([p for p in structure if p.code == "wrong_separator"], source=source.describe)
    available = source.columns()
    missing = column_problems(available, required) + structure + _arrow_type_problems(source.arrow_types(), c)
    if missing:  # nothing else can be checked reliably without the columns, or with shifted fields
        raise DataValidationError(missing, source=source.describe)
    for x in c.excluded_columns:
        if x in required:
            P.add(f"column {x!r} is excluded by the contract but read as a feature; remove it from the features",
                  code="excluded_column", column=x)
    return required


class _Counter(dict):
    def __missing__(self, key):
        return 0


def _duplicates(frame: pd.DataFrame, c: DataContract, P: _Problems, notes: dict[str, int], *,
                drop: bool = True) -> pd.DataFrame:
    """Exact duplicate rows (over the contract's columns): dropped when the contract declares ``deduplicate``,
    otherwise a note with the count (a customer table with ids also fails the per-customer row cap).
    ``drop=False`` (scoring a customer table: its label is not read, so rows that differ only in the label look
    equal): every row is kept and scored, with a note."""
    if not len(frame):
        return frame
    dup = frame.drop(columns="__row").duplicated().to_numpy()
    if not dup.any():
        return frame
    if c.deduplicate and not drop:
        notes["rows repeat an earlier row in every column read (the label is not read when scoring): each is "
              "scored"] += int(dup.sum())
        return frame
    _duplicate_finding(c, P, notes, dup, frame["__row"].to_numpy())
    return frame.loc[~dup].reset_index(drop=True) if c.deduplicate else frame


def _duplicate_finding(c: DataContract, P: _Problems, notes: dict[str, int], dup: np.ndarray, rows: np.ndarray) -> None:
    """Duplicates found (``dup`` marks them among rows at positions ``rows``): a count note when the contract
    drops them (``deduplicate``), else a note with their row numbers. Shared by the streaming path."""
    if c.deduplicate:
        notes["exact duplicate rows dropped (the contract declares deduplicate: true)"] += int(np.sum(dup))
        return
    what = "row" if c.kind == "table" else "event"
    P.rows_bad("", f"repeat an earlier {what} in every column the contract reads", dup, 0,
               "kept: distinct customers can share every attribute, but a line repeated by the export counts one "
               "customer twice; if the export repeats lines, set deduplicate: true in the contract",
               code="note:duplicate_rows", rows=rows)


def _whole_table_checks(frame: pd.DataFrame, c: DataContract, P: _Problems, source: Source, *,
                        delta: float | None, min_customers: int | None, report: Report, labels: bool = True) -> int:
    if not len(frame):
        P.add("the input has no usable rows; check the file and the contract's filters", code="no_rows")
        return 0
    if c.kind == "table":
        if c.columns.customer_id:
            cid = frame["__cid"]
            counts = cid.value_counts()
            over = counts[counts > c.max_rows_per_customer]
            if len(over):
                extra = (cid.groupby(cid).cumcount() >= c.max_rows_per_customer).to_numpy() & \
                    cid.isin(over.index).to_numpy(dtype=bool)
                rows = frame["__row"].to_numpy()[np.flatnonzero(extra)[:EXAMPLES]].tolist()
                P.add(f"column {c.columns.customer_id!r}: {len(over)} customer id(s) appear more than "
                      f"max_rows_per_customer={c.max_rows_per_customer} time(s) (repeats at "
                      f"{source.rows_text(rows, int(extra.sum()))}); the privacy unit is the customer, so extra rows "
                      "would silently weaken the guarantee: deduplicate the export, or raise max_rows_per_customer in "
                      "the contract (the accounting then uses group privacy of that size)",
                      code="duplicate_customer", column=c.columns.customer_id, count=len(over))
            n = int(frame["__cid"].nunique())
        else:
            n = len(frame)
        y = frame["__label"].to_numpy() if labels else frame.index.to_numpy()[:0]
        if len(y) and y.sum() == 0:
            P.add(f"column {c.label.column!r}: the label has no positive rows (positive values "
                  f"{list(c.label.positive)}); a model cannot learn {c.label.task} without positives: check "
                  "label.positive in the contract or the export's filter", code="no_positives", column=c.label.column)
        elif len(y) and y.sum() == len(y):
            P.add(f"column {c.label.column!r}: every row is positive; check label.negative or the export's filter",
                  code="no_negatives", column=c.label.column)
        if len(y):
            report.positives[c.label.task] = float(y.mean())
    else:
        n = _event_checks(frame, c, P, report, labels=labels)
    _population_checks(n, c, P, delta=delta, min_customers=min_customers)
    return n


def _population_checks(n: int, c: DataContract, P: _Problems, *, delta: float | None, min_customers: int | None) -> None:
    """Too few customers for DP, or a delta not below 1/n (shared by the streaming path)."""
    need = c.min_customers if min_customers is None else min_customers
    if n < need:
        P.add(f"only {n} customer(s), fewer than the contract's min_customers={need}: {PRIVACY_WHY}. "
              "Pool more history, join a larger partner group, or leave this partner out of DP training",
              code="too_few_customers", count=n)
    if delta is not None and n and not delta < 1.0 / n:
        P.add(f"privacy.delta={delta:g} is not below 1/n = {1.0 / n:.3g} for n={n} customers: {PRIVACY_WHY}. "
              f"Use delta <= {0.1 / n:.1g}", code="delta_too_large", column="privacy.delta")


@dataclass(frozen=True)
class EventStats:
    """What the whole-log checks need, computed by pandas (here) or by a query (federation.engine_duckdb)."""

    population: int  # customers with an activity event in the lookback window before the cutoff
    horizon_events: int  # events in [cutoff, cutoff + horizon)
    last_ts: pd.Timestamp | None  # the log's latest timestamp (None: no timestamp)
    active_in_horizon: int  # population customers with an activity event in the horizon
    bought_in_horizon: int  # population customers with a purchase in the horizon


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
    act = buy = 0
    if n:
        h = frame.loc[horizon.fillna(False)]
        het = h["__event_type"].pipe(_text)
        act = int((pd.Index(h.loc[het.isin(list(e.activity)).to_numpy(dtype=bool), "__cid"].unique()).get_indexer(pop) >= 0).sum())
        buy = int((pd.Index(h.loc[het.isin(list(e.purchase)).to_numpy(dtype=bool), "__cid"].unique()).get_indexer(pop) >= 0).sum())
    last = ts.max()
    _event_findings(EventStats(n, int(horizon.fillna(False).sum()), None if pd.isna(last) else pd.Timestamp(last), act, buy),
                    c, P, report)
    return n


def _event_findings(st: EventStats, c: DataContract, P: _Problems, report: Report) -> None:
    """The label-horizon checks of an event log, from its statistics (shared by the streaming path)."""
    e = c.events
    cutoff = pd.Timestamp(e.cutoff)
    n = st.population
    if not st.horizon_events:
        P.add(f"column {c.columns.timestamp!r}: no events in the label horizon [{cutoff:%Y-%m-%d}, "
              f"{cutoff + pd.Timedelta(days=e.horizon_days):%Y-%m-%d}) "
              + ("(no event time could be read: see the timestamp rows above)" if st.last_ts is None else
                 "(the log ends before it); every customer would count as churned: move events.cutoff earlier or "
                 "export more recent data"),
              code="no_horizon_events", column=c.columns.timestamp)
    elif st.last_ts < cutoff + pd.Timedelta(days=e.horizon_days - 1):
        short = (cutoff + pd.Timedelta(days=e.horizon_days) - st.last_ts).days
        P.add(f"column {c.columns.timestamp!r}: the log ends about {short} day(s) before the label horizon ends "
              f"({cutoff + pd.Timedelta(days=e.horizon_days):%Y-%m-%d}); labels would overstate churn: move "
              "events.cutoff earlier or shorten events.horizon_days", code="log_ends_early", column=c.columns.timestamp)
    if set(e.activity) <= set(e.purchase):
        P.add("events.activity holds only purchase types, so churn (no activity in the horizon) is exactly 'no "
              "purchase', the complement of propensity: both heads learn one label. Add the log's other activity "
              "(visits, logins, calls) to events.activity if it has any", code="note:churn_is_no_purchase",
              column="events.activity")
    if n:
        report.positives = {"churn": float(1 - st.active_in_horizon / n), "propensity": float(st.bought_in_horizon / n)}
        if st.active_in_horizon == n:
            P.add("label churn has no positives at this cutoff (every customer is active in the horizon); "
                  "check events.activity or the cutoff", code="no_positives", column="churn")
        if not st.bought_in_horizon:
            P.add("label propensity has no positives (no purchase in the horizon); check events.purchase",
                  code="no_positives", column="propensity")
