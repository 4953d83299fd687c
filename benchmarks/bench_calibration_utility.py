"""What the tight accountant adds to utility: noise calibrated with RDP vs with ``tight`` (PLD / PRV), same splits.

    python benchmarks/bench_calibration_utility.py                                  # 4 bundled datasets x eps 1, 3
    python benchmarks/bench_calibration_utility.py --data telco_churn --eps 1 --draws 2

For each dataset, epsilon and fixed PUBLIC split key (``split-0`` .. ``split-{k-1}``, hashed: the same customers in
train and test for both accountants), runs ``bench_utility.evaluate_dataset`` (the in-process federation with the
defaults, personalisation off) ``--draws`` times per accountant with fresh noise, and prints the mean fed-DP /
centralized pooled AUC ratio per accountant, its spread over splits and draws, and the partners' noise
multipliers. The two runs differ only in ``privacy.accountant`` (the accountant the nodes calibrate sigma with).
"""
from __future__ import annotations

import argparse
import hashlib
import statistics as st
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_utility as B  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="*", default=list(B.DATASETS))
    ap.add_argument("--eps", nargs="*", type=float, default=[1.0, 3.0])
    ap.add_argument("--splits", type=int, default=3, help="fixed public split keys per cell")
    ap.add_argument("--draws", type=int, default=3, help="noise draws per split and accountant")
    args = ap.parse_args(argv)
    ratios: dict[tuple, list[float]] = defaultdict(list)
    sigmas: dict[tuple, list[float]] = {}
    for data in args.data:
        for eps in args.eps:
            for k in range(args.splits):
                key = hashlib.sha256(f"split-{k}".encode()).digest()
                for acc in ("rdp", "tight"):
                    for _ in range(args.draws):
                        r = B.evaluate_dataset(data, eps, [f"privacy.accountant={acc}"], personalise=False,
                                               split_key=key)
                        sigmas[(data, eps, acc)] = [round(v[0], 2) for v in r["dp"].values()]
                        for head, h in r["heads"].items():
                            ratios[(data, head, eps, acc)].append(h["ratio"])
                print(f"  {data} eps {eps} split {k}: done", flush=True)
    print("\n| data | head | epsilon | ratio, RDP-calibrated (sd) | ratio, tight-calibrated (sd) | difference | "
          "sigma per partner, RDP -> tight | runs per cell |")
    print("|---|---|---|---|---|---|---|---|")
    for (data, head, eps, acc) in sorted(ratios):
        if acc != "rdp":
            continue
        a, b = ratios[(data, head, eps, "rdp")], ratios[(data, head, eps, "tight")]
        print(f"| {data} | {head} | {eps:g} | {st.mean(a):.4f} ({st.pstdev(a):.4f}) | {st.mean(b):.4f} "
              f"({st.pstdev(b):.4f}) | {st.mean(b) - st.mean(a):+.4f} | {sigmas[(data, eps, 'rdp')]} -> "
              f"{sigmas[(data, eps, 'tight')]} | {len(a)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
