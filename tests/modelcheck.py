"""Did a federation's released model learn? Score it on FRESH synthetic customers (another seed of the same
generator), exactly, in the test process. The AUC a federation reports is a DP release whose noise on tiny test
partners is several hundredths, so asserting a threshold on it is a flaky test; this check is not."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from federation.config import FedpropConfig
from federation.metrics import metrics_from_scores
from federation.models import build_model, predict_proba
from server.outputs import load_model
from simulations.partners import synthetic_partner


def fresh_synthetic_auc(cfg: FedpropConfig, model_path: str | Path, head: str, *, seed_offset: int = 7919) -> float:
    sd, meta = load_model(model_path)
    heads = list(meta.get("heads") or [])
    fresh = dataclasses.replace(cfg, seed=cfg.seed + seed_offset)
    parts = [synthetic_partner(fresh, i, cfg.partners) for i in range(cfg.partners)]
    names = tuple(meta["feature_names"])
    assert all(tuple(p.feature_names) == names for p in parts), "fresh customers must have the model's features"
    model = build_model(cfg.model, n_features=len(names), n_outputs=len(heads))
    model.load_state_dict(sd)
    X = torch.from_numpy(np.concatenate([p.X for p in parts]))
    y = np.concatenate([p.y[head] for p in parts])
    return float(metrics_from_scores(y, predict_proba(model, X).numpy()[:, heads.index(head)])["auc_roc"])
