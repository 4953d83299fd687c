"""Where a simulated federation's time goes, per round: Flower/Ray engine vs fedprop's own overhead vs training.

    python benchmarks/bench_simulation.py                       # default-like: 5 partners x 10 rounds, DP on
    python benchmarks/bench_simulation.py --partners 50 --rounds 10 --set model=logreg \\
        --set data.min_customers=200 --set data.max_customers=2000

Runs ``simulations.simulate.run_simulation(cfg, tmpdir)`` (baselines off, ledgers and keys in the tmpdir) and
reads the per-round records it writes (``federated_rounds.json``):

* every train/evaluate reply carries fedprop's client-side wall timings ``time.<phase>-s``, rounded to 10 ms
  (data-prep, deserialize, train, ledger, serialize, evaluate); nodes do not send CPU times (they are not in the
  release inventory), so this benchmark reports wall time per phase;
* ``RecordingStrategy`` records the server's ``train-wait-s`` / ``evaluate-wait-s`` (Flower's send-and-receive
  of each phase) and its own ``aggregate-*-s``; this script also times ``RunOutputs.record_round`` and
  ``save_checkpoint`` (they run in the server thread of this process; CPU = thread CPU time).

Per phase, clients run in parallel on A = floor(cpus / num_cpus_per_client) Ray actors, so the compute critical
path is bounded below by ``max(max_i t_i, sum_i t_i / A)``; Flower/Ray engine overhead = wait - that bound.
fedprop overhead per round = (sum over clients of the non-training phases) / A + the server's own work.
Wall-clock figures depend on machine load (printed).
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

CLIENT_OVERHEAD = ("data-prep", "deserialize", "serialize", "ledger")  # + the whole evaluate message


def _parse_value(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def build_config(args):
    from federation.config import from_dict

    d: dict = {"partners": args.partners, "rounds": args.rounds, "baselines": {"enabled": False},
               "privacy": {"ledger_dir": str(args.tmp / "ledgers")}, "release": {"key_dir": str(args.tmp / "keys")}}
    for item in args.set:
        key, _, value = item.partition("=")
        if key == "model":  # the Hydra group shortcut: model=logreg|mlp
            d["model"] = {"kind": value, "hidden": [] if value == "logreg" else [64, 32]}
            continue
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _parse_value(value)
    return from_dict(d)


class ServerTimer:
    """Wraps RunOutputs.record_round / save_checkpoint (server thread) with wall + thread-CPU timing."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[float, float]]] = {"record": [], "checkpoint": []}

    def install(self) -> None:
        from server import outputs

        for name, attr in (("record", "record_round"), ("checkpoint", "save_checkpoint")):
            orig = getattr(outputs.RunOutputs, attr)

            def wrapped(self_, *a, _orig=orig, _name=name, **k):
                w0, c0 = time.perf_counter(), time.thread_time()
                try:
                    return _orig(self_, *a, **k)
                finally:
                    self.calls[_name].append((time.perf_counter() - w0, time.thread_time() - c0))

            setattr(outputs.RunOutputs, attr, wrapped)


def _phase_sum(m: dict, phases, suffix: str) -> float:
    return sum(float(m.get(f"time.{p}{suffix}", 0.0)) for p in phases)


