"""Models a partner builds from its OWN data, which never leave its node: the non-private local reference
(best of a tuned logistic regression and HistGradientBoosting, chosen on a validation split of its training
customers) and the personalised model derived from the global DP model.

Personalisation (per task head): candidates are convex blends of the global DP model's and the local model's
logits (``alpha * logit_global + (1 - alpha) * logit_local``, alpha on a grid from 0 = the local-only model to
1 = the global model), the global model fine-tuned on the partner's training customers, and the local model's
kind refitted with the global model's logit as one more feature (stacking). The partner scores
each by its mean AUC over out-of-fold validation folds of its training customers (the local model and the
fine-tuning refitted without the fold) and keeps the best (ties favour the local-only model, then the global
one); a blend then uses the partner's local-only model itself. Its held-out test customers are never used for a
choice. Since local-only is a candidate, validation never prefers a model it scores below local-only.

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
BLEND_ALPHAS = tuple(i / 20 for i in range(21))  # 0 = local-only, 1 = global
N_FOLDS = 5
# A candidate replaces local-only only if its mean per-fold AUC gain exceeds this many standard errors of the gain
MIN_GAIN_SE = 0.0
FINE_TUNE_EPOCHS = (2, 8)
VAL_FRACTION = 0.25
MIN_VAL_POSITIVES = 5  # below this a validation AUC decides nothing: fall back on the simplest candidate
# (fit_reference: on its validation split; personalise: per class and fold, on average)


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
    kind: str  # global | local | fine_tune | blend | stack
    alpha: float = 1.0  # blend weight of the global logits (1 = global, 0 = local)
    epochs: int = 0  # fine_tune epochs
    validation_auc: float = float("nan")  # mean out-of-fold AUC of the chosen candidate on the training customers
    local_kind: str = ""
    local_validation_auc: float = float("nan")  # the same for the local-only model (alpha 0)
    # Platt scaling fitted on the chosen candidate's out-of-fold logits at the node (a = 1, b = 0: none); it
    # changes probabilities, never the ranking (AUC, deciles)
    platt_a: float = 1.0
    platt_b: float = 0.0
    ece_uncalibrated: float = float("nan")  # out-of-fold ECE (10 equal-width bins) of the chosen candidate
    ece: float = float("nan")  # the same after the Platt scaling (in-sample for its 2 parameters)


@dataclass
class PersonalisedModel:
    """Per head, the chosen candidate; ``predict_proba(X)`` -> [n, heads]. Lives only at its node."""

    heads: tuple[str, ...]
    global_model: nn.Module
    choices: dict[str, HeadChoice]
    local: dict[str, LocalModel] = field(default_factory=dict)
    tuned: dict[str, nn.Module] = field(default_factory=dict)
    stacked: dict[str, LocalModel] = field(default_factory=dict)  # local model with the global logit as a feature

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
            elif c.kind == "stack":
                out[:, j] = _sigmoid(self.stacked[h].logit(np.c_[X.numpy(), _logit(g[:, j])]))
            else:
                out[:, j] = predict_proba(self.tuned[h], X).numpy()[:, j]
            if (c.platt_a, c.platt_b) != (1.0, 0.0):
                out[:, j] = _sigmoid(c.platt_a * _logit(out[:, j]) + c.platt_b)
        return out

    def describe(self) -> dict[str, str]:
        def one(c: HeadChoice) -> str:
            if c.kind == "blend":
                return f"blend(global {c.alpha:g}, local {c.local_kind})"
            if c.kind == "fine_tune":
                return f"fine_tune({c.epochs} epochs)"
            if c.kind == "stack":
                return f"stack(local {c.local_kind} + global logit)"
            return c.kind if c.kind != "local" else f"local {c.local_kind}"

        def cal(c: HeadChoice) -> str:
            return " + Platt calibration" if (c.platt_a, c.platt_b) != (1.0, 0.0) else ""

        return {h: one(c) + cal(c) for h, c in self.choices.items()}


def fine_tune(global_model: nn.Module, X: torch.Tensor, Y: torch.Tensor, *, epochs: int, seed: int,
              lr: float = 1e-3) -> nn.Module:
    """Non-private Adam fine-tuning of a copy of the global model on the partner's own customers."""
    from clients.training import train_nonprivate

    model = copy.deepcopy(global_model)
    train_nonprivate(model, X, Y, epochs=epochs, lr=lr, batch_size=64, generator=torch.Generator().manual_seed(seed))
    return model


