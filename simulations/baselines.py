"""Baselines on exactly the federation's splits: a centralized non-private model on the pooled training
data (the upper bound federation approaches) and local-only non-private models, one per partner (what a
partner gets alone, where no release happens and so no DP is needed)."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from clients.node import PartnerData
from clients.training import train_nonprivate
from federation import metrics as M
from federation.config import FedpropConfig
from federation.models import build_model, predict_proba


def _fit(cfg: FedpropConfig, X: torch.Tensor, Y: torch.Tensor, *, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(cfg.model, n_features=X.shape[1], n_outputs=Y.shape[1])
    train_nonprivate(model, X, Y, epochs=cfg.baselines.epochs, lr=cfg.baselines.lr, batch_size=256,
                     generator=torch.Generator().manual_seed(seed))
    return model


def head_metrics(model: torch.nn.Module, data: PartnerData) -> dict[str, dict[str, Any]]:
    P = predict_proba(model, data.X_test).numpy()
    Y = data.Y_test.numpy()
    return {h: M.metrics_from_scores(Y[:, j], P[:, j]) for j, h in enumerate(data.heads)}


def pooled_metrics(model: torch.nn.Module, parts: list[PartnerData]) -> dict[str, dict[str, Any]]:
    P = np.concatenate([predict_proba(model, p.X_test).numpy() for p in parts])
    Y = np.concatenate([p.Y_test.numpy() for p in parts])
    return {h: M.metrics_from_scores(Y[:, j], P[:, j]) for j, h in enumerate(parts[0].heads)}


def run_baselines(cfg: FedpropConfig, parts: list[PartnerData], *,
                  progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """``progress(done, total, what)`` is called after each model (1 centralized + one local-only per partner)."""
    total = 1 + len(parts)
    X = torch.cat([p.X_train for p in parts])
    Y = torch.cat([p.Y_train for p in parts])
    central = _fit(cfg, X, Y, seed=cfg.seed)
    if progress:
        progress(1, total, f"centralized model on {len(X)} pooled training customers")
    out: dict[str, Any] = {
        "centralized": {"pooled": pooled_metrics(central, parts),
                        "per_partner": {str(p.partition_id): head_metrics(central, p) for p in parts}},
        "local_only": {"per_partner": {}},
    }
    for i, p in enumerate(parts):
        local = _fit(cfg, p.X_train, p.Y_train, seed=cfg.seed + 1000 + p.partition_id)
        out["local_only"]["per_partner"][str(p.partition_id)] = head_metrics(local, p)
        if progress:
            progress(2 + i, total, f"local-only model of partner {p.partition_id}")
    return out
