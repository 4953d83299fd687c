"""Models a partner builds from its OWN data, which never leave its node: the non-private local reference
(best of a tuned logistic regression and HistGradientBoosting, chosen on a validation split of its training
customers) and the personalised model derived from the global DP model.

Personalisation (per task head): candidates are the global DP model, the local model, the global model
fine-tuned on the partner's training customers, and blends of global and local logits
(``alpha * logit_global + (1 - alpha) * logit_local``). The partner picks the candidate with the best AUC on a
validation split of its training customers (ties favour the global model), then refits the chosen candidate on
all its training customers. Its held-out test customers are never used for a choice.

Privacy: the personalised model is a function of the partner's raw data; it is NOT a DP release and must never
leave the node (no coordinator, partner or model card sees it). The global model it starts from is DP
post-processing, so personalisation spends nothing from the budget. Who can attack it: whoever reads the node's
disk or queries its scores can learn about the partner's customers as from any non-private in-house model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

LR_CS = (0.01, 0.1, 1.0, 10.0)
BLEND_ALPHAS = (0.25, 0.5, 0.75)
FINE_TUNE_EPOCHS = (2, 8)
VAL_FRACTION = 0.25
MIN_VAL_POSITIVES = 5  # below this a validation AUC decides nothing: fall back on the simplest candidate


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def validation_split(n: int, *, seed: int, fraction: float = VAL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) row indices of the training customers. Not privacy randomness: nothing is released."""
    perm = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(fraction * n)))
    return np.sort(perm[k:]), np.sort(perm[:k])


@dataclass
class LocalModel:
    """A fitted scikit-learn classifier of one head; ``kind`` is ``logreg(C=..)`` or ``hist_gbm``."""

    kind: str
    estimator: Any

    def logit(self, X: np.ndarray) -> np.ndarray:
        if hasattr(self.estimator, "classes_") and len(self.estimator.classes_) == 1:  # one class only in training
            return np.full(len(X), 30.0 if self.estimator.classes_[0] == 1 else -30.0)
        return _logit(self.estimator.predict_proba(X)[:, 1])


