"""Event features on a large partner, from the Parquet file to the encoded matrix, each path in its own process.

    python benchmarks/bench_features.py                       # 10M then 100M events (200,000 / 2M customers)
    python benchmarks/bench_features.py --events 10000000     # 10 million events only
    python benchmarks/bench_features.py --events 1000000 --threads 2 --memory-limit 2GB

The event log is generated once as Parquet under --data-dir (default /tmp/fedprop-bench, reused when it exists).
Three measurements, each in a fresh child process (peak RSS from os.wait4, so one measurement's memory never
hides in another's):

  reference   the bare DuckDB query: the same per-customer aggregates and labels straight from the file, no
              validation, result fetched to pandas (what "as fast as DuckDB" means)
  duckdb      fedprop's node path, end to end: read + validate (every contract check, one report) + features +
              labels + encoding -> FeatureSet (federation.engine_duckdb.read_event_features)
  pandas      the previous path: read_validated (chunked read, whole log in pandas) + build_features; skipped
              above --pandas-max events (it needs several times the log in memory)

Prints events/s, the ratio to the reference (wall time and CPU seconds: on a shared machine the CPU ratio is the
steadier one), peak RSS and wall time, then one Markdown table for every size; checks that duckdb and pandas give the same
report and the same encoded matrix (bit for bit) when both ran.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TYPES = ["visit", "purchase", "support_ticket", "return"]
CHANNELS = ["web", "app", "store", "phone"]
CONTRACT = """name: bench_events
kind: events
columns: {customer_id: user_id, timestamp: timestamp, event_type: event_type, amount: [amount], channel: channel}
events: {cutoff: "2024-01-01", horizon_days: 90, lookback_days: 365}
min_customers: 100
"""
NOW = "2030-01-01"


def generate(path: Path, n_events: int, n_customers: int, seed: int = 0, batch: int = 5_000_000) -> None:
    """Write the log in batches (bounded memory): 365 days of history + 90 of horizon, 4 types, 4 channels."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    start = np.datetime64("2023-01-01T00:00:00", "us")
    tmp = path.with_suffix(".tmp")
    writer = None
    try:
        for lo in range(0, n_events, batch):
            k = min(batch, n_events - lo)
            secs = rng.integers(0, 455 * 86_400, k)
            t = pa.table({
                "user_id": rng.integers(0, n_customers, k).astype(np.int64),
                "timestamp": pa.array(start + (secs * 1_000_000).astype("timedelta64[us]")),
                "event_type": pa.array(np.asarray(TYPES, dtype=object)[rng.choice(4, k, p=[0.7, 0.2, 0.05, 0.05])]),
                "amount": np.round(rng.lognormal(3.0, 0.7, k), 2),
                "channel": pa.array(np.asarray(CHANNELS, dtype=object)[rng.integers(0, 4, k)]),
            })
            writer = writer or pq.ParquetWriter(tmp, t.schema, compression="snappy")
            writer.write_table(t, row_group_size=1_000_000)
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- child-process measurements
def _cpu() -> float:
    """CPU seconds of this process, every thread (DuckDB's included)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _measure(kind: str, path: str, contract_path: str, out: str, memory_limit: str, threads: int, spill: str) -> None:
    from federation.contract import load_contract
    from federation.engine_duckdb import EngineSettings, aggregate_sql, connect, read_event_features

    c = load_contract(contract_path)
    settings = EngineSettings(memory_limit=memory_limit, threads=threads, temp_directory=spill)
    t, cpu = time.perf_counter(), _cpu()
    result: dict = {"kind": kind}
    if kind == "reference":
        con = connect(settings)
        con.execute("SET preserve_insertion_order = false")
        rel = (f"(SELECT user_id AS cid, timestamp AS ts, event_type AS et, amount AS amt, channel AS ch "
               f"FROM read_parquet('{path}'))")
        sql = aggregate_sql(rel, cutoff=c.events.cutoff, schema=c.schema(), lookback_days=c.events.lookback_days,
                            horizon_days=c.events.horizon_days, has={"amt": True, "ch": True})
        df = con.execute(f"SELECT * FROM ({sql}) WHERE recency_days IS NOT NULL ORDER BY cid").df()
        result["customers"] = len(df)
    elif kind == "duckdb":
        r = read_event_features(c, path, now=NOW, settings=settings, allow_fallback=False)
        result.update(customers=len(r.features), engine=r.engine, timings=r.timings, report=repr(r.report))
        np.save(out + ".X.npy", r.features.X)
    else:
        from federation.contract import build_features
        from federation.validation import read_validated

        v = read_validated(c, path, now=NOW)
        fs = build_features(v.frame, c)
        result.update(customers=len(fs), report=repr(v.report))
        np.save(out + ".X.npy", fs.X)
    result["seconds"], result["cpu_seconds"] = time.perf_counter() - t, _cpu() - cpu
    Path(out).write_text(json.dumps(result))


def _run_child(kind: str, args, path: Path, contract: Path) -> dict:
    out = str(args.data_dir / f"result-{kind}.json")
    cmd = [sys.executable, __file__, "--child", kind, "--path", str(path), "--contract", str(contract), "--out", out,
           "--memory-limit", args.memory_limit, "--threads", str(args.threads), "--spill", str(args.data_dir / "spill")]
    proc = subprocess.Popen(cmd, cwd=str(ROOT))
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        return {"kind": kind, "failed": f"exit status {status}", "rss_mib": usage.ru_maxrss / 1024}
    res = json.loads(Path(out).read_text())
    res["rss_mib"] = usage.ru_maxrss / 1024  # Linux: KiB
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", default="10000000,100000000",
                    help="comma-separated sizes, each measured in turn (default: 10M and 100M events)")
    ap.add_argument("--customers", type=int, default=0, help="default: events / 50")
    ap.add_argument("--threads", type=int, default=0, help="DuckDB threads (0 = one per core)")
    ap.add_argument("--memory-limit", default="2GB", help="DuckDB memory_limit (it spills beyond it)")
    ap.add_argument("--pandas-max", type=int, default=20_000_000, help="skip the pandas path above this many events")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FEDPROP_BENCH_DIR", "/tmp/fedprop-bench")))
    ap.add_argument("--only", default="reference,duckdb,pandas")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--path", default="", help=argparse.SUPPRESS)
    ap.add_argument("--contract", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--spill", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _measure(args.child, args.path, args.contract, args.out, args.memory_limit, args.threads, args.spill)
        return 0
    args.data_dir.mkdir(parents=True, exist_ok=True)
    contract = args.data_dir / "bench_contract.yaml"
    contract.write_text(CONTRACT)
    rows, rc = [], 0
    for n_events in (int(x) for x in str(args.events).split(",") if x.strip()):
        r, ok = _one_size(args, n_events, contract)
        rows += r
        rc |= 0 if ok else 1
    print(f"\n| events | path | seconds | M events/s | x reference (wall) | CPU s | x reference (CPU) | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return rc


def _one_size(args, n_events: int, contract: Path) -> tuple[list[list[str]], bool]:
    n_cust = args.customers or max(n_events // 50, 1)
    path = args.data_dir / f"events-{n_events}-{n_cust}.parquet"
    if not path.exists():
        t = time.perf_counter()
        generate(path, n_events, n_cust)
        print(f"generated {path} in {time.perf_counter() - t:.0f} s")
    print(f"\n{n_events:,} events, {n_cust:,} customers, {path.stat().st_size / 2**20:,.0f} MiB Parquet; "
          f"DuckDB memory_limit={args.memory_limit} threads={args.threads or os.cpu_count()}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    kinds = [k for k in ("reference", "duckdb", "pandas") if k in args.only.split(",")]
    if n_events > args.pandas_max and "pandas" in kinds:
        kinds.remove("pandas")
        print(f"pandas path skipped: {n_events:,} events > --pandas-max {args.pandas_max:,}")
    results = {}
    for k in kinds:
        results[k] = _run_child(k, args, path, contract)
        print(f"  {k}: done, load average {os.getloadavg()[0]:.1f}", flush=True)
    ref, ref_cpu = (results.get("reference", {}).get(x) for x in ("seconds", "cpu_seconds"))
    print(f"{'path':<10} {'seconds':>8} {'M events/s':>11} {'x reference':>12} {'CPU s':>7} {'x ref CPU':>10} "
          f"{'peak RSS MiB':>13}  customers")
    rows = []
    for k, r in results.items():
        if "failed" in r:
            print(f"{k:<10} FAILED ({r['failed']}), peak RSS {r['rss_mib']:,.0f} MiB")
            rows.append([f"{n_events:,}", k, "FAILED", "", "", "", "", f"{r['rss_mib']:,.0f}"])
            continue
        eps = n_events / r["seconds"]
        ratio = f"{ref / r['seconds']:.2f}x" if ref else "-"
        cratio = f"{ref_cpu / r['cpu_seconds']:.2f}x" if ref_cpu else "-"
        print(f"{k:<10} {r['seconds']:8.1f} {eps / 1e6:11.2f} {ratio:>12} {r['cpu_seconds']:7.1f} {cratio:>10} "
              f"{r['rss_mib']:13,.0f}  {r['customers']:,}")
        rows.append([f"{n_events:,}", k, f"{r['seconds']:.1f}", f"{eps / 1e6:.2f}", ratio, f"{r['cpu_seconds']:.1f}",
                     cratio, f"{r['rss_mib']:,.0f}"])
    if "duckdb" in results and "timings" in results["duckdb"]:
        tm = dict(results["duckdb"]["timings"])
        passes = int(tm.pop("aggregate_passes", 1))
        print("duckdb stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in tm.items())
              + f"; feature pass in {passes} customer partition(s) (federation.engine_duckdb.aggregate_passes)")
    ok = True
    if "failed" not in results.get("duckdb", {"failed": 1}) and "failed" not in results.get("pandas", {"failed": 1}):
        same_x = np.array_equal(np.load(str(args.data_dir / "result-duckdb.json") + ".X.npy"),
                                np.load(str(args.data_dir / "result-pandas.json") + ".X.npy"))
        same_report = results["duckdb"]["report"] == results["pandas"]["report"]
        print(f"duckdb vs pandas: encoded matrices {'identical' if same_x else 'DIFFER'}, "
              f"reports {'identical' if same_report else 'DIFFER'}")
        ok = same_x and same_report
    return rows, ok and not any("failed" in r for r in results.values())


if __name__ == "__main__":
    raise SystemExit(main())
