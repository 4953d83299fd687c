"""`fedprop data check CONTRACT FILE` and `fedprop data propose FILE`: run at a partner, on its own data.

check: reads only the contract's columns, runs every validation check, prints one report and exits
0 (valid), 1 (the data breaks the contract) or 2 (the contract itself or the input cannot be used).
Nothing is trained, written or modified. propose: prints a draft contract (YAML) for a customer table,
with a warning that its bounds come from one partner's data, are NOT differentially private and must
be reviewed.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import yaml

from federation.contract import CHURN_NAMES, PROPOSAL_WARNING, _norm, load_contract, propose_contract
from federation.errors import ConfigError, DataValidationError
from federation.readers import SEPARATORS, open_source, read_frame
from federation.validation import EPOCH_FORMATS, EPOCH_RE, read_validated


def register(subparsers) -> argparse.ArgumentParser:
    """Mount `data` (check / propose) on an argparse subparsers object."""
    p = subparsers.add_parser("data", help="check a partner's data against a contract, or propose a contract")
    sub = p.add_subparsers(dest="data_command", required=True)
    c = sub.add_parser("check", help="validate FILE against CONTRACT; exit non-zero on any problem")
    c.add_argument("contract", help="contract YAML (conf/contracts/<name>.yaml) or a conf/data/<name>.yaml")
    c.add_argument("file", nargs="?", default=None, help="input file (default: the contract's source.files)")
    c.add_argument("--delta", type=float, default=None, help="the run's DP delta: also check delta < 1/n")
    c.set_defaults(func=_check)
    pr = sub.add_parser("propose", help="print a draft contract for a customer table or an event log (review it: not DP)")
    pr.add_argument("file")
    pr.add_argument("--kind", choices=("table", "events"), default="table",
                    help="table: one row per customer (default); events: one row per event of a customer")
    pr.add_argument("--label", default="", help="table: the label column (default: inferred from its name, e.g. Churn, Exited, y)")
    pr.add_argument("--task", choices=("churn", "propensity"), default=None, help="table: what the label means (default: from its name)")
    pr.add_argument("--id", default="", dest="id_column", help="the customer id column (default: inferred; never a feature)")
    pr.add_argument("--timestamp", default="", help="events: the event time column (default: inferred from its name)")
    pr.add_argument("--event-type", default="", help="events: the event type column")
    pr.add_argument("--amount", default="", help="events: the amount column")
    pr.add_argument("--name", default="")
    pr.add_argument("--sep", default=None, help="CSV separator (default: detected from the header among , ; tab |)")
    pr.add_argument("--encoding", default="utf-8",
                    help="CSV text encoding, drafted as source.encoding (default utf-8; e.g. latin-1, cp1252)")
    pr.add_argument("--rows", type=int, default=100_000,
                    help="read at most this many rows, the first ones of the file (default 100000)")
    pr.set_defaults(func=_propose)
    return p


def _check(args) -> int:
    try:
        contract = load_contract(args.contract)
    except ConfigError as exc:
        print(f"CONTRACT ERROR: {exc}", file=sys.stderr)
        return 2
    try:
        v = read_validated(contract, args.file, delta=args.delta)
    except DataValidationError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        print("Nothing was trained, written or modified. Fix the problems above and run the check again.",
              file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # any other unreadable input: still one clear line, no traceback
        print(f"FAILED: cannot use {args.file or contract.source.files}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(v.report.summary())
    return 0


def _sniff_sep(src) -> str:
    """The separator among SEPARATORS that splits the CSV header into the most fields (',' when none splits it)."""
    try:
        with src._open_text() as fh:
            header = fh.readline()
    except (OSError, UnicodeDecodeError):
        return ","
    best = max(SEPARATORS, key=lambda s: len(next(csv.reader([header], delimiter=s), [])))
    return best if len(next(csv.reader([header], delimiter=best), [])) > 1 else ","


# strptime formats tried, in this order, on an event log's timestamps that are not ISO 8601 (day first before month
# first: an ambiguous sample, every day <= 12, is reported)
_DATES = ("%d/%m/%Y", "%m/%d/%Y", "%d.%m.%Y", "%d-%m-%Y", "%m-%d-%Y", "%Y/%m/%d", "%d/%m/%y", "%m/%d/%y", "%Y%m%d")
_TIMES = ("", " %H:%M", " %H:%M:%S", " %H:%M:%S.%f", " %I:%M %p", " %I:%M:%S %p")
TIMESTAMP_FORMATS = tuple(d + t for d in _DATES for t in _TIMES)


def _timestamp_format(values) -> tuple[str, list[str]]:
    """("", []) when the sample parses as ISO 8601 (or is already a datetime); else (the first format of
    TIMESTAMP_FORMATS that parses every non-blank value, the other formats that also do)."""
    import pandas as pd

    if pd.api.types.is_datetime64_any_dtype(values):
        return "", []
    t = values.dropna().astype("string").str.strip()
    t = t[t != ""]
    if t.empty or pd.to_datetime(t, format="ISO8601", errors="coerce").notna().all():
        return "", []
    head = t.head(2000)
    fits = [f for f in TIMESTAMP_FORMATS if pd.to_datetime(head, format=f, errors="coerce").notna().all()]
    fits = [f for f in fits if pd.to_datetime(t, format=f, errors="coerce").notna().all()]
    return (fits[0], fits[1:]) if fits else ("", ["?"])


STRAY_DAY_SHARE = 0.05  # a trailing day with fewer events than this share of the median day is a stray's


def log_end(per_day) -> tuple:
    """(last day of the log's bulk, events after it) from events per day (a Series indexed by day, sorted):
    trailing days with fewer than STRAY_DAY_SHARE x the median day's events are strays (propose drafts the
    cutoff from the end, so 30 stray rows weeks late put it past the data, churn then overstated)."""
    import pandas as pd

    floor = STRAY_DAY_SHARE * float(per_day.median())
    dense = per_day[per_day >= floor]
    end = dense.index[-1] if len(dense) else per_day.index[-1]
    later = per_day.index[per_day.index > end]
    for day in later:  # sparse days right after the bulk (an export's partial last day) still belong to it
        if day - end > pd.Timedelta(days=1):
            break
        end = day
    return end, int(per_day[per_day.index > end].sum())


def _review_draft(draft: dict, frame, args, notes: list[str], src=None) -> None:
    """What propose_contract cannot see from column names alone, fixed in the draft or said in a note. ``src``: the
    whole file when ``frame`` is only its first rows (an event log's cutoff then comes from its last timestamp)."""
    import pandas as pd

    cols = draft["columns"]
    if draft["kind"] == "table":
        used = {f["column"] for f in draft["features"]} | {cols["label"], cols["customer_id"]}
        if not cols["customer_id"]:
            unique = [c for c in frame.columns if c not in used and frame[c].notna().all() and frame[c].is_unique]
            notes.append("no customer id column was inferred, so each row counts as one customer"
                         + (f"; unique per row and left out of the features: {', '.join(map(repr, unique))}: "
                            "if one is the customer id, rerun with --id COLUMN" if unique else ""))
        pos = draft["label"]["positive"][0]
        if args.task is None and draft["label"]["task"] != "churn" and _norm(pos) in CHURN_NAMES:
            draft["label"]["task"] = "churn"
            notes.append(f"task: churn, because the label's positive value is {pos!r} (--task propensity to override)")
        return
    ts, cid = cols["timestamp"], cols["customer_id"]
    fmt, others = _timestamp_format(frame[ts])
    digits = frame[ts].dropna().astype("string").str.strip()
    if not fmt and others and len(digits) and digits.str.fullmatch(EPOCH_RE).mean() > 0.9:  # Unix time
        fmt, others = ("epoch_s" if digits.str.len().median() <= 11 else "epoch_ms"), []
        notes.append(f"column {ts!r} holds whole numbers of {digits.str.len().median():.0f} digits: drafted "
                     f"columns.timestamp_format {fmt} (Unix time in {'seconds' if fmt == 'epoch_s' else 'milliseconds'}"
                     ", UTC); check the unit against a known event's date")
    if fmt:
        cols["timestamp_format"] = fmt
    if fmt or src is not None or not others:  # a format, ISO 8601, or the whole file: the log's end is known
        def days(s):  # events per calendar day (UTC), a few hundred numbers however long the log
            if fmt in EPOCH_FORMATS:
                s = pd.to_datetime(pd.to_numeric(s.astype("string").str.strip(), errors="coerce"),
                                   unit=EPOCH_FORMATS[fmt], errors="coerce")
            elif not pd.api.types.is_datetime64_any_dtype(s):
                s = pd.to_datetime(s.astype("string").str.strip(), format=fmt or "ISO8601", errors="coerce",
                                   utc=not fmt)
            s = s.dropna()
            if getattr(s.dt, "tz", None) is not None:
                s = s.dt.tz_convert("UTC").dt.tz_localize(None)
            return s.dt.floor("D").value_counts()
        per_day = (pd.concat([days(c[ts]) for c in src.chunks([ts])]) if src is not None
                   else days(frame[ts])).groupby(level=0).sum().sort_index()
        if len(per_day):
            end, strays = log_end(per_day)
            draft["events"]["cutoff"] = str((end - pd.Timedelta(days=draft["events"]["horizon_days"])).date())
            if strays:
                notes.append(f"{strays} event(s) dated after {end.date()} fall on sparse days past the log's bulk "
                             "(a test record, a clock error?): the drafted cutoff ignores them; check them, and "
                             "the cutoff")
        if fmt and fmt not in EPOCH_FORMATS:  # (a whole-file pass or an ISO sample says nothing more about it)
            notes.append(f"column {ts!r} is not ISO 8601: drafted columns.timestamp_format {fmt!r}"
                         + (f" (the sample also fits {', '.join(map(repr, others))}: check which one the export uses)"
                            if others else ""))
    elif others:
        notes.append(f"column {ts!r} is neither ISO 8601 nor a format propose knows: set columns.timestamp_format "
                     "(a strptime format such as '%d/%m/%Y %H:%M') and events.cutoff by hand")
    keep = []
    for st in draft["static"]:
        per_customer = frame.groupby(frame[cid], dropna=True)[st["column"]].nunique(dropna=True)
        # changes between most customers' events AND has more values than the drafted vocabulary holds (a product
        # code): the last value before the cutoff would mostly encode as __other__
        if (per_customer > 1).mean() > 0.5 and frame[st["column"]].nunique(dropna=True) > len(st["vocabulary"]):
            notes.append(f"column {st['column']!r} left out of static: it changes between a customer's events and "
                         "has more values than a vocabulary holds (an event attribute, not a customer's)")
        else:
            keep.append(st)
    draft["static"] = keep
    if "event_type" not in cols:
        notes.append("no event type column was inferred and data check refuses a contract without one: name it with "
                     "--event-type COLUMN, or for a log of orders only set columns.event_type to the order number, "
                     "events.event_type_rule: prefix, event_type_map (e.g. {C: return}) and event_type_default: "
                     "purchase (as conf/contracts/online_retail.yaml does)")
    if "amount" not in cols:
        notes.append("no amount column was inferred: name it with --amount COLUMN, or set columns.amount to a list "
                     "that is multiplied (e.g. [quantity, unit price]); without it the amount features are empty")
    notes.append(f"events.cutoff {draft['events']['cutoff']} is the log's last day minus the horizon: set the day "
                 "the federation agrees on (fedprop simulate uses it; data.cutoff=YYYY-MM-DD overrides it for one run)")


def _propose(args) -> int:
    print(PROPOSAL_WARNING, file=sys.stderr)
    notes: list[str] = []
    sep = args.sep if args.sep is not None else ","
    try:
        src = open_source(args.file, sep=sep, encoding=args.encoding, chunksize=args.rows)
        if args.sep is None and src.format == "csv" and _sniff_sep(src) != sep:
            sep = _sniff_sep(src)
            src = open_source(args.file, sep=sep, encoding=args.encoding, chunksize=args.rows)
            notes.append(f"the file is separated by {sep!r}: drafted source.sep {sep!r} (--sep to override)")
        frame = next(src.chunks(src.columns()))
    except DataValidationError as exc:
        # there is no contract yet: the encoding is a flag of propose (then drafted as source.encoding)
        print("FAILED: " + str(exc).replace(
            "set source.encoding in the contract", "rerun propose with --encoding ENCODING (a Windows or older "
            "export is often --encoding cp1252 or latin-1); it is drafted as source.encoding"), file=sys.stderr)
        return 1
    if len(frame) >= args.rows:
        notes.append(f"drafted from the first {len(frame)} rows only (--rows): bounds and categories "
                     "come from them alone")
    try:
        draft = propose_contract(frame, name=args.name or Path(args.file).name.split(".")[0], file=args.file, sep=sep,
                                 label=args.label, id_column=args.id_column, task=args.task or "", kind=args.kind,
                                 timestamp=args.timestamp, event_type=args.event_type, amount=args.amount,
                                 notes=notes)
    except ConfigError as exc:
        for n in notes:
            print(f"note: {n}", file=sys.stderr)
        msg = str(exc)
        if "columns:" not in msg:
            msg += f" (columns: {', '.join(map(str, frame.columns))})"
        print(f"FAILED: {msg}", file=sys.stderr)
        return 2
    if src.format == "csv" and args.encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
        draft["source"]["encoding"] = args.encoding
    _review_draft(draft, frame, args, notes, src=src if len(frame) >= args.rows else None)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    print("# DRAFT contract proposed from ONE partner's data: bounds are NOT DP; review before use.")
    print(yaml.safe_dump(draft, sort_keys=False), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedprop")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
