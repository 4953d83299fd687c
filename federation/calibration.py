"""Federated post-hoc Platt scaling of a released model from its DP evaluation release.

The server already holds, per task head, the partners' summed noisy per-class counts in public logit-spaced
bins (``federation.metrics.combine_releases``). Platt scaling fits ``p = sigmoid(a * z + b)`` to them, where
``z`` is each bin's public representative logit, by weighted logistic regression (Newton's method on two
parameters, with a weak Gaussian prior towards ``a = 1, b = 0`` so that an almost empty release changes the
model little). Applied to the model's last linear layer (``W_j <- a W_j``, ``b_j <- a b_j + b``) it changes
probabilities, never the ranking: AUC and lift are unchanged.

Privacy: a function of an already-accounted DP release and public edges only (post-processing), so it spends
no budget and needs no ledger entry. Adversary: the coordinator computes it; a partner can check it by
recomputing it from the summed release. Limits: the bins are coarse (about 0.63 logit wide with 20 bins) and
scores are represented by each bin's midpoint; the fit is on the evaluation customers themselves (in-sample
for two parameters).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from federation.metrics import NoisyCounts, _representatives, project_counts

PRIOR_STRENGTH = 1.0  # Gaussian prior precision on (a - 1, b): worth about one customer of data


@dataclass(frozen=True)
class PlattScaling:
    a: float
    b: float
    n: int  # customers (projected noisy counts) the fit used
    applied: bool = True  # False: the release was too noisy to fit; (a, b) = (1, 0)
    spread: float = 0.0  # bootstrap std of the fitted parameters (the larger of a, b) under the release's noise
    kind: str = "platt"  # platt (a, b) | shift (b only, a = 1) | none

    def apply_logit(self, z: np.ndarray) -> np.ndarray:
        return self.a * np.asarray(z) + self.b

    def as_dict(self) -> dict[str, float | bool | str]:
        return {"a": self.a, "b": self.b, "n": self.n, "applied": self.applied, "spread": self.spread, "kind": self.kind}


def fit_platt(z: np.ndarray, pos: np.ndarray, neg: np.ndarray, *, prior: float = PRIOR_STRENGTH) -> PlattScaling:
    """Weighted Platt scaling: minimise sum_b pos_b*softplus(-(a z_b + b)) + neg_b*softplus(a z_b + b)
    + prior/2 * ((a - 1)^2 + b^2)."""
    z, pos, neg = (np.asarray(v, dtype=np.float64) for v in (z, pos, neg))
    if not (z.shape == pos.shape == neg.shape) or np.any(pos < 0) or np.any(neg < 0):
        raise ValueError("fit_platt: z, pos and neg must have one non-negative value per bin")
    w = pos + neg
    theta = np.array([1.0, 0.0])
    Z = np.stack([z, np.ones_like(z)], axis=1)
    def objective(t: np.ndarray) -> float:
        u = Z @ t
        return float(pos @ np.logaddexp(0.0, -u) + neg @ np.logaddexp(0.0, u) + prior / 2 * ((t[0] - 1) ** 2 + t[1] ** 2))

    f = objective(theta)
    for _ in range(200):  # damped Newton: halve the step until the objective decreases (plain Newton diverges)
        p = 1.0 / (1.0 + np.exp(-np.clip(Z @ theta, -30, 30)))
        grad = Z.T @ (w * p - pos) + prior * (theta - [1.0, 0.0])
        hess = (Z * (w * p * (1 - p))[:, None]).T @ Z + (prior + 1e-9) * np.eye(2)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-8 and objective(theta - t * step) > f:
            t /= 2
        theta, f_new = theta - t * step, objective(theta - t * step)
        if abs(f - f_new) <= 1e-12 * max(1.0, abs(f)) and float(np.abs(t * step).max()) < 1e-9:
            break
        f = f_new
    if not np.all(np.isfinite(theta)):
        raise ValueError("fit_platt: did not converge")
    return PlattScaling(float(theta[0]), float(theta[1]), int(round(float(w.sum()))))


MAX_SPREAD = 0.35  # largest bootstrap std of a or b at which a fitted two-parameter scaling is applied
MAX_SPREAD_SHIFT = 0.15  # the same for the intercept-only fallback (a = 1)
_BOOTSTRAP = 50


def platt_from_release(noisy: NoisyCounts, *, prior: float = PRIOR_STRENGTH) -> PlattScaling:
    """Platt scaling of one head from its summed DP evaluation release (projected counts, bin representatives).

    A parametric bootstrap (fresh Gaussian noise of the released std added to the released counts, as
    ``metrics.summarize_release``; post-processing) measures how much the release's noise moves the fit. If the
    two-parameter fit's std of a or b exceeds ``MAX_SPREAD``, only the intercept is fitted (a = 1: mean
    predicted probability matched to the observed rate, ``kind`` "shift"); if that too spreads by more than
    ``MAX_SPREAD_SHIFT``, nothing is applied (a=1, b=0, ``applied`` False). Without a guard, two-parameter fits to
    counts that were mostly noise (a few hundred test customers at epsilon 1) made ECE worse (0.034 -> 0.177 on
    iranian_churn, 0.092 -> 0.108 on online_retail; benchmarks/bench_utility.py)."""
    r = _representatives(np.asarray(noisy.edges))
    z = np.log(r / (1.0 - r))
    pos, neg = project_counts(noisy.pos), project_counts(noisy.neg)
    rng = np.random.default_rng()
    reps = []
    for _ in range(_BOOTSTRAP):
        dp = np.rint(rng.normal(0.0, noisy.sigma, size=len(z))).astype(np.int64)
        dn = np.rint(rng.normal(0.0, noisy.sigma, size=len(z))).astype(np.int64)
        reps.append((project_counts(noisy.pos + dp), project_counts(noisy.neg + dn)))
    fit = fit_platt(z, pos, neg, prior=prior)
    spread = float(np.max(np.std([(f.a, f.b) for f in (fit_platt(z, p, n, prior=prior) for p, n in reps)], axis=0)))
    if spread <= MAX_SPREAD:
        return PlattScaling(fit.a, fit.b, fit.n, applied=True, spread=spread, kind="platt")
    shift = fit_shift(z, pos, neg, prior=prior)
    spread = float(np.std([fit_shift(z, p, n, prior=prior) for p, n in reps]))
    if spread <= MAX_SPREAD_SHIFT:
        return PlattScaling(1.0, shift, fit.n, applied=True, spread=spread, kind="shift")
    return PlattScaling(1.0, 0.0, fit.n, applied=False, spread=spread, kind="none")


def fit_shift(z: np.ndarray, pos: np.ndarray, neg: np.ndarray, *, prior: float = PRIOR_STRENGTH) -> float:
    """The intercept b of ``sigmoid(z + b)`` (a = 1) by bisection on the score equation (monotone in b)."""
    z, pos, neg = (np.asarray(v, dtype=np.float64) for v in (z, pos, neg))
    w = pos + neg

    def score(b: float) -> float:  # d/db of the penalised negative log-likelihood
        return float(w @ (1.0 / (1.0 + np.exp(-np.clip(z + b, -30, 30)))) - pos.sum()) + prior * b

    lo, hi = -30.0, 30.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if score(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def calibrate_last_linear(model, head: int, scaling: PlattScaling) -> None:
    """Fold ``scaling`` into output ``head`` of the model's last ``nn.Linear`` (in place)."""
    import torch
    from torch import nn

    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError("calibrate_last_linear: the model has no nn.Linear layer")
    lin = last[-1]
    if not 0 <= head < lin.out_features:
        raise ValueError(f"calibrate_last_linear: head {head} not in [0, {lin.out_features})")
    if not (math.isfinite(scaling.a) and math.isfinite(scaling.b)):
        raise ValueError("calibrate_last_linear: non-finite scaling")
    with torch.no_grad():
        lin.weight[head].mul_(scaling.a)
        if lin.bias is not None:
            lin.bias[head].mul_(scaling.a).add_(scaling.b)
