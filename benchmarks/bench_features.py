"""Feature-building throughput on a generated event log, against the equivalent DuckDB query.

    python benchmarks/bench_features.py              # 10 million events
    python benchmarks/bench_features.py --events 1000000

Prints events/s and peak memory for fedprop (``raw_event_features``) and DuckDB (same aggregates, same
point-in-time filter, on the same in-memory frame), the ratio, and checks both agree on a few columns.
Peak memory: tracemalloc (numpy/pandas allocations) for fedprop; process peak RSS is printed too
(DuckDB allocates outside tracemalloc's view, so only RSS covers it).
"""
from __future__ import annotations

import argparse
import resource
import time
import tracemalloc

import numpy as np
import pandas as pd

from federation.features import EventSchema, raw_event_features

TYPES = ["visit", "purchase", "support_ticket", "return"]


def generate(n_events: int, n_customers: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    start = np.datetime64("2023-01-01T00:00:00", "s")
    secs = rng.integers(0, 455 * 86_400, n_events)  # 365 d of history + 90 d of horizon
    return pd.DataFrame({
        "user_id": rng.integers(0, n_customers, n_events).astype(np.int64),
        "timestamp": (start + secs.astype("timedelta64[s]")).astype("datetime64[ns]"),
        "event_type": pd.Categorical.from_codes(rng.choice(4, n_events, p=[0.7, 0.2, 0.05, 0.05]), TYPES),
        "amount": np.round(rng.lognormal(3.0, 0.7, n_events), 2),
        "channel": pd.Categorical.from_codes(rng.integers(0, 4, n_events), ["web", "app", "store", "phone"]),
    })


DUCK = """
WITH b AS (
  SELECT user_id, event_type::VARCHAR AS et, amount, channel::VARCHAR AS ch,
         epoch(TIMESTAMP '{cut}' - timestamp) / 86400.0 AS age
  FROM ev WHERE timestamp < TIMESTAMP '{cut}'
), w AS (
  SELECT *, age <= {lb} AND et IN ('visit','purchase','support_ticket','return') AS act,
            age <= {lb} AND et = 'purchase' AS buy FROM b
)
SELECT user_id,
  min(CASE WHEN act THEN age END) AS recency_days, max(age) AS tenure_days,
  count(*) FILTER (WHERE buy) AS frequency, coalesce(sum(amount) FILTER (WHERE buy), 0) AS monetary,
  count(*) FILTER (WHERE act AND age <= 7) AS events_7d, count(*) FILTER (WHERE act AND age <= 30) AS events_30d,
  count(*) FILTER (WHERE act AND age <= 90) AS events_90d,
  count(*) FILTER (WHERE buy AND age <= 30) AS purchases_30d, count(*) FILTER (WHERE buy AND age <= 90) AS purchases_90d,
  coalesce(sum(amount) FILTER (WHERE buy AND age <= 30), 0) AS amount_30d,
  coalesce(sum(amount) FILTER (WHERE buy AND age <= 90), 0) AS amount_90d,
  count(*) FILTER (WHERE age <= 90 AND et = 'support_ticket') AS support_90d,
  count(*) FILTER (WHERE age <= 90 AND et = 'return') AS returns_90d,
  count(*) FILTER (WHERE act AND age > 30 AND age <= 90) AS e30_90,
  (max(CASE WHEN act THEN age END) - min(CASE WHEN act THEN age END)) / greatest(count(*) FILTER (WHERE act) - 1, 1) AS mean_gap_days,
  count(DISTINCT CASE WHEN age <= {lb} THEN ch END) AS distinct_channels,
  (max(CASE WHEN buy THEN age END) - min(CASE WHEN buy THEN age END)) / greatest(count(*) FILTER (WHERE buy) - 1, 1) AS purchase_gap_days
FROM w GROUP BY user_id HAVING count(*) FILTER (WHERE act) > 0 ORDER BY user_id
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--customers", type=int, default=0, help="default: events / 50")
    ap.add_argument("--threads", type=int, default=0, help="DuckDB threads (0 = DuckDB's default)")
    args = ap.parse_args(argv)
    n_cust = args.customers or max(args.events // 50, 1)
    ev = generate(args.events, n_cust)
    cutoff = pd.Timestamp("2024-01-01")
    print(f"generated {len(ev):,} events, {n_cust:,} customers; cutoff {cutoff.date()}")

    tracemalloc.start()
    t = time.perf_counter()
    ours = raw_event_features(ev, cutoff=cutoff, schema=EventSchema(), lookback_days=365)
    t_ours = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after_ours = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    import duckdb

    con = duckdb.connect()
    if args.threads:
        con.execute(f"SET threads={args.threads}")
    con.register("ev", ev)
    t = time.perf_counter()
    duck = con.execute(DUCK.format(cut=cutoff, lb=365)).df()
    t_duck = time.perf_counter() - t
    rss_after_duck = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    threads = con.execute("SELECT current_setting('threads')").fetchone()[0]

    duck = duck.set_index("user_id")
    for col in ("recency_days", "frequency", "monetary", "events_30d", "distinct_channels", "purchase_gap_days"):
        a = ours[col].to_numpy()
        b = duck[col].reindex(ours.index).fillna(365.0 if col == "purchase_gap_days" else 0).to_numpy(dtype=float)
        if col == "purchase_gap_days":
            b = np.where(ours["frequency"].to_numpy() > 1, b, 365.0)
        assert np.allclose(a, b, rtol=1e-6, atol=1e-6), f"fedprop and DuckDB disagree on {col}"
    assert len(ours) == len(duck), (len(ours), len(duck))
    eps_ours, eps_duck = len(ev) / t_ours, len(ev) / t_duck
    print(f"fedprop raw_event_features: {t_ours:7.2f} s  {eps_ours / 1e6:7.2f} M events/s  "
          f"peak traced {peak / 2**20:,.0f} MiB (input frame {ev.memory_usage(deep=True).sum() / 2**20:,.0f} MiB)")
    print(f"DuckDB ({threads} threads):          {t_duck:7.2f} s  {eps_duck / 1e6:7.2f} M events/s")
    print(f"process peak RSS: {rss_after_ours:,.0f} MiB after fedprop, {rss_after_duck:,.0f} MiB after DuckDB")
    print(f"ratio fedprop/DuckDB throughput: {eps_ours / eps_duck:.2f}x  (results agree on {len(ours):,} customers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