def analyse(rounds: list[dict], *, actors: int, server: ServerTimer) -> list[dict]:
    out = []
    for i, r in enumerate(rounds):
        tr = [p["train"] for p in r["partners"].values() if "train" in p]
        ev = [p["evaluate"] for p in r["partners"].values() if "evaluate" in p]
        row = {"round": r["round"], "wall": r.get("wall_s", float("nan")), "n": len(tr)}
        s = r.get("server", {})
        for phase, reps, all_phases in (("train", tr, CLIENT_OVERHEAD + ("train",)),
                                        ("evaluate", ev, CLIENT_OVERHEAD + ("evaluate",))):
            t = [_phase_sum(m, all_phases, "-s") for m in reps] or [0.0]
            bound = max(max(t), sum(t) / actors)
            row[f"{phase}_wait"] = s.get(f"{phase}-wait-s", float("nan"))
            row[f"{phase}_bound"] = bound
            row[f"{phase}_engine"] = row[f"{phase}_wait"] - bound
        row["train_compute"] = sum(float(m.get("time.train-s", 0)) for m in tr)
        row["client_overhead"] = (sum(_phase_sum(m, CLIENT_OVERHEAD, "-s") for m in tr + ev)
                                  + sum(float(m.get("time.evaluate-s", 0)) for m in ev))
        for ph in CLIENT_OVERHEAD + ("evaluate",):
            row[f"c.{ph}"] = sum(float(m.get(f"time.{ph}-s", 0)) for m in tr + ev)
        row["data_preps"] = sum(1 for m in tr + ev if float(m.get("time.data-prep-s", 0)) > 0.05)
        rec = server.calls["record"][i] if i < len(server.calls["record"]) else (0.0, 0.0)
        ck = server.calls["checkpoint"][i] if i < len(server.calls["checkpoint"]) else (0.0, 0.0)
        row["server_own"] = s.get("aggregate-train-s", 0.0) + s.get("aggregate-evaluate-s", 0.0) + rec[0] + ck[0]
        row["server_record"], row["server_checkpoint"] = rec[0], ck[0]
        row["fedprop_overhead"] = row["client_overhead"] / actors + row["server_own"]
        row["engine_overhead"] = row["train_engine"] + row["evaluate_engine"]
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--partners", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--set", action="append", default=[], help="config override key=value (dotted), repeatable")
    ap.add_argument("--json", type=Path, help="also write the per-round rows here")
    args = ap.parse_args(argv)
    args.tmp = Path(tempfile.mkdtemp(prefix="fedprop-bench-sim-"))
    cfg = build_config(args)
    from simulations.simulate import run_simulation

    server = ServerTimer()
    server.install()
    cpus = os.cpu_count() or 1
    actors = max(1, int(cpus / cfg.num_cpus_per_client))
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    run_simulation(cfg, args.tmp / "run")
    total = time.perf_counter() - t0
    load1 = os.getloadavg()
    rounds = json.loads((args.tmp / "run" / "federated_rounds.json").read_text())
    print(f"\n== bench_simulation: {cfg.partners} partners x {cfg.rounds} rounds, model={cfg.model.kind}, "
          f"DP={'on' if cfg.privacy.enabled else 'off'}, data {cfg.data.min_customers}-{cfg.data.max_customers} customers; "
          f"{cpus} cpus, num_cpus_per_client={cfg.num_cpus_per_client:g} -> {actors} Ray actors")
    print(f"load average at start {load0[0]:.2f}, at end {load1[0]:.2f} (1-min); total wall {total:.1f} s "
          f"(Ray start-up, data generation, all rounds, privacy reports)")
    all_rows = {}
    for tag, recs in rounds.items():
        rows = analyse(recs, actors=actors, server=server)
        all_rows[tag] = rows
        print(f"\n[{tag}] seconds per round (wall); engine = Flower wait - client critical-path bound")
        cols = ("round", "wall", "train_wait", "train_bound", "evaluate_wait", "evaluate_bound", "engine_overhead",
                "train_compute", "client_overhead", "server_own", "fedprop_overhead", "data_preps")
        print(" ".join(f"{c:>18}" for c in cols))
        for row in rows:
            print(" ".join(f"{row[c]:>18.3f}" if isinstance(row[c], float) else f"{row[c]:>18}" for c in cols))
        steady = rows[1:] or rows
        med = {k: statistics.median(r[k] for r in steady) for k in steady[0] if isinstance(steady[0][k], (int, float))}
        print(f"\nmedian over rounds 2..{len(rows)} (round 1 carries Ray start-up and data preparation):")
        print(f"  round wall                         {med['wall']:.3f} s")
        print(f"  Flower/Ray engine overhead         {med['engine_overhead']:.3f} s  (train {med['train_engine']:.3f} + evaluate {med['evaluate_engine']:.3f})")
        print(f"  training compute, all clients      {med['train_compute']:.3f} s wall")
        print(f"  fedprop client overhead, all       {med['client_overhead']:.3f} s wall "
              f"(data-prep {med['c.data-prep']:.3f}, deserialize {med['c.deserialize']:.3f}, serialize {med['c.serialize']:.3f}, "
              f"ledger {med['c.ledger']:.3f}, evaluate {med['c.evaluate']:.3f})")
        print(f"  fedprop server own work            {med['server_own']:.3f} s  (record {med['server_record']:.3f}, checkpoint {med['server_checkpoint']:.3f})")
        print(f"  fedprop overhead on critical path  {med['fedprop_overhead']:.3f} s  (client overhead / {actors} actors + server)")
        ratio = med["fedprop_overhead"] / med["engine_overhead"] if med["engine_overhead"] > 0 else float("nan")
        print(f"  ratio fedprop / Flower overhead    {ratio:.2f}  (target < 1)")
        print(f"  data preparations after round 1    {sum(r['data_preps'] for r in rows[1:])}  "
              f"(round 1: {rows[0]['data_preps']}; a partner is prepared once per actor process that serves it)")
    if args.json:
        args.json.write_text(json.dumps({"load": [load0, load1], "total_s": total, "rows": all_rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
