"""`fedprop data synth --partner I --partners N --out FILE`: write one synthetic partner's raw event log.

The log is exactly what the simulation's partner I (of N, same seed and data settings) generates: columns
user_id, timestamp, event_type, amount, channel, plus the customer's static plan on every row, as described
by ``conf/contracts/synthetic_events.yaml``. CSV or Parquet by the file extension, written atomically. It lets
``fedprop data check``, ``fedprop score`` and deployment nodes (``data-path``) work on real files.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from federation.atomicio import atomic_write_bytes
from federation.errors import FedpropError

CONTRACT = "contracts/synthetic_events.yaml"


def synth_events(partner: int, partners: int, *, seed: int = 42, min_customers: int = 600, max_customers: int = 6000,
                 cutoff: str = "2024-01-01", history_days: int = 365, horizon_days: int = 90):
    """Partner ``partner``'s event log (pandas DataFrame) with the plan joined onto every event."""
    from simulations.synthetic import generate_partner, partner_profile, partner_sizes

    if not 0 <= partner < partners:
        raise FedpropError(f"--partner {partner} must be in 0..{partners - 1} (--partners {partners})")
    sizes = partner_sizes(partners, min_customers=min_customers, max_customers=max_customers, seed=seed)
    events, customers = generate_partner(partner_profile(partner, sizes[partner], seed=seed), seed=seed, cutoff=cutoff,
                                         history_days=history_days, horizon_days=horizon_days)
    events = events.copy()
    events["plan"] = events["user_id"].map(customers["plan"]).astype(str)
    return events


def write_frame(frame, out: str | Path) -> Path:
    """CSV (``.csv``, ``.csv.gz``) or Parquet (``.parquet``/``.pq``) by extension, written atomically."""
    out = Path(out)
    name = out.name.lower()
    buf = io.BytesIO()
    if name.endswith((".parquet", ".pq")):
        frame.to_parquet(buf, index=False)
    elif name.endswith(".csv.gz"):
        frame.to_csv(buf, index=False, compression={"method": "gzip", "mtime": 0})
    elif name.endswith(".csv"):
        frame.to_csv(buf, index=False)
    else:
        raise FedpropError(f"cannot tell the format of {out}: use a .csv, .csv.gz or .parquet file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(out, buf.getvalue())


def register(subparsers) -> argparse.ArgumentParser:
    """Mount `data synth` next to `data check|propose` (clients/data_cli.py), or a `data` group if absent."""
    data = subparsers.choices.get("data")
    if data is None:
        data = subparsers.add_parser("data", help="partner data tools")
        sub = data.add_subparsers(dest="data_command", required=True)
    else:
        sub = next(a for a in data._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.add_parser("synth", help="write one synthetic partner's event log (CSV/Parquet) for scoring or deployment")
    p.add_argument("--partner", type=int, required=True, help="partner index I (0-based)")
    p.add_argument("--partners", type=int, required=True, help="number of partners N (sets the size schedule)")
    p.add_argument("--out", required=True, help="output file: .csv, .csv.gz or .parquet")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--min-customers", type=int, default=600)
    p.add_argument("--max-customers", type=int, default=6000)
    p.add_argument("--cutoff", default="2024-01-01", help="the simulation's data.cutoff")
    p.add_argument("--history-days", type=int, default=365)
    p.add_argument("--horizon-days", type=int, default=90)
    p.set_defaults(func=_cmd)
    return p


def _cmd(args) -> int:
    try:
        frame = synth_events(args.partner, args.partners, seed=args.seed, min_customers=args.min_customers,
                             max_customers=args.max_customers, cutoff=args.cutoff, history_days=args.history_days,
                             horizon_days=args.horizon_days)
        out = write_frame(frame, args.out)
    except FedpropError as exc:
        print(f"fedprop data synth: {exc}", file=sys.stderr)
        return 2
    print(f"{out}: {len(frame)} events of {frame['user_id'].nunique()} customers (partner {args.partner} of "
          f"{args.partners}); contract: conf/{CONTRACT}")
    return 0
