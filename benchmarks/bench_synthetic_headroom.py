"""How much federation CAN add on the synthetic demo: pooled vs local-only, no DP, measured on fresh customers.

    python benchmarks/bench_synthetic_headroom.py                       # 5 partners, generator seeds 42 7 3
    python benchmarks/bench_synthetic_headroom.py --min-customers 150 --seeds 42

For each generator seed, builds every partner's customers as the default simulation does (sizes from
``partner_sizes``, features from ``build_event_features``), fits a tuned logistic regression (C by 3-fold AUC) on
each partner's own customers (local-only) and one on all partners' customers pooled (centralized, the ceiling of a
federated model without DP), and scores both on 4,000 FRESH customers drawn from the same partner's generator
profile (another seed), so per-partner AUCs are precise even for a 300-customer unit. The pooled - local gap of a
small unit is the most a federated model can give it; DP training then costs part of it.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics as st
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def partner_features(profile, seed: int):
    from federation.features import build_event_features
    from federation.featurespec import SYNTHETIC_CATEGORICAL
    from simulations.synthetic import SYNTHETIC_CUTOFF, SYNTHETIC_HORIZON_DAYS, generate_partner

    events, customers = generate_partner(profile, seed=seed)
    return build_event_features(events, cutoff=SYNTHETIC_CUTOFF, horizon_days=SYNTHETIC_HORIZON_DAYS,
                                static=customers, categorical=SYNTHETIC_CATEGORICAL)


def tuned_logreg(X: np.ndarray, y: np.ndarray):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    scores = {C: cross_val_score(LogisticRegression(C=C, max_iter=2000), X, y, cv=3, scoring="roc_auc").mean()
              for C in (0.01, 0.1, 1.0, 10.0)}
    return LogisticRegression(C=max(scores, key=scores.get), max_iter=2000).fit(X, y)


def headroom(seed: int, *, partners: int, min_customers: int, max_customers: int, fresh: int):
    from sklearn.metrics import roc_auc_score

    from simulations.synthetic import partner_profile, partner_sizes

    sizes = partner_sizes(partners, min_customers=min_customers, max_customers=max_customers, seed=seed)
    train, test = [], []
    for p, n in enumerate(sizes):
        profile = partner_profile(p, n, seed=seed)
        train.append(partner_features(profile, seed))
        test.append(partner_features(dataclasses.replace(profile, n_customers=fresh), seed + 1000))
    rows = []
    for task in ("churn", "propensity"):
        pooled = tuned_logreg(np.concatenate([f.X for f in train]), np.concatenate([f.y[task] for f in train]))
        for p, (tr, te) in enumerate(zip(train, test)):
            local = tuned_logreg(tr.X, tr.y[task])
            auc_l = roc_auc_score(te.y[task], local.predict_proba(te.X)[:, 1])
            auc_p = roc_auc_score(te.y[task], pooled.predict_proba(te.X)[:, 1])
            rows.append({"seed": seed, "task": task, "partner": p, "size": sizes[p], "n": len(tr), "positives": int(tr.y[task].sum()),
                         "local": auc_l, "pooled": auc_p})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="*", type=int, default=[42, 7, 3])
    ap.add_argument("--partners", type=int, default=5)
    ap.add_argument("--min-customers", type=int, default=300, help="conf/data/synthetic.yaml's default")
    ap.add_argument("--max-customers", type=int, default=6000)
    ap.add_argument("--fresh", type=int, default=4000, help="fresh test customers per partner")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module="sklearn")
    rows = [r for s in args.seeds for r in headroom(s, partners=args.partners, min_customers=args.min_customers,
                                                     max_customers=args.max_customers, fresh=args.fresh)]
    print("| seed | task | partner | customers (positives) | local-only AUC | pooled AUC | gain |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['task']} | {r['partner']} | {r['n']} ({r['positives']}) | {r['local']:.3f} | "
              f"{r['pooled']:.3f} | {r['pooled'] - r['local']:+.3f} |")
    small = args.max_customers / 2  # partner_sizes: the large partners are sized from max/2 up
    for task in ("churn", "propensity"):
        for label, keep in (("small units", lambda r: r["size"] < small), ("large partners", lambda r: r["size"] >= small)):
            g = [r["pooled"] - r["local"] for r in rows if r["task"] == task and keep(r)]
            if g:
                print(f"{task}, {label}: pooled - local AUC mean {st.mean(g):+.3f} (min {min(g):+.3f}, max "
                      f"{max(g):+.3f}, {len(g)} partner-seeds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
