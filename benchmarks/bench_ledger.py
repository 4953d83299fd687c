"""Ledger benchmark: ``budget report`` time (incremental composition) and ``verify`` time vs ledger length.

Builds ledgers of 100 / 1,000 / 10,000 entries the way a partner fills one: runs of 10 DP-SGD rounds (each
preceded by ``run_start``), one run a day, a default-run mechanism (q = 128/2400, 38 steps per round,
sigma 1.68 = epsilon 3 per run under the tight accountants) and a record-only policy with a calendar-month
period (a 10,000-entry ledger spans ~30 months, far beyond any cap: record only, so nothing is refused).
Each size runs in a fresh process-wide accountant cache, so the figures include every composition.

    .venv/bin/python benchmarks/bench_ledger.py [--sizes 100 1000 10000]
    .venv/bin/python benchmarks/bench_ledger.py --calibration   # noise saved by the tight accountants
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import federation.privacy.accountants as acc_mod  # noqa: E402
from federation.privacy import Ledger, PoissonSampledGaussian, generate_node_key, policy_from_mapping, verify  # noqa: E402
from federation.privacy.report import build_report  # noqa: E402

EVENT = PoissonSampledGaussian(sampling_rate=128 / 2400, noise_multiplier=1.68, steps=38)
POLICY = policy_from_mapping({"record_only": True, "period": "calendar-month"}, source="bench (record only)")
T0 = datetime(2025, 1, 1, 8, 0, tzinfo=timezone.utc)


def build(path: Path, key: Path, n: int) -> None:
    with Ledger.open(path, signing_key=key) as ledger:
        seq, run = 0, 0
        while seq < n:
            t = T0 + timedelta(days=run)
            ledger.append(kind="run_start", partner="p0", run_id=f"run-{run}", timestamp=t)
            seq += 1
            for rnd in range(1, 11):
                if seq >= n:
                    break
                ledger.append(kind="dpsgd_round", partner="p0", run_id=f"run-{run}", round=rnd, delta=1e-5,
                              mechanism=EVENT, clipping_norm=1.0, update_hash=f"{seq:064x}",
                              timestamp=t + timedelta(minutes=rnd))
                seq += 1
            run += 1


def calibration() -> None:
    """Default run: q = 128/n, n = customers x 0.8, 2 local epochs, 10 rounds, delta 1e-5."""
    from federation.privacy.accountants import calibrate_noise_multiplier, get_accountant

    names = ("rdp", "dp_rdp", "dp_pld", "prv", "tight")
    for eps in (1.0, 3.0):
        for customers in (600, 1500, 3000, 6000):
            n = int(customers * 0.8)
            q = min(1.0, 128 / n)
            steps = max(1, math.ceil(2 / q)) * 10
            kw = dict(target_epsilon=eps, delta=1e-5, sampling_rate=q, steps=steps)
            s_rdp = calibrate_noise_multiplier(**kw, accountant="rdp")
            s_tight = calibrate_noise_multiplier(**kw, accountant="tight")
            run = [PoissonSampledGaussian(sampling_rate=q, noise_multiplier=s_rdp, steps=steps)]
            at_rdp = " ".join(f"{a}={get_accountant(a).epsilon(run, delta=1e-5):.3f}" for a in names)
            print(f"target {eps:g} n_train {n} q {q:.4f} steps {steps}: sigma rdp {s_rdp:.3f}, tight {s_tight:.3f} "
                  f"(noise saved {100 * (1 - s_tight / s_rdp):.1f} %); at the rdp sigma: {at_rdp}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--calibration", action="store_true", help="noise saved by calibrating with tight")
    args = parser.parse_args()
    if args.calibration:
        calibration()
        return
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "node.key"
        generate_node_key(key)
        for n in args.sizes:
            path = Path(tmp) / f"ledger-{n}.sqlite"
            t = time.perf_counter()
            build(path, key, n)
            t_build = time.perf_counter() - t
            acc_mod._EPSILON_CACHE.clear()  # noqa: SLF001
            acc_mod._PRV_CACHE.clear()  # noqa: SLF001
            t = time.perf_counter()
            result = verify(path, str(key) + ".pub")
            t_verify = time.perf_counter() - t
            with Ledger.open(path, signing_key=None) as ledger:
                entries = ledger.entries()
            t = time.perf_counter()
            report = build_report(entries, policy=POLICY, verification=result, at=entries[-1].when)
            t_report = time.perf_counter() - t
            eps = report["all_time_epsilon"]
            print(
                f"{n:6d} entries ({report['counts']['runs']} runs, {len(report['rounds'])} releases): "
                f"build {t_build:6.1f} s, verify {t_verify:6.2f} s, report {t_report:6.2f} s; all-time epsilon "
                f"tight {eps['tight']:.1f}, rdp {eps['rdp']:.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
