"""Scale: (a) one partner with 1,000,000 customers trains DP-SGD rounds in bounded memory; (b) a simulation of
50 partners x 10 rounds completes on this machine.

    python benchmarks/bench_scale.py --part a                  # 1M customers, default model (MLP 64-32), DP on
    python benchmarks/bench_scale.py --part b                  # 50 partners x 10 rounds, logreg, small partners
    python benchmarks/bench_scale.py --part a --customers 200000 --rounds 1

(a) Data: the synthetic generator's full pipeline (raw events -> features) costs ~0.12 ms CPU and ~16 KB of
peak memory per customer (measured: 30k customers 3.7 s CPU, +490 MB RSS), i.e. minutes and ~16 GB for 1M
customers, which is the generator's cost, not training's. So the benchmark generates ``--seed-customers``
(default 20,000) customers through the real pipeline and resamples their feature rows (with replacement) to
``--customers`` rows: the same feature distribution and layout, built in seconds. It then runs what a node
runs: ``split_partner`` (train/test tensors), ``initial_privacy_state`` (sigma for the whole run),
``train_round`` (the default engine) and ``evaluate``. Reported: peak RSS (``ru_maxrss``) after each stage,
rows/s of training = rows processed (expected epochs x n_train) / process CPU time.

(b) ``bench_simulation`` with ``--partners 50`` (defaults: model=logreg, data.min_customers=200,
data.max_customers=2000) while a thread samples the RSS of this process and all its descendants (the Ray GCS,
raylet, dashboard agent and worker processes) from /proc every 0.5 s; reported: peak sum, the Ray worker
(actor) count and their peak RSS each.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def part_a(args) -> None:
    import numpy as np
    import torch

    from clients import node as N
    from federation.config import from_dict
    from federation.features import FeatureSet
    from simulations.partners import synthetic_partner

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = from_dict({"partners": 1, "rounds": args.rounds, "model": {"kind": args.model, "hidden": [] if args.model == "logreg" else [64, 32]},
                     "data": {"min_customers": args.seed_customers, "max_customers": args.seed_customers}})
    print(f"== bench_scale (a): {args.customers:,} customers, model={cfg.model.kind}, batch {cfg.train.batch_size}, "
          f"{cfg.train.local_epochs:g} epochs/round, {args.rounds} round(s), torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"start: peak RSS {_maxrss_mb():.0f} MB")
    c0 = time.process_time()
    seed = synthetic_partner(cfg, 0, 1)
    print(f"generated {len(seed):,} customers through the synthetic pipeline in {time.process_time() - c0:.1f} s CPU; "
          f"peak RSS {_maxrss_mb():.0f} MB")
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(seed), size=args.customers)
    fs = FeatureSet(customer_ids=np.arange(args.customers), X=seed.X[idx], y={k: v[idx] for k, v in seed.y.items()},
                    feature_names=seed.feature_names)
    del seed, idx
    c0 = time.process_time()
    data = N.split_partner(fs, heads=("churn", "propensity"), test_fraction=cfg.train.test_fraction, seed=cfg.seed, partition_id=0)
    del fs
    print(f"features {args.customers:,} x {data.X_train.shape[1]} -> tensors: train {data.n_train:,}, test {data.n_test:,} "
          f"({time.process_time() - c0:.1f} s CPU); peak RSS {_maxrss_mb():.0f} MB "
          f"(X_train alone {data.X_train.numel() * 4 / 2**20:.0f} MB)")
    c0 = time.process_time()
    privacy = N.initial_privacy_state(cfg, data)
    print(f"privacy plan: q={privacy.sample_rate:.3g}, steps/round={privacy.steps_per_round}, sigma={privacy.noise_multiplier:.3f} "
          f"({time.process_time() - c0:.1f} s CPU)")
    from federation.models import build_model

    sd = build_model(cfg.model, n_features=data.X_train.shape[1], n_outputs=2).state_dict()
    for r in range(1, args.rounds + 1):
        privacy.check_next_round()
        c0, w0 = time.process_time(), time.perf_counter()
        sd, metrics, privacy = N.train_round(cfg, data, sd, privacy, server_round=r)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        rows = privacy.sample_rate * privacy.steps_per_round * data.n_train
        print(f"round {r}: {rows:,.0f} rows (expected) in {cpu:.1f} s CPU / {wall:.1f} s wall -> {rows / cpu:,.0f} rows/s (CPU), "
              f"epsilon {metrics['epsilon']:.3f}; peak RSS {_maxrss_mb():.0f} MB")
    c0 = time.process_time()
    ev, _ = N.evaluate(cfg, data, sd)
    print(f"evaluate on {data.n_test:,} customers: churn AUC {ev['churn.auc']:.3f} ({time.process_time() - c0:.1f} s CPU); "
          f"peak RSS {_maxrss_mb():.0f} MB, load average {os.getloadavg()[0]:.2f}")


# ------------------------------------------------------------------------------------------------- (b)
def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _tree(pid: int) -> list[int]:
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo += _children(p)
    return seen


def _rss_and_name(pid: int) -> tuple[int, str]:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return 0, ""
    rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return rss * 1024, cmd


class MemorySampler(threading.Thread):
    def __init__(self, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.period, self.stop, self.peak_total = period, threading.Event(), 0
        self.peak_by_kind: dict[str, int] = {}
        self.max_workers = 0

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.is_set():
            total, workers = 0, 0
            for pid in _tree(me):
                rss, cmd = _rss_and_name(pid)
                total += rss
                kind = "driver" if pid == me else ("ray worker" if "default_worker.py" in cmd or "ray::" in cmd else
                                                    cmd.split()[0].rsplit("/", 1)[-1] if cmd else "?")
                if kind == "ray worker":
                    workers += 1
                self.peak_by_kind[kind] = max(self.peak_by_kind.get(kind, 0), rss)
            self.peak_total = max(self.peak_total, total)
            self.max_workers = max(self.max_workers, workers)
            self.stop.wait(self.period)


def part_b(args) -> None:
    import bench_simulation as BS

    sets = ["model=logreg", "data.min_customers=200", "data.max_customers=2000", *args.set]
    argv = ["--partners", str(args.partners), "--rounds", str(args.rounds)] + [x for s in sets for x in ("--set", s)]
    print(f"== bench_scale (b): bench_simulation {' '.join(argv)}; load average {os.getloadavg()[0]:.2f}")
    sampler = MemorySampler()
    sampler.start()
    w0 = time.perf_counter()
    BS.main(argv)
    wall = time.perf_counter() - w0
    sampler.stop.set()
    sampler.join()
    print(f"\n(b) {args.partners} partners x {args.rounds} rounds: total wall {wall:.1f} s (load average now "
          f"{os.getloadavg()[0]:.2f}); peak RSS summed over this process and all descendants "
          f"{sampler.peak_total / 2**20:.0f} MB; Ray worker processes at most {sampler.max_workers}")
    for kind, rss in sorted(sampler.peak_by_kind.items(), key=lambda kv: -kv[1])[:8]:
        print(f"    peak RSS of one {kind:<24} {rss / 2**20:7.0f} MB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("a", "b", "all"), default="all")
    ap.add_argument("--customers", type=int, default=1_000_000)
    ap.add_argument("--seed-customers", type=int, default=20_000)
    ap.add_argument("--model", default="mlp", choices=("mlp", "logreg"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads for (a); 0 = torch's default")
    ap.add_argument("--rounds", type=int, default=None, help="(a) default 2, (b) default 10")
    ap.add_argument("--partners", type=int, default=50)
    ap.add_argument("--set", action="append", default=[], help="(b) extra config overrides key=value")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.part in ("a", "all"):
        a = argparse.Namespace(**{**vars(args), "rounds": args.rounds or 2})
        part_a(a)
    if args.part in ("b", "all"):
        b = argparse.Namespace(**{**vars(args), "rounds": args.rounds or 10})
        part_b(b)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
