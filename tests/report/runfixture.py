"""A small but complete run directory, built in-process in ~1 s with fedprop's own writers (no Ray).

It has the files a simulation writes (config.json, federated_rounds.json/csv, checkpoints, the final model
signed by the server key with its model cards, federation.pub, summary.json/md) with metrics computed by
the real code (exact per-partner histograms -> server.strategy.pooled_summaries; simulations.summary),
from a fixed logistic-regression model on seeded synthetic features. The real Ray run is covered by
tests/core/test_e2e_simulation.py and the slow test in this directory.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from federation import metrics as M
from federation.config import from_dict
from federation.featurespec import feature_names
from federation.models import build_model
from server.outputs import RunOutputs
from server.release import release_model
from server.strategy import pooled_summaries
from simulations.summary import build_summary, render_summary

HEADS = ("churn", "propensity")
TAG = "churn+propensity"


def _exact_metrics(y, p, *, prefix: str) -> dict:
    """A fixture partner's exact (NOT DP) evaluation metrics and histogram: report tests only."""
    hist = M.histogram_from_scores(y, p, bins=M.DEFAULT_BINS)
    s = M.summarize(hist)
    out = {f"{prefix}auc": s["auc_roc"], f"{prefix}log-loss": s["log_loss"],
           f"{prefix}top-decile-lift": s["top_decile_lift"]}
    out.update(M.to_flat(hist, prefix=f"{prefix}hist."))
    return out


def _scores(rng: np.random.Generator, y: np.ndarray, strength: float) -> np.ndarray:
    logit = strength * (2 * y - 1) + rng.normal(0.0, 1.0, len(y)) - 1.0
    return 1.0 / (1.0 + np.exp(-logit))


def make_run(run_dir: Path, key_dir: Path, *, epsilon: float = 3.0, partners: int = 3, rounds: int = 3,
             seed: int = 0) -> Path:
    cfg = from_dict({"partners": partners, "rounds": rounds, "seed": seed, "privacy": {"epsilon": epsilon},
                     "model": {"kind": "logreg", "hidden": []}, "release": {"key_dir": str(key_dir)}})
    rng = np.random.default_rng([seed, int(epsilon * 100)])
    names = feature_names(cfg.data)
    torch.manual_seed(seed)
    model = build_model(cfg.model, n_features=len(names), n_outputs=len(HEADS))
    out = RunOutputs(run_dir)
    out.write_config(cfg)
    sizes = [120 + 60 * p for p in range(partners)]
    labels = {str(p): np.stack([(rng.random(n) < r).astype(np.float32) for r in (0.2, 0.5)], axis=1)
              for p, n in zip(range(partners), sizes)}
    strength = 0.6 + 0.25 * np.log1p(epsilon)
    last_pooled: dict = {}
    for r in range(1, rounds + 1):
        rec = {"round": r, "partners": {}, "refusals": []}
        flats = []
        for pid, Y in labels.items():
            P = np.stack([_scores(rng, Y[:, j], strength * (0.7 + 0.3 * r / rounds)) for j in range(2)], axis=1)
            ev = {"num-examples": len(Y), "partition-id": int(pid)}
            for j, h in enumerate(HEADS):
                ev.update(_exact_metrics(Y[:, j], P[:, j], prefix=f"{h}."))
            flats.append(ev)
            rec["partners"][pid] = {
                "train": {"num-examples": 4 * len(Y), "partition-id": int(pid), "epsilon": epsilon * np.sqrt(r / rounds),
                          "delta": 1e-5},
                "evaluate": {k: v for k, v in ev.items() if ".hist." not in k},
            }
        last_pooled = pooled_summaries(flats)
        rec["evaluate"] = {f"{h}.{k}": float(s[k]) for h, s in last_pooled.items()
                           for k in ("auc_roc", "top_decile_lift", "base_rate", "ece")}
        out.record_round(TAG, rec)
        out.save_checkpoint(TAG, r, model.state_dict())
    out.save_final(TAG, model.state_dict(), heads=HEADS, feature_names=names)
    release_model(run_dir, cfg, tag=TAG, heads=HEADS, feature_names=names, rounds=out.rounds[TAG], pooled=last_pooled)
    out.finish()

    def per_partner(strength_: float) -> dict:
        return {pid: {h: M.metrics_from_scores(Y[:, j], _scores(rng, Y[:, j], strength_)) for j, h in enumerate(HEADS)}
                for pid, Y in labels.items()}

    Yall = np.concatenate(list(labels.values()))
    pooled = {h: M.metrics_from_scores(Yall[:, j], _scores(rng, Yall[:, j], strength)) for j, h in enumerate(HEADS)}
    results = {TAG: {
        "heads": list(HEADS),
        "federated_pooled": pooled,
        "federated_per_partner": per_partner(strength),
        "baselines": {"centralized": {"pooled": {h: M.metrics_from_scores(Yall[:, j], _scores(rng, Yall[:, j], 1.6))
                                                 for j, h in enumerate(HEADS)},
                                      "per_partner": per_partner(1.6)},
                      "local_only": {"per_partner": per_partner(0.8),
                                     "pooled": {h: M.metrics_from_scores(Yall[:, j], _scores(rng, Yall[:, j], 0.8))
                                                for j, h in enumerate(HEADS)}}},
        "rounds": out.rounds[TAG],
        "partners": {pid: {"n_train": 4 * len(Y), "n_test": len(Y)} for pid, Y in labels.items()},
    }}
    summary = build_summary(cfg, results, wall_time_s=1.0, federation_time_s=0.5)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    (run_dir / "summary.md").write_text(render_summary(summary))
    return run_dir
