"""Out-of-core event features and validation in one DuckDB pass, in bounded memory.

``read_event_features(contract, path)`` is ``read_validated`` + ``build_features`` for event logs in Parquet or
CSV, without materialising the log in pandas: DuckDB scans the file once (parallel, spilling to
``temp_directory`` under ``memory_limit``), converts each column as validation does, and aggregates per
customer everything at once -- the feature aggregates, the labels, the static attributes and the statistics of
every contract check. Only the per-customer result (one row per customer) reaches Python.

The report is the pandas path's, message for message: rows that any check might flag ("suspect" rows: blank
ids, timestamps or amounts outside the strict formats, future or out-of-range times, negative purchases,
values outside a vocabulary) are re-read and judged by the pandas validation itself (``_convert_chunk``), in
the original chunks, so each message, count and row number comes from the same code; the whole-log checks use
the shared helpers of ``federation.validation`` on statistics computed by the query. If a suspect row passes
the pandas checks but the two conversions disagree on its value, or the input needs something the query does
not reproduce (time zone offsets in text, other Parquet types, SQL sources...), the engine falls back to the
pandas path (exact, memory not bounded) and says so in ``EngineResult.engine``.

Features equal the pandas engine's (``federation.features.raw_event_features``): both derive them from the same
per-customer aggregates (``features_from_aggregates``); counts, minima and maxima agree exactly, sums of amounts
up to floating-point summation order (relative 1e-12; the float32 encodings are compared bit for bit in
tests/data/test_engine_duckdb.py).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from federation.contract import DataContract, build_features
from federation.errors import ConfigError, DataValidationError
from federation.features import (
    EVENT_AGGREGATES,
    EventSchema,
    FeatureSet,
    encode,
    features_from_aggregates,
)
from federation.readers import Source
from federation import validation as V

NS_PER_DAY = 86_400 * 10**9
WHITESPACE = "".join(chr(i) for i in range(0x110000) if chr(i).isspace())  # what Python's str.strip() removes
PANDAS_NA = ('', '#N/A', '#N/A N/A', '#NA', '-1.#IND', '-1.#QNAN', '-NaN', '-nan', '1.#IND', '1.#QNAN', '<NA>',
             'N/A', 'NA', 'NULL', 'NaN', 'None', 'n/a', 'nan', 'null')  # pandas.read_csv's default NA strings
NUMBER_RE = r"[+-]?([0-9]+([.][0-9]*)?|[.][0-9]+)([eE][+-]?[0-9]+)?"
ISO_RE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}([ T][0-9]{2}:[0-9]{2}(:[0-9]{2}([.][0-9]{1,6})?)?)?"
TZ_RE = r"([zZ]|[+-][0-9][0-9](:?[0-9][0-9])?)$"
FORMAT_PARTS = {"%Y": "[0-9]{4}", "%m": "[0-9]{2}", "%d": "[0-9]{2}", "%H": "[0-9]{2}", "%M": "[0-9]{2}",
                "%S": "[0-9]{2}"}
TS_SAFE = ("1678-01-01", "2261-12-31")  # inside pandas' datetime64[ns] range with a margin; outside: suspect
MEMORY_RE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$", re.I)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}
# The feature pass's memory per customer (3.1 GiB peak RSS for 1.9M customers at memory_limit=4GB, one pass, no
# spilling) and the share of memory_limit a pass may plan for. Measured at 100M events / 1.9M customers, 2GB
# (/tmp experiment with benchmarks/bench_features.py's file): 1 pass (spilling) 169 s end to end, 2 passes 76 s,
# 3 passes 86 s, 4 passes 89 s, 6 passes 120 s (each pass reads the log again: ~10 s); these values give 2
BYTES_PER_CUSTOMER = 1_000
PASS_MEMORY_SHARE = 0.75
PASS_MIN_ROWS = 5_000_000  # below this the log's customers always fit: no estimate is made


def memory_bytes(limit: str) -> int:
    """'2GB' -> 2e9, '512MiB' -> 512 * 2**20 (DuckDB's units)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]+)", str(limit).strip())
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"memory limit {limit!r}: write a size such as '2GB' or '512MiB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def aggregate_passes(customers: int, memory_limit: str) -> int:
    """How many passes the feature aggregate takes so that each pass's customers fit in ``PASS_MEMORY_SHARE`` of
    ``memory_limit``: each pass aggregates the customers of one hash partition (every customer in exactly one),
    reading the log again instead of spilling the aggregate to disk (at 100M events / 2M customers and 2GB, the
    spilled single pass took 169 s end to end, two passes 76 s). A module function: tests force several passes
    through it."""
    per_pass = max(1, int(PASS_MEMORY_SHARE * memory_bytes(memory_limit) / BYTES_PER_CUSTOMER))
    return max(1, -(-int(customers) // per_pass))


@dataclass(frozen=True)
class EngineSettings:
    """Resources DuckDB may use on the node. ``memory_limit`` bounds DuckDB's buffers (it spills to
    ``temp_directory`` beyond it); ``threads`` 0 = one per core."""

    memory_limit: str = "2GB"
    threads: int = 0
    temp_directory: str = ""

    def __post_init__(self) -> None:
        if not MEMORY_RE.match(str(self.memory_limit)):
            raise ValueError(f"engine memory_limit={self.memory_limit!r}: write a size such as '2GB' or '512MiB'")
        if int(self.threads) < 0:
            raise ValueError(f"engine threads={self.threads}: must be >= 0 (0 = one per core)")


def connect(settings: EngineSettings = EngineSettings()):
    import duckdb

    con = duckdb.connect(":memory:")
    con.execute(f"SET memory_limit = '{settings.memory_limit}'")
    if settings.threads:
        con.execute(f"SET threads = {int(settings.threads)}")
    if settings.temp_directory:
        con.execute(f"SET temp_directory = {_lit(settings.temp_directory)}")
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")
    # DuckDB 2.0 rewrites a grouped count(DISTINCT x) into a CTE scanned three times plus two hash joins; on the
    # feature pass (distinct channels/products) the direct distinct aggregate costs about a
    # quarter less CPU (10M events, benchmarks/bench_features.py); results are the same
    con.execute("SET disabled_optimizers = 'distinct_aggregate_rewrite'")
    return con


def _lit(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _id(s: str) -> str:
    return '"' + str(s).replace('"', '""') + '"'


def _in(expr: str, values: tuple[str, ...]) -> str:
    return f"coalesce({expr} IN ({', '.join(map(_lit, values))}), false)" if values else "false"


# ---------------------------------------------------------------------------- the feature aggregate
def aggregate_sql(rel: str, *, cutoff: pd.Timestamp, schema: EventSchema, lookback_days: int,
                  horizon_days: int | None, has: dict[str, bool], extra: tuple[str, ...] = (),
                  derived: tuple[str, ...] = ()) -> str:
    """One GROUP BY cid over ``rel`` (columns cid, ts, et, amt and, where ``has``, ch, prod, tx): every name in
    EVENT_AGGREGATES, plus labels (``label_active``/``label_bought``) when ``horizon_days`` is given, plus
    ``extra`` select expressions (they may use ``age`` and the type bits ``m``: 1 activity, 2 purchase, 4 support,
    8 return) and the per-row ``derived`` columns. Ages are computed as the pandas engine does: (cutoff - ts) in ns
    / 1 day."""
    s = schema
    cut = int(pd.Timestamp(cutoff).value)
    L = float(lookback_days)
    amt = "CASE WHEN isfinite(amt) THEN amt ELSE 0.0 END" if has.get("amt") else "0.0"

    def occ(mask: str) -> str:
        return f"count(DISTINCT tx) FILTER (WHERE {mask})" if has.get("tx") else f"count(*) FILTER (WHERE {mask})"

    def dist(col: str) -> str:
        return f"count(DISTINCT {col}) FILTER (WHERE win)" if has.get(col) else "0"

    aggs = {
        "recency_days": "min(age) FILTER (WHERE act)", "tenure_days": "max(age) FILTER (WHERE pre)",
        "frequency": occ("buy"), "monetary": f"sum({amt}) FILTER (WHERE buy)",
        "events_7d": "count(*) FILTER (WHERE act AND age <= 7)", "events_30d": "count(*) FILTER (WHERE act AND age <= 30)",
        "events_90d": "count(*) FILTER (WHERE act AND age <= 90)", "purchases_30d": occ("buy AND age <= 30"),
        "purchases_90d": occ("buy AND age <= 90"), "amount_30d": f"sum({amt}) FILTER (WHERE buy AND age <= 30)",
        "amount_90d": f"sum({amt}) FILTER (WHERE buy AND age <= 90)",
        "support_90d": "count(*) FILTER (WHERE sup AND age <= 90)", "returns_90d": "count(*) FILTER (WHERE ret AND age <= 90)",
        "events_30_90": "count(*) FILTER (WHERE act AND age > 30 AND age <= 90)",
        "activity_events": "count(*) FILTER (WHERE act)", "activity_oldest": "max(age) FILTER (WHERE act)",
        "purchase_newest": "min(age) FILTER (WHERE buy)", "purchase_oldest": "max(age) FILTER (WHERE buy)",
        "return_rows": "count(*) FILTER (WHERE ret)", "purchase_rows": "count(*) FILTER (WHERE buy)",
        "distinct_channels": dist("ch"), "distinct_products": dist("prod"),
    }
    assert tuple(aggs) == EVENT_AGGREGATES
    sel = [f"{e} AS {k}" for k, e in aggs.items()]
    if horizon_days is not None:
        H = float(horizon_days)
        sel += [f"count(*) FILTER (WHERE age <= 0 AND age > -{H!r} AND (m & 1) <> 0) > 0 AS label_active",
                f"count(*) FILTER (WHERE age <= 0 AND age > -{H!r} AND (m & 2) <> 0) > 0 AS label_bought"]
    sel += list(extra)
    # each row's type is tested against each set once (bits of m), its age computed once; the FILTERs test bits
    mask = " + ".join(f"(CASE WHEN {_in('et', types)} THEN {bit} ELSE 0 END)" for bit, types in (
        (1, s.activity_types), (2, s.purchase_types), (4, s.support_types), (8, s.return_types)))
    flags = (f"(CAST({cut} AS BIGINT) - epoch_ns(ts))::DOUBLE / {float(NS_PER_DAY)!r} AS age, "
             f"CAST({mask} AS TINYINT) AS m")
    return f"""
WITH a AS (SELECT *, {flags} FROM {rel}),
b AS (SELECT *, age > 0 AND cid IS NOT NULL AS pre, age > 0 AND cid IS NOT NULL AND age <= {L!r} AS win FROM a),
c AS (SELECT *, win AND (m & 1) <> 0 AS act, win AND (m & 2) <> 0 AS buy,
             win AND (m & 4) <> 0 AS sup, win AND (m & 8) <> 0 AS ret{''.join(', ' + d for d in derived)} FROM b)
SELECT cid, {', '.join(sel)} FROM c GROUP BY cid"""


def _base(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Aggregates as the pandas engine holds them: empty min -> +inf, empty max -> -inf, empty sum -> 0."""
    out = {}
    for k in EVENT_AGGREGATES:
        v = pd.to_numeric(df[k]).to_numpy(dtype=np.float64, na_value=np.nan)
        fill = np.inf if k in ("recency_days", "purchase_newest") else -np.inf if k in (
            "tenure_days", "activity_oldest", "purchase_oldest") else 0.0
        out[k] = np.where(np.isnan(v), fill, v)
    return out


def frame_event_features(events: pd.DataFrame, *, cutoff: pd.Timestamp, schema: EventSchema = EventSchema(),
                         lookback_days: int = 365, settings: EngineSettings = EngineSettings()) -> pd.DataFrame:
    """``raw_event_features`` computed by DuckDB over an in-memory frame (same result)."""
    s = schema
    has = {"amt": s.amount in events, "ch": bool(s.channel) and s.channel in events,
           "prod": bool(s.product) and s.product in events, "tx": bool(s.transaction) and s.transaction in events}
    cols = [f"{_id(s.customer_id)} AS cid", f"{_id(s.timestamp)} AS ts", f"CAST({_id(s.event_type)} AS VARCHAR) AS et"]
    if has["amt"]:
        cols.append(f"TRY_CAST({_id(s.amount)} AS DOUBLE) AS amt")
    for key, col in (("ch", s.channel), ("prod", s.product), ("tx", s.transaction)):
        if has[key]:
            cols.append(f"CAST({_id(col)} AS VARCHAR) AS {key}")
    con = connect(settings)
    try:
        con.register("events_frame", events)
        sql = aggregate_sql(f"(SELECT {', '.join(cols)} FROM events_frame)", cutoff=cutoff, schema=s,
                            lookback_days=lookback_days, horizon_days=None, has=has)
        df = con.execute(f"SELECT * FROM ({sql}) WHERE cid IS NOT NULL ORDER BY cid").df()
    finally:
        con.close()
    return features_from_aggregates(pd.Index(df["cid"].to_numpy(), name="customer_id"), _base(df),
                                    lookback_days=lookback_days)


# ---------------------------------------------------------------------------- the streaming path
@dataclass
class EngineResult:
    features: FeatureSet
    report: V.Report
    engine: str  # "duckdb" | "pandas (fallback: <why>)"
    timings: dict[str, float] = field(default_factory=dict)


class _Fallback(Exception):
    """The query cannot reproduce the pandas path on this input (reason in the message)."""


def read_event_features(contract: DataContract, path: str | None = None, *, delta: float | None = None,
                        now: pd.Timestamp | str | None = None, min_customers: int | None = None,
                        settings: EngineSettings = EngineSettings(), allow_fallback: bool = True) -> EngineResult:
    """Validate an event log and build its FeatureSet in one streaming pass (see the module docstring).
    Raises the same DataValidationError as ``read_validated``."""
    c = contract
    if c.kind != "events":
        raise ValueError(f"contract {c.name!r} is a {c.kind}: read_event_features is for event logs")
    now = pd.Timestamp.now() if now is None else pd.Timestamp(now)
    try:
        return _stream(c, path, delta=delta, now=now, min_customers=min_customers, settings=settings)
    except _Fallback as why:
        if not allow_fallback:
            raise
        v = V.read_validated(c, path, delta=delta, now=now, min_customers=min_customers)
        return EngineResult(build_features(v.frame, c), v.report, f"pandas (fallback: {why})")


def _source_sql(source: Source, required: list[str]) -> tuple[str, dict[str, str]]:
    """FROM clause with __row (0-based data row) and the column types DuckDB will see."""
    if source.format == "parquet":
        types = source.arrow_types()
        return f"read_parquet({_lit(source.location)}, file_row_number = true)", types
    if source.format != "csv":
        raise _Fallback(f"{source.format} sources are read by the pandas path")
    if source.encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
        raise _Fallback(f"encoding {source.encoding}")
    opts = (f"all_varchar = true, header = true, delim = {_lit(source.sep)}, quote = '\"', escape = '\"', "
            f"nullstr = [{', '.join(map(_lit, PANDAS_NA))}], allow_quoted_nulls = true, strict_mode = true")
    return f"read_csv({_lit(source.location)}, {opts})", {c: "string" for c in required}


def _is_text(t: str) -> bool:
    return t in ("string", "large_string") or (t.startswith("dictionary<values=string") or
                                             t.startswith("dictionary<values=large_string"))


def _text(col: str, t: str) -> str:
    if _is_text(t):  # str.strip(), as validation does; trim() with this set is slow, so only when an end is not
        # a printable ASCII character (every whitespace character Python strips is below '!' or above '~')
        x, w = _id(col), _lit(WHITESPACE)
        safe = f"{x} >= '!' AND {x} < '\x7f' AND {x}[-1] >= '!' AND {x}[-1] < '\x7f'"
        return f"(CASE WHEN {safe} THEN {x} ELSE trim({x}, {w}) END)"
    raise _Fallback(f"column {col!r} of Parquet type {t} is read by the pandas path")


def _format_regex(fmt: str) -> str:
    out, i = [], 0
    while i < len(fmt):
        part = fmt[i:i + 2]
        if part in FORMAT_PARTS:
            out.append(FORMAT_PARTS[part])
            i += 2
        elif fmt[i] in "-/ :T.":
            out.append(re.escape(fmt[i]) if fmt[i] not in "-/ :T" else fmt[i])
            i += 1
        else:
            raise _Fallback(f"timestamp_format {fmt!r} (directive {fmt[i:i + 2]!r})")
    return "".join(out)


def _typed_view(c: DataContract, src: str, types: dict[str, str], csv: bool, now: pd.Timestamp,
                rownum: bool = True) -> tuple[str, dict]:
    """SELECT of the typed columns (as validation converts them) plus the per-row flags keep/suspect/unknown/aware;
    ``__row`` (the data row) only with ``rownum`` (``src`` then has it)."""
    cols, e = c.columns, c.events
    sel = ["__row"] if rownum else []
    suspect = []
    ct = types[cols.customer_id]
    if re.fullmatch(r"u?int(8|16|32|64)", ct):  # group by the integer; its text (validation's id) at the end
        blank_cid, cid_text = f"({_id(cols.customer_id)} IS NULL)", "CAST(cid AS VARCHAR)"
        sel.append(f"{_id(cols.customer_id)} AS cid")
    else:
        cid_t, cid_text = _text(cols.customer_id, ct), "cid"
        blank_cid = f"({cid_t} IS NULL OR {cid_t} = '')"
        sel.append(f"CASE WHEN {blank_cid} THEN NULL ELSE {cid_t} END AS cid")
    keep = f"NOT {blank_cid}" if e.drop_missing_customer else "true"
    suspect.append(blank_cid)
    # timestamps
    tcol, tt = cols.timestamp, types[cols.timestamp]
    if cols.timestamp_format in V.EPOCH_FORMATS:  # exact float-to-ns conversion as pandas does it: that path
        raise _Fallback(f"Unix-time timestamps (columns.timestamp_format {cols.timestamp_format})")
    aware = "false"
    if tt.startswith("timestamp"):
        raw = _id(tcol)
        ts = f"timezone('UTC', {raw})" if "tz=" in tt else raw
    elif _is_text(tt):
        t = _text(tcol, tt)
        aware = f"coalesce(regexp_matches({t}, {_lit(TZ_RE)}) AND {t} <> '', false)"
        if cols.timestamp_format:
            pat = _format_regex(cols.timestamp_format)
            parsed = f"try_strptime({t}, {_lit(cols.timestamp_format)})"
        else:
            pat, parsed = ISO_RE, f"TRY_CAST({t} AS TIMESTAMP)"
        ts = f"CASE WHEN regexp_full_match({t}, {_lit(pat)}) THEN {parsed} END"
        suspect.append(f"NOT coalesce(regexp_full_match({t}, {_lit(pat)}), false)")
    else:
        raise _Fallback(f"timestamp column of Parquet type {tt}")
    # outside pandas' nanosecond range (with a margin) a time is NULL here and the row suspect (pandas judges it)
    lo, hi = TS_SAFE
    sel.append(f"CASE WHEN {ts} >= TIMESTAMP {_lit(lo)} AND {ts} <= TIMESTAMP {_lit(hi)} THEN {ts} END AS ts")
    late = [f"(ts IS NULL OR epoch_ns(ts) > {int(now.value)})"]
    # event type
    et_t = _text(cols.event_type, types[cols.event_type])
    if e.event_type_rule == "prefix":
        whens = " ".join(f"WHEN starts_with({et_t}, {_lit(p)}) THEN {_lit(typ)}" for p, typ in reversed(e.event_type_map))
        et = f"CASE {whens} ELSE {_lit(e.event_type_default)} END" if whens else _lit(e.event_type_default)
    else:
        et = et_t
    sel.append(f"{et} AS et")
    known = tuple(dict.fromkeys(e.activity + e.purchase + e.returns + e.support))
    unknown = f"NOT {_in('et', known)}"  # in the outer SELECT, on the inner's et: the text is cleaned once per row
    # amounts: the product of the declared columns, as validation computes it
    has = {"amt": bool(cols.amount)}
    if cols.amount:
        factors = []
        for a in cols.amount:
            at = types[a]
            if _is_text(at):
                t = _text(a, at)
                factors.append(f"CASE WHEN regexp_full_match({t}, {_lit(NUMBER_RE)}) THEN TRY_CAST({t} AS DOUBLE) END")
                suspect.append(f"NOT coalesce(regexp_full_match({t}, {_lit(NUMBER_RE)}), false)")
            elif re.fullmatch(r"u?int(8|16|32|64)|float|double|halffloat", at):
                factors.append(f"CAST({_id(a)} AS DOUBLE)")
                suspect.append(f"NOT coalesce(isfinite(CAST({_id(a)} AS DOUBLE)), false)")
            else:
                raise _Fallback(f"amount column {a!r} of Parquet type {at}")
        amt = "(" + " * ".join(["1.0"] + factors) + ")"
        sel.append(f"{amt} AS amt")
        if e.amount_nonnegative:
            late.append(f"coalesce(amt < 0 AND {_in('et', e.purchase)}, false)")
    for key, col in (("ch", cols.channel), ("prod", cols.product), ("tx", cols.transaction)):
        has[key] = bool(col)
        if col:
            sel.append(f"{_text(col, types[col])} AS {key}")
    static = []
    for i, f in enumerate(c.static):
        t = _text(f.column, types[f.column])
        sel.append(f"{t} AS s{i}")
        static.append(f"s{i}")
        if f.kind == "categorical":
            suspect.append(f"({t} <> '' AND NOT {_in(t, tuple(f.vocabulary))})")
    sel += [f"{keep} AS keep", f"coalesce({' OR '.join(suspect)}, false) AS early", f"{aware} AS aware"]
    typed = f"SELECT {', '.join(sel)} FROM {src}"
    flags = f"{unknown} AS unknown, coalesce(early OR {' OR '.join(late)}, false) AS suspect"
    return f"SELECT * EXCLUDE (early), {flags} FROM ({typed})", {**has, "static": static, "cid_text": cid_text}


class _MappedProblems(V._Problems):
    """Problems from a batch of selected rows: position i of the batch is data row ``rowmap[i]``."""

    rowmap: np.ndarray = np.zeros(0, dtype=np.int64)

    def rows_bad(self, column, kind, mask, offset, advice, *, code, rows=None):  # noqa: D102
        super().rows_bad(column, kind, mask, 0, advice, code=code, rows=self.rowmap if rows is None else rows)


def _stream(c: DataContract, path: str | None, *, delta, now: pd.Timestamp, min_customers, settings) -> EngineResult:
    import time

    t0 = time.perf_counter()
    source = V.contract_source(c, path)
    if source.format not in ("csv", "parquet"):
        raise _Fallback(f"{source.format} sources are read by the pandas path")
    if c.source.decimal != ".":
        raise _Fallback("numbers with a decimal comma (source.decimal) are read by the pandas path")
    P = _MappedProblems(source)
    stats: dict = {}
    required = V._preflight(c, source, P, stats=stats)
    src, types = _source_sql(source, required)
    csv = source.format == "csv"
    con = connect(settings)
    timings: dict[str, float] = {}
    try:
        if csv:  # row numbers need the file order: one single-threaded read into a table (spills under memory_limit)
            con.execute("SET preserve_insertion_order = true")
            con.execute(f"CREATE TEMP TABLE raw_rows AS SELECT row_number() OVER () - 1 AS __row, "
                        f"{', '.join(map(_id, required))} FROM {src}")
            src = "raw_rows"
        con.execute("SET preserve_insertion_order = false")
        # the main pass reads row numbers only where it orders by them (static attributes, deduplication); the
        # follow-up queries (suspect rows, duplicates: run only when the pass found some) read them from evr
        rownum = csv or bool(c.static) or c.deduplicate
        srcr = src if csv else f"(SELECT file_row_number AS __row, * FROM {src})"
        view, has = _typed_view(c, srcr if rownum else src, types, csv, now, rownum=rownum)
        con.execute(f"CREATE TEMP VIEW ev AS {view}")
        con.execute(f"CREATE TEMP VIEW evr AS {view if rownum else _typed_view(c, srcr, types, csv, now)[0]}")
        timings["prepare"] = time.perf_counter() - t0
        e = c.events
        cut = pd.Timestamp(e.cutoff)
        cut_ns = int(cut.value)
        hz_ns = int((cut + pd.Timedelta(days=e.horizon_days)).value)
        ts_ns = "epoch_ns(ts)"
        in_h = f"({ts_ns} >= {cut_ns} AND {ts_ns} < {hz_ns})"
        dup_cols = ["ts", "et"] + (["amt"] if has["amt"] else []) + [k for k in ("ch", "prod", "tx") if has[k]] + has["static"]
        # Validation statistics ride on the feature pass at little cost: a row is kept iff its cid is not NULL (or
        # always), so "kept" is a property of the group; per-row conditions that only need to exist in a group are
        # one bool_or each; the type tests reuse the aggregate's bits m (the contract's sets are the schema's).
        kept = "cid IS NOT NULL" if e.drop_missing_customer else "true"
        sc = c.schema()
        if (sc.activity_types, sc.purchase_types) != (e.activity, e.purchase):  # the bits m would mean other sets
            raise _Fallback("the contract's event schema names other activity/purchase types than its events block")
        # A group's population, horizon and label facts are aggregates the feature pass computes anyway
        # (activity_events > 0: an activity in the lookback window; label_active / label_bought: one in the
        # horizon); only "has a suspect row" and "has a text time with an offset" are extra. (A NULL-id group
        # is counted only with drop_missing_customer, where it is not kept; otherwise its rows are an error.)
        derived = (f"coalesce({in_h}, false) AS hz",)
        extra = (
            "count(*) AS n_rows", "count(*) FILTER (WHERE m = 0) AS n_unknown", "bool_or(suspect) AS any_suspect",
            "bool_or(aware) AS any_aware", f"max({ts_ns}) AS last_ts", "count(*) FILTER (WHERE hz) AS n_horizon",
            *(f"arg_max({s}, ({ts_ns}, __row)) FILTER (WHERE {ts_ns} < {cut_ns} AND {s} IS NOT NULL) AS {s}"
              for s in has["static"]),
        )
        rel = "ev"
        if c.deduplicate:  # aggregate the first occurrence of each row only (the others are counted below)
            con.execute(f"CREATE TEMP VIEW evd AS SELECT * FROM ev QUALIFY NOT keep OR row_number() OVER "
                        f"(PARTITION BY cid, {', '.join(dup_cols)} ORDER BY __row) = 1")
            rel = "evd"
        n_src = int(con.execute(f"SELECT count(*) FROM {src}").fetchone()[0])  # Parquet: from the metadata
        # the estimate reads the raw id column only (not the typed view: no text cleaning, no flags); untrimmed
        # text ids can only count more customers, i.e. plan more passes, never too few
        est = (int(con.execute(f"SELECT approx_count_distinct({_id(c.columns.customer_id)}) FROM {src}").fetchone()[0]
                   or 0) if n_src >= PASS_MIN_ROWS else 0)
        passes = aggregate_passes(est, settings.memory_limit) if est else 1
        for i in range(passes):  # a customer's rows are all in one pass (hash of its id): the union is exact
            part = rel if passes == 1 else f"(SELECT * FROM {rel} WHERE hash(cid) % {passes} = {i})"
            sql = aggregate_sql(part, cutoff=cut, schema=sc, lookback_days=e.lookback_days,
                                horizon_days=e.horizon_days, has=has, extra=extra, derived=derived)
            con.execute(f"CREATE TEMP TABLE agg AS {sql}" if i == 0 else f"INSERT INTO agg {sql}")
        timings["aggregate"] = time.perf_counter() - t0 - timings["prepare"]
        timings["aggregate_passes"] = float(passes)
        k = f"FILTER (WHERE {kept})"
        pop = f"{kept} AND activity_events > 0"
        tot = con.execute(  # n_suspect, n_aware: groups with such a row (only their existence matters)
            f"SELECT sum(n_rows), sum(n_rows) {k}, count(*) FILTER (WHERE any_suspect), sum(n_unknown) {k}, "
            f"count(*) FILTER (WHERE any_aware), max(last_ts) {k}, sum(n_horizon) {k}, "
            f"count(*) FILTER (WHERE {pop}), count(*) FILTER (WHERE {pop} AND label_active), "
            f"count(*) FILTER (WHERE {pop} AND label_bought) FROM agg").fetchone()
        n_rows, n_kept, n_suspect, n_unknown, n_aware, last_ts, n_h, n_pop, n_act, n_buy = \
            [0 if v is None and i != 5 else v for i, v in enumerate(tot)]
        if c.deduplicate:  # counts before deduplication, as validation reports them
            n_rows, n_kept, n_suspect, n_unknown, n_aware = con.execute(
                "SELECT count(*), count(*) FILTER (WHERE keep), count(*) FILTER (WHERE suspect), "
                "count(*) FILTER (WHERE unknown AND keep), count(*) FILTER (WHERE aware) FROM ev").fetchone()
        if n_aware:
            raise _Fallback("timestamps with a UTC offset in text")
        if csv and stats.get("records") is not None and int(n_rows) != int(stats["records"]):
            raise _Fallback("DuckDB and the CSV structure pass disagree on the number of records")
        notes: dict[str, int] = V._Counter()
        t1 = time.perf_counter()
        if n_suspect:
            _judge_suspects(con, c, source, required, P, now, notes, has["cid_text"])
        timings["suspects"] = time.perf_counter() - t1
        notes[V.UNKNOWN_TYPES_NOTE] = int(n_unknown)
        V._mixed_timezones(P, c.columns.timestamp)
        t1 = time.perf_counter()
        dup_rows = _duplicate_rows(con, c.deduplicate, ["cid"] + dup_cols)
        if len(dup_rows):
            V._duplicate_finding(c, P, notes, np.ones(len(dup_rows), dtype=bool), dup_rows)
        n_dups = int(len(dup_rows))
        timings["duplicates"] = time.perf_counter() - t1
        report = V.Report(source=source.describe, contract=c.name, contract_hash=c.contract_hash(), rows_read=int(n_rows))
        used = int(n_kept) - (n_dups if c.deduplicate else 0)
        if not used:
            n = V._whole_table_checks(pd.DataFrame(), c, P, source, delta=delta, min_customers=min_customers,
                                      report=report)
        else:
            n = int(n_pop)
            last = None if last_ts is None else pd.Timestamp(last_ts)
            V._event_findings(V.EventStats(n, int(n_h), last, int(n_act), int(n_buy)), c, P, report)
            V._population_checks(n, c, P, delta=delta, min_customers=min_customers)
        problems = [p for p in P.messages() if not p.code.startswith("note:")]
        if problems:
            raise DataValidationError(problems, source=source.describe)
        report.rows_used, report.customers = used, n
        report.notes = [f"{v} {k}" for k, v in notes.items() if v] + [
            str(p) for p in P.messages() if p.code.startswith("note:")]
        t1 = time.perf_counter()
        names = list(EVENT_AGGREGATES) + ["label_active", "label_bought"] + has["static"]
        df = con.execute(f"SELECT {has['cid_text']} AS cid, {', '.join(names)} FROM agg WHERE cid IS NOT NULL AND "
                         f"recency_days IS NOT NULL ORDER BY {has['cid_text']}").df()
        timings["fetch"] = time.perf_counter() - t1
    finally:
        con.close()
    t2 = time.perf_counter()
    fs = _feature_set(df, c, has["static"])
    timings["encode"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0
    return EngineResult(fs, report, "duckdb", timings)


def dup_screen_key(cols: list[str]) -> str:
    """The duplicate screen's key: rows equal in every column share it (DuckDB's hash() maps -0.0 and 0.0, and
    every NaN, NULL and value alike, as the exact query's PARTITION BY does), so it finds every duplicate; rows
    that only share it (a 64-bit collision) are cleared by the exact query. A module function: tests force
    collisions through it."""
    return f"hash({', '.join(cols)})"


def _duplicate_rows(con, deduplicate: bool, cols: list[str]) -> np.ndarray:
    """Data rows (sorted) that repeat an earlier kept row in every column of ``cols``, as validation finds them.
    A screen first: the keys of every kept row, sorted (one parallel sort that spills under memory_limit), each
    compared with the one before it; a key equal to its predecessor is one seen twice or more -- the keys a GROUP
    BY k HAVING count(*) > 1 keeps, for about half its CPU time and memory at 10M-30M events
    (benchmarks/bench_features.py; a window partitioned by the key's high bits was slower). Only the rows with
    such a key -- usually none -- go to the exact row_number() query, which numbers each group of equal rows in
    file order. With ``deduplicate`` the main pass has numbered them already (view evd) and every
    kept row goes to the exact query."""
    key = dup_screen_key(cols)
    where = "keep"
    if not deduplicate:  # the key is never NULL (hash()), so k = lag(k) misses no group
        con.execute(f"CREATE TEMP TABLE dup_keys AS SELECT DISTINCT k FROM (SELECT k, lag(k) OVER (ORDER BY k) AS p "
                    f"FROM (SELECT {key} AS k FROM ev WHERE keep)) WHERE k = p")
        if not con.execute("SELECT count(*) FROM dup_keys").fetchone()[0]:
            return np.zeros(0, dtype=np.int64)
        where = f"keep AND {key} IN (SELECT k FROM dup_keys)"
    rows = con.execute(f"SELECT __row FROM (SELECT __row, row_number() OVER (PARTITION BY {', '.join(cols)} "
                       f"ORDER BY __row) AS k FROM evr WHERE {where}) WHERE k > 1 ORDER BY __row").fetchnumpy()["__row"]
    return np.asarray(rows, dtype=np.int64)


def _feature_set(df: pd.DataFrame, c: DataContract, static: list[str]) -> FeatureSet:
    ids = df["cid"].to_numpy(dtype=object)
    raw = features_from_aggregates(pd.Index(ids, name="customer_id"), _base(df), lookback_days=c.events.lookback_days)
    cats = tuple(f.encoder() for f in c.static if f.kind == "categorical")
    for f, s in zip(c.static, static):
        raw[f.column] = df[s].to_numpy(dtype=object)
    X, names = encode(raw, c.events.feature_bounds, cats)
    y = {"churn": (~df["label_active"].to_numpy(dtype=bool)).astype(np.float32),
         "propensity": df["label_bought"].to_numpy(dtype=bool).astype(np.float32)}
    return FeatureSet(customer_ids=ids, X=X, y=y, feature_names=names)


def _judge_suspects(con, c: DataContract, source: Source, required: list[str], P: _MappedProblems,
                    now: pd.Timestamp, notes: dict[str, int], cid_text: str) -> None:
    """Run the pandas conversion (validation's own checks and messages) on the suspect rows of each original
    chunk, in file order; then insist that, where pandas accepts a row, both conversions agree on its values."""
    suspects = np.sort(con.execute("SELECT __row FROM evr WHERE suspect").fetchnumpy()["__row"].astype(np.int64))
    mine = con.execute(f"SELECT __row, {cid_text} AS cid, epoch_ns(ts) AS ts, et" + (", amt" if c.columns.amount else "") +
                       " FROM evr WHERE suspect AND keep ORDER BY __row").df()
    theirs, offset = [], 0
    for chunk in source.chunks(required):
        lo, hi = np.searchsorted(suspects, [offset, offset + len(chunk)])
        if hi > lo:
            idx = suspects[lo:hi]
            P.rowmap = idx
            part = V._convert_chunk(chunk.iloc[idx - offset].reset_index(drop=True), c, 0, P, now, notes)
            part["__row"] = idx[part["__row"].to_numpy()]
            theirs.append(part)
        offset += len(chunk)
    if any(not p.code.startswith("note:") for p in P.messages()):
        return  # the input fails: the report is exact, the values do not matter
    t = pd.concat(theirs, ignore_index=True) if theirs else pd.DataFrame(columns=["__row"])
    if len(t) != len(mine) or not np.array_equal(t["__row"].to_numpy(np.int64), mine["__row"].to_numpy(np.int64)):
        raise _Fallback("suspect rows differ between the query and pandas")
    same = [t["__cid"].astype(object).tolist() == mine["cid"].astype(object).tolist(),
            np.array_equal(t["__ts"].to_numpy("datetime64[ns]").astype(np.int64), mine["ts"].to_numpy(np.int64)),
            t["__event_type"].astype(str).tolist() == mine["et"].astype(str).tolist()]
    if c.columns.amount:
        same.append(np.array_equal(t["__amount"].to_numpy(np.float64), mine["amt"].fillna(0.0).to_numpy(np.float64)))
    if not all(same):
        raise _Fallback("a row accepted by validation converts differently in the query")


def default_settings(memory_limit: str = "2GB", node_config: dict | None = None) -> EngineSettings:
    """A node's settings: node config ``duckdb-memory-limit`` / ``duckdb-threads`` / ``duckdb-temp`` first, then the
    environment (FEDPROP_DUCKDB_MEMORY, FEDPROP_DUCKDB_THREADS, FEDPROP_DUCKDB_TEMP), then ``memory_limit`` (the run
    config's ``data.engine_memory_limit``). A bad value fails naming the key it came from."""
    nc = node_config or {}

    def pick(key: str, env: str, default: str) -> tuple[str, str]:
        if str(nc.get(key, "")).strip():
            return str(nc[key]).strip(), f"node config {key}"
        if os.environ.get(env, "").strip():
            return os.environ[env].strip(), env
        return default, "data.engine_memory_limit" if key == "duckdb-memory-limit" else key

    (mem, mem_from), (thr, thr_from), (tmp, _) = (pick("duckdb-memory-limit", "FEDPROP_DUCKDB_MEMORY", memory_limit),
                                                  pick("duckdb-threads", "FEDPROP_DUCKDB_THREADS", "0"),
                                                  pick("duckdb-temp", "FEDPROP_DUCKDB_TEMP", ""))
    if not MEMORY_RE.match(mem):
        raise ConfigError(f"{mem_from}={mem!r}: write a size such as '2GB' or '512MiB'")
    if not re.fullmatch(r"\d+", thr):
        raise ConfigError(f"{thr_from}={thr!r}: write a number of threads >= 0 (0 = one per core)")
    return EngineSettings(memory_limit=mem, threads=int(thr), temp_directory=tmp)