def _candidates(seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    for C in LR_CS:
        yield f"logreg(C={C:g})", lambda C=C: make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    yield "hist_gbm", lambda: HistGradientBoostingClassifier(
        max_iter=200, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=20, l2_regularization=1.0,
        early_stopping=False, random_state=seed)


def fit_reference(X: np.ndarray, y: np.ndarray, *, seed: int) -> LocalModel:
    """Best of tuned logistic regression (C grid) and HistGradientBoosting on a validation split of (X, y),
    refit on all of (X, y). The non-private reference every baseline uses (local-only and centralized).
    One OpenMP thread: on a shared machine HistGradientBoosting's thread pool spins far slower than one thread."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return _fit_reference(X, y, seed=seed)


def _fit_reference(X: np.ndarray, y: np.ndarray, *, seed: int) -> LocalModel:
    fit, val = validation_split(len(X), seed=seed)
    best: tuple[float, str, Any] | None = None
    if y[val].sum() >= MIN_VAL_POSITIVES and (1 - y[val]).sum() >= MIN_VAL_POSITIVES and 0 < y[fit].sum() < len(fit):
        for name, make in _candidates(seed):
            est = make().fit(X[fit], y[fit])
            score = _auc(y[val], est.predict_proba(X[val])[:, 1])
            if best is None or score > best[0] + 1e-12:
                best = (score, name, make)
    if best is None:  # too few positives to compare: the most regularised linear model
        name, make = next(iter(_candidates(seed)))
        best = (float("nan"), name, make)
    if 0 < y.sum() < len(y):
        return LocalModel(best[1], best[2]().fit(X, y))
    from sklearn.dummy import DummyClassifier

    return LocalModel("constant", DummyClassifier(strategy="most_frequent").fit(X, y))


@dataclass
class HeadChoice:
    kind: str  # global | local | fine_tune | blend
    alpha: float = 1.0  # blend weight of the global logits
    epochs: int = 0  # fine_tune epochs
    validation_auc: float = float("nan")
    local_kind: str = ""


@dataclass
class PersonalisedModel:
    """Per head, the chosen candidate; ``predict_proba(X)`` -> [n, heads]. Lives only at its node."""

    heads: tuple[str, ...]
    global_model: nn.Module
    choices: dict[str, HeadChoice]
    local: dict[str, LocalModel] = field(default_factory=dict)
    tuned: dict[str, nn.Module] = field(default_factory=dict)

    def predict_proba(self, X: torch.Tensor) -> np.ndarray:
        from federation.models import predict_proba

        g = predict_proba(self.global_model, X).numpy()
        out = np.empty_like(g)
        for j, h in enumerate(self.heads):
            c = self.choices[h]
            if c.kind == "global":
                out[:, j] = g[:, j]
            elif c.kind == "local":
                out[:, j] = _sigmoid(self.local[h].logit(X.numpy()))
            elif c.kind == "blend":
                out[:, j] = _sigmoid(c.alpha * _logit(g[:, j]) + (1 - c.alpha) * self.local[h].logit(X.numpy()))
            else:
                out[:, j] = predict_proba(self.tuned[h], X).numpy()[:, j]
        return out

    def describe(self) -> dict[str, str]:
        def one(c: HeadChoice) -> str:
            if c.kind == "blend":
                return f"blend(global {c.alpha:g}, local {c.local_kind})"
            if c.kind == "fine_tune":
                return f"fine_tune({c.epochs} epochs)"
            return c.kind if c.kind != "local" else f"local {c.local_kind}"

        return {h: one(c) for h, c in self.choices.items()}


def fine_tune(global_model: nn.Module, X: torch.Tensor, Y: torch.Tensor, *, epochs: int, seed: int,
              lr: float = 1e-3) -> nn.Module:
    """Non-private Adam fine-tuning of a copy of the global model on the partner's own customers."""
    from clients.training import train_nonprivate

    model = copy.deepcopy(global_model)
    train_nonprivate(model, X, Y, epochs=epochs, lr=lr, batch_size=64, generator=torch.Generator().manual_seed(seed))
    return model


def personalise(global_model: nn.Module, X: torch.Tensor, Y: torch.Tensor, *, heads: tuple[str, ...],
                seed: int) -> PersonalisedModel:
    """Choose and fit this partner's personalised model on its training customers (X, Y) only."""
    from federation.models import predict_proba

    Xn, Yn = X.numpy(), Y.numpy()
    fit, val = validation_split(len(X), seed=seed)
    g_val = _logit(predict_proba(global_model, X[val]).numpy())
    tuned_val = {e: predict_proba(fine_tune(global_model, X[fit], Y[fit], epochs=e, seed=seed), X[val]).numpy()
                 for e in FINE_TUNE_EPOCHS}
    choices: dict[str, HeadChoice] = {}
    local: dict[str, LocalModel] = {}
    for j, h in enumerate(heads):
        y_val = Yn[val, j]
        if y_val.sum() < MIN_VAL_POSITIVES or (1 - y_val).sum() < MIN_VAL_POSITIVES:
            choices[h] = HeadChoice("global")  # a validation AUC on so few would decide by chance
            continue
        loc_fit = fit_reference(Xn[fit], Yn[fit, j], seed=seed)
        l_val = loc_fit.logit(Xn[val])
        cands = [(_auc(y_val, g_val[:, j]), 2, HeadChoice("global"))]
        cands.append((_auc(y_val, l_val), 0, HeadChoice("local", local_kind=loc_fit.kind)))
        cands += [(_auc(y_val, a * g_val[:, j] + (1 - a) * l_val), 1, HeadChoice("blend", alpha=a, local_kind=loc_fit.kind))
                  for a in BLEND_ALPHAS]
        cands += [(_auc(y_val, p[:, j]), 1, HeadChoice("fine_tune", epochs=e)) for e, p in tuned_val.items()]
        score, _, best = max(cands, key=lambda c: (c[0], c[1]))
        best.validation_auc = score
        choices[h] = best
        if best.kind in ("local", "blend"):
            local[h] = fit_reference(Xn, Yn[:, j], seed=seed)  # refit on all training customers
            best.local_kind = local[h].kind
    tuned = {}
    for h, c in choices.items():
        if c.kind == "fine_tune":
            tuned[h] = fine_tune(global_model, X, Y, epochs=c.epochs, seed=seed)
    return PersonalisedModel(tuple(heads), global_model, choices, local, tuned)