def cv_folds(n: int, *, seed: int, k: int = N_FOLDS) -> list[np.ndarray]:
    """``k`` disjoint validation folds covering the training customers. Not privacy randomness: nothing is released."""
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(f) for f in np.array_split(perm, k)]


def _refit(local: LocalModel, X: np.ndarray, y: np.ndarray) -> LocalModel:
    """The same estimator (kind and hyperparameters) as ``local``, fitted on (X, y)."""
    from sklearn.base import clone

    if local.kind == "constant" or not 0 < y.sum() < len(y):
        from sklearn.dummy import DummyClassifier

        return LocalModel("constant", DummyClassifier(strategy="most_frequent").fit(X, y))
    return LocalModel(local.kind, clone(local.estimator).fit(X, y))


ECE_BINS = 10


def binned_ece(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over ``bins`` equal-width probability bins (as ``federation.metrics.ece``)."""
    if not len(p):
        return float("nan")
    b = np.minimum((np.asarray(p) * bins).astype(int), bins - 1)
    n = np.bincount(b, minlength=bins)
    gap = np.abs(np.bincount(b, weights=p, minlength=bins) - np.bincount(b, weights=y, minlength=bins))
    return float(gap.sum() / len(p)) if n.sum() else float("nan")


def _calibrate(choice: HeadChoice, z: np.ndarray, y: np.ndarray) -> None:
    """Platt scaling of the chosen candidate on its out-of-fold logits ``z`` at this partner (its own customers,
    its own base rate); kept only if it lowers the ECE. Non-private like the rest of the personalised model."""
    from federation.calibration import fit_platt

    y = np.asarray(y, dtype=np.float64)
    before = binned_ece(_sigmoid(z), y)
    choice.ece_uncalibrated = choice.ece = before
    try:
        fit = fit_platt(z, y, 1.0 - y)
    except ValueError:  # did not converge: keep the probabilities as they are
        return
    after = binned_ece(_sigmoid(fit.apply_logit(z)), y)
    if np.isfinite(fit.a) and np.isfinite(fit.b) and after < before:
        choice.platt_a, choice.platt_b, choice.ece = float(fit.a), float(fit.b), after


def personalise(global_model: nn.Module, X: torch.Tensor, Y: torch.Tensor, *, heads: tuple[str, ...],
                seed: int, local: dict[str, LocalModel] | None = None,
                min_gain_se: float = MIN_GAIN_SE) -> PersonalisedModel:
    """Choose and fit this partner's personalised model on its training customers (X, Y) only.

    ``local``: the partner's local-only model per head (``fit_reference`` on the same (X, Y)); fitted here when
    not given. Candidates per head: convex blends ``alpha * logit_global + (1 - alpha) * logit_local`` for alpha
    in ``BLEND_ALPHAS`` (0 is the local-only model itself, 1 the global model) and the global model fine-tuned for
    ``FINE_TUNE_EPOCHS`` and the local model's kind refitted with the global logit as one more feature (stacking).
    Each is scored by its mean AUC over ``N_FOLDS`` out-of-fold validation folds of the
    training customers (the local model and the fine-tuning refitted without the fold; the global model is a DP
    release, used as is); the best wins and is refitted on all training customers (for a blend: the given
    local-only model). Local-only is a candidate, so validation never prefers a model worse than it. Then a
    Platt scaling fitted on the winner's out-of-fold logits calibrates its probabilities to this partner's own
    rates (kept only where it lowers the out-of-fold ECE; ranking unchanged)."""
    from threadpoolctl import threadpool_limits

    from federation.models import predict_proba

    Xn, Yn = X.numpy(), Y.numpy()
    n = len(X)
    folds = cv_folds(n, seed=seed)
    g_all = _logit(predict_proba(global_model, X).numpy())
    rest = [np.setdiff1d(np.arange(n), f) for f in folds]
    tuned_oof: dict[int, np.ndarray] = {}
    choices: dict[str, HeadChoice] = {}
    local = dict(local or {})
    for j, h in enumerate(heads):
        y = Yn[:, j]
        if min(y.sum(), (1 - y).sum()) < N_FOLDS * MIN_VAL_POSITIVES:
            choices[h] = HeadChoice("global")  # fold AUCs on so few would decide by chance
            continue
        if h not in local:
            local[h] = fit_reference(Xn, y, seed=seed)
        # out-of-fold logits of the local model (same kind and hyperparameters, refitted without the fold)
        l_oof, s_oof = np.empty(n), np.empty(n)
        Xs = np.c_[Xn, g_all[:, j]]  # stacking: the local model's kind with the global logit as one more feature
        with threadpool_limits(limits=1):
            for f, r in zip(folds, rest):
                l_oof[f] = _refit(local[h], Xn[r], y[r]).logit(Xn[f])
                s_oof[f] = _refit(local[h], Xs[r], y[r]).logit(Xs[f])
        if not tuned_oof:  # one fine-tuning per fold and epoch count serves every head
            for e in FINE_TUNE_EPOCHS:
                tuned_oof[e] = np.empty((n, len(heads)))
                for k, (f, r) in enumerate(zip(folds, rest)):
                    m = fine_tune(global_model, X[r], Y[r], epochs=e, seed=seed + k)
                    tuned_oof[e][f] = predict_proba(m, X[f]).numpy()

        def cv_auc(s: np.ndarray) -> np.ndarray:  # per-fold AUCs
            return np.array([_auc(y[f], s[f]) for f in folds])

        # (score, preference, choice, out-of-fold logits): among equal scores prefer local, then global, then the rest
        cands = []
        for a in BLEND_ALPHAS:
            kind = "local" if a == 0 else "global" if a == 1 else "blend"
            c = HeadChoice(kind, alpha=float(a), local_kind=local[h].kind)
            z = a * g_all[:, j] + (1 - a) * l_oof
            cands.append((cv_auc(z), {"local": 2, "global": 1}.get(kind, 0), c, z))
        cands += [(cv_auc(p[:, j]), 0, HeadChoice("fine_tune", epochs=e, local_kind=local[h].kind), _logit(p[:, j]))
                  for e, p in tuned_oof.items()]
        cands.append((cv_auc(s_oof), 0, HeadChoice("stack", local_kind=local[h].kind), s_oof))
        cands = [(float(np.nanmean(a)), pref, c, a, z) for a, pref, c, z in cands]
        score, _, best, fold_aucs, z_best = max(cands, key=lambda c: (c[0], c[1]))
        d = fold_aucs - cands[0][3]  # paired per-fold gain over local-only (alpha 0)
        d = d[d == d]
        if best.kind != "local" and min_gain_se > 0 and len(d) > 1 and d.mean() < min_gain_se * d.std(ddof=1) / np.sqrt(len(d)):
            score, _, best, _, z_best = cands[0]  # the gain is within the folds' noise: keep the local-only model
        best.validation_auc = score
        best.local_validation_auc = cands[0][0]
        _calibrate(best, z_best, y)
        choices[h] = best
    tuned, stacked = {}, {}
    for j, h in enumerate(heads):
        c = choices[h]
        if c.kind == "fine_tune":
            tuned[h] = fine_tune(global_model, X, Y, epochs=c.epochs, seed=seed)
        elif c.kind == "stack":
            with threadpool_limits(limits=1):
                stacked[h] = _refit(local[h], np.c_[Xn, g_all[:, j]], Yn[:, j])
    return PersonalisedModel(tuple(heads), global_model, choices,
                             {h: m for h, m in local.items() if choices[h].kind in ("local", "blend")}, tuned,
                             stacked)
