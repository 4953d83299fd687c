"""Evaluation release of one partner: scalar metrics of its own held-out customers plus the per-class
score histogram the server sums into exact pooled metrics (see federation/metrics.py for what it reveals).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from federation import metrics as M


def evaluation_metrics(y: np.ndarray, p: np.ndarray, *, prefix: str) -> dict[str, Any]:
    hist = M.histogram_from_scores(y, p)
    s = M.summarize(hist)
    out: dict[str, Any] = {
        f"{prefix}auc": s["auc_roc"],
        f"{prefix}log-loss": s["log_loss"],
        f"{prefix}top-decile-lift": s["top_decile_lift"],
    }
    out.update(M.to_flat(hist, prefix=f"{prefix}hist."))
    return out
