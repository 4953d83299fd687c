"""Evaluation release of one partner: scalar metrics of its own held-out customers plus the per-class
score histogram the server sums into exact pooled metrics (see federation/metrics.py for what it reveals).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from federation import metrics as M


def evaluation_metrics(
    y: np.ndarray, p: np.ndarray, *, prefix: str, bins: int = M.DEFAULT_BINS, dp_epsilon: float = 0.0,
    rng: np.random.Generator | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(metrics to release, DP mechanism or None). With ``dp_epsilon`` > 0 only the noisy histogram and
    what is computed from it leave the node (post-processing); the mechanism is for the ledger."""
    hist = M.histogram_from_scores(y, p, bins=bins)
    mechanism = None
    if dp_epsilon > 0:
        hist, mechanism = M.noisy(hist, epsilon=dp_epsilon, rng=rng if rng is not None else np.random.default_rng())
    s = M.summarize(hist)
    out: dict[str, Any] = {
        f"{prefix}auc": s["auc_roc"],
        f"{prefix}log-loss": s["log_loss"],
        f"{prefix}top-decile-lift": s["top_decile_lift"],
    }
    out.update(M.to_flat(hist, prefix=f"{prefix}hist."))
    return out, mechanism
