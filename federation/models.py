"""Models: logistic regression and a small MLP, one output per task (a two-head model when both tasks
train together). Only nn.Linear and elementwise activations: no BatchNorm or other layer that mixes
samples, so per-customer clipping (Opacus or the fused fast path) is exact.
"""
from __future__ import annotations

import torch
from torch import nn

from federation.config import ModelConfig
from federation.errors import ConfigError


def federations(task: str, heads: str) -> list[tuple[str, ...]]:
    """The federations a run trains, each as its tuple of label heads.

    task=both, heads=two_head -> one two-head model; task=both, heads=separate -> two models, one per task.
    """
    if task == "both":
        return [("churn", "propensity")] if heads == "two_head" else [("churn",), ("propensity",)]
    return [(task,)]


def build_model(cfg: ModelConfig, *, n_features: int, n_outputs: int) -> nn.Sequential:
    """Logits model: input [n, n_features] -> [n, n_outputs] (one logit per task head)."""
    if n_features < 1 or n_outputs < 1:
        raise ConfigError(f"model needs n_features >= 1 and n_outputs >= 1, got {n_features}, {n_outputs}")
    if cfg.kind == "logreg":
        return nn.Sequential(nn.Linear(n_features, n_outputs))
    if cfg.kind == "mlp":
        layers: list[nn.Module] = []
        width = n_features
        for h in cfg.hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        layers.append(nn.Linear(width, n_outputs))
        return nn.Sequential(*layers)
    raise ConfigError(f"model.kind={cfg.kind!r} is not allowed; use one of logreg, mlp")


def predict_proba(model: nn.Module, X: torch.Tensor, *, batch_size: int = 65_536) -> torch.Tensor:
    """Probabilities [n, n_outputs], in eval mode and without gradients."""
    model.eval()
    with torch.no_grad():
        out = [torch.sigmoid(model(X[i : i + batch_size])) for i in range(0, len(X), batch_size)]
    return torch.cat(out) if out else torch.zeros((0, 1))
