"""`fedprop data check CONTRACT FILE` and `fedprop data propose FILE`: run at a partner, on its own data.

check: reads only the contract's columns, runs every validation check, prints one report and exits
0 (valid), 1 (the data breaks the contract) or 2 (the contract itself or the input cannot be used).
Nothing is trained, written or modified. propose: prints a draft contract (YAML) for a customer table,
with a warning that its bounds come from one partner's data, are NOT differentially private and must
be reviewed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from federation.contract import PROPOSAL_WARNING, load_contract, propose_contract
from federation.errors import ConfigError, DataValidationError
from federation.readers import open_source, read_frame
from federation.validation import read_validated


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
    pr.add_argument("--sep", default=",")
    pr.add_argument("--rows", type=int, default=100_000, help="read at most this many rows")
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


def _propose(args) -> int:
    print(PROPOSAL_WARNING, file=sys.stderr)
    try:
        src = open_source(args.file, sep=args.sep, chunksize=args.rows)
        frame = next(src.chunks(src.columns()))
    except DataValidationError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    try:
        draft = propose_contract(frame, name=args.name or Path(args.file).name.split(".")[0], file=args.file, sep=args.sep,
                                 label=args.label, id_column=args.id_column, task=args.task or "", kind=args.kind,
                                 timestamp=args.timestamp, event_type=args.event_type, amount=args.amount)
    except ConfigError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 2
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
