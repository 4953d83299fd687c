"""Seconds per round of a real deployment on loopback: Flower's floor vs fedprop plain vs fedprop secure.

One coordinator (`fedprop server start`: TLS SuperLink on 127.0.0.1 with node authentication and process
isolation, Fleet proxy on 127.0.0.2) and three registered partner SuperNodes (`fedprop client start`, pinned to
the app-signing key), built by tests/deploy/harness.py exactly as tests/deploy/test_loopback.py does, run in turn:

  floor   a minimal numpy app (FedAvg over a 4-vector, train + evaluate every round): what Flower itself costs;
  plain   fedprop's app (pyproject components), DP-SGD logreg two heads on synthetic partners, FedAvg;
  secure  the same with secure aggregation (secagg.enabled=true).

fedprop evaluates every round here (evaluation.rounds = rounds), so all three do train + evaluate per round.
Round 1 of fedprop includes each node generating its synthetic data and calibrating its noise, so the figure
compared is the mean of rounds 2..R (steady state); round 1 is printed separately. fedprop's per-round times
are the server's ``wall_s`` in federated_rounds.json; the floor's come from its evaluate_fn timestamps.

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_deployment.py [--rounds 3] [--only floor plain]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from federation.config import from_dict, to_run_config  # noqa: E402
from tests.deploy.harness import REPO, floor_app, loopback_federation  # noqa: E402

PARTNERS = ["partner-0", "partner-1", "partner-2"]
# Benchmark nodes spend more than one default month's budget (several runs on one ledger): an explicit policy.
POLICY = """\
privacy_unit: customer
max_epsilon: 1000.0
period: all-time
delta: 1.0e-5
min_noise_multiplier: 0.3
max_rounds: 50
allowed_accountants: [tight]
"""


def fedprop_config(rounds: int, *, secure: bool, tmp: Path) -> dict:
    cfg = from_dict({
        "partners": len(PARTNERS), "rounds": rounds, "model": {"kind": "logreg", "hidden": []},
        "data": {"min_customers": 400, "max_customers": 900}, "baselines": {"enabled": False},
        "privacy": {"epsilon": 4.0, "ledger_dir": str(tmp / "unused-ledgers")},
        "evaluation": {"rounds": rounds}, "strategy": {"min_partners": len(PARTNERS)},
        "release": {"key_dir": str(tmp / "release-keys")}, "secagg": {"enabled": secure, "timeout": 300.0},
    })
    return to_run_config(cfg)


def run_floor(fed, rounds: int, tmp: Path) -> list[float]:
    out = tmp / "floor.json"
    result = fed.submit(floor_app(tmp / "floor-app"), {"num-server-rounds": rounds, "min-nodes": len(PARTNERS),
                                                       "result-path": str(out)}, timeout=60 + 120 * rounds)
    if not result.completed or not out.exists():
        raise SystemExit(f"floor run ended {result.status}")
    return [float(s) for s in json.loads(out.read_text())["round_s"]]


def run_fedprop(fed, rounds: int, tmp: Path, *, secure: bool) -> list[float]:
    name = "secure" if secure else "plain"
    run_dir = tmp / f"run-{name}"
    result = fed.submit(REPO, {**fedprop_config(rounds, secure=secure, tmp=tmp), "fedprop-run-dir": str(run_dir)},
                        timeout=120 + 400 * rounds)
    if not result.completed:
        raise SystemExit(f"fedprop {name} run ended {result.status} (logs: {fed.root})")
    recs = json.loads((run_dir / "federated_rounds.json").read_text())["churn+propensity"]
    if len(recs) != rounds or any(len(r["partners"]) != len(PARTNERS) for r in recs):
        raise SystemExit(f"fedprop {name}: expected {rounds} rounds with {len(PARTNERS)} partners each: {recs}")
    phases: dict[str, list[float]] = {}
    for r in recs[1:]:  # steady state: where a round's time goes (the nodes' public per-phase timings)
        for k, v in r.get("server", {}).items():
            phases.setdefault(f"server {k}", []).append(float(v))
        for p in r["partners"].values():
            for kind in ("train", "evaluate"):
                for k, v in p.get(kind, {}).items():
                    if k.startswith("time.") and isinstance(v, (int, float)):
                        phases.setdefault(f"node {kind} {k[5:]}", []).append(float(v))
    print(f"  {name} rounds 2..R, mean seconds: " + ", ".join(
        f"{k} {statistics.mean(v):.2f}" for k, v in sorted(phases.items())), flush=True)
    return [float(r["wall_s"]) for r in recs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds per run (>= 2; default 3)")
    ap.add_argument("--only", nargs="+", choices=["floor", "plain", "secure"], default=["floor", "plain", "secure"])
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.rounds < 2:
        ap.error("--rounds must be >= 2 (round 1 is start-up; the steady state is rounds 2..R)")
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as d:
        tmp = Path(d)
        policy = tmp / "policy.yaml"
        policy.write_text(POLICY)
        with loopback_federation(tmp / "fed", PARTNERS, extra_node_config={"budget-policy": str(policy)}) as fed:
            for kind in args.only:
                t = time.monotonic()
                times[kind] = (run_floor(fed, args.rounds, tmp) if kind == "floor"
                               else run_fedprop(fed, args.rounds, tmp, secure=kind == "secure"))
                print(f"{kind}: per round {[round(s, 1) for s in times[kind]]} s "
                      f"({time.monotonic() - t:.0f} s submit to finished)", flush=True)
    load_after = os.getloadavg()
    steady = {k: statistics.mean(v[1:]) for k, v in times.items()}
    print(f"\nloopback deployment, TLS + node auth, 3 SuperNodes, {args.rounds} rounds each, train + evaluate per "
          f"round; load average before {load_before[0]:.2f} / after {load_after[0]:.2f} (1 min), "
          f"{os.cpu_count()} CPUs; total {time.monotonic() - t0:.0f} s")
    print(f"{'app':<8} {'round 1 s':>10} {'rounds 2..R s':>14} {'x floor':>8}")
    for k, v in times.items():
        ratio = f"{steady[k] / steady['floor']:.2f}" if "floor" in steady else "-"
        print(f"{k:<8} {v[0]:>10.1f} {steady[k]:>14.1f} {ratio:>8}")
    if "floor" in steady:
        for k, target in (("plain", 1.3), ("secure", 2.0)):
            if k in steady:
                r = steady[k] / steady["floor"]
                print(f"target {k} <= {target}x floor: {'met' if r <= target else 'MISSED'} ({r:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "per_round_s": times, "steady_s": steady,
                                         "load_before": load_before, "load_after": load_after}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
