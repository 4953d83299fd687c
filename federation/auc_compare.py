"""Paired comparison of two models' ROC AUCs on the SAME test customers (DeLong's test for correlated ROC curves).

DeLong, DeLong & Clarke-Pearson (1988), "Comparing the areas under two or more correlated receiver operating
characteristic curves: a nonparametric approach", Biometrics 44:837-845; computed with the midrank algorithm
of Sun & Xu (2014), "Fast implementation of DeLong's algorithm...", IEEE Signal Processing Letters 21:1389-1393
(O(n log n) per model instead of the O(m n) pair matrix).

For model ``r`` with scores ``X_i`` on the m positives and ``Y_j`` on the n negatives, and
``psi(x, y) = 1 if x > y, 1/2 if x == y, 0 otherwise`` (ties count 1/2, as :mod:`federation.metrics` does), the
structural components are ``V10_i = mean_j psi(X_i, Y_j)`` (one per positive) and ``V01_j = mean_i psi(X_i, Y_j)``
(one per negative); ``AUC = mean_i V10_i = mean_j V01_j``. With ``S10`` / ``S01`` the sample covariance matrices
(over positives / negatives, ddof 1) of the components of all models, ``Cov(AUC) = S10 / m + S01 / n`` and the
variance of ``AUC_a - AUC_b`` is ``c' Cov c`` with ``c = (1, -1)``. The interval is the normal one,
``diff +- z_{(1+level)/2} * se``. The correlation between the models (same customers) is what makes the paired
interval much narrower than one built from two independent AUC standard errors.

Sizes: the test needs at least 2 positives and 2 negatives (otherwise se is NaN and nothing is significant).
With a handful of positives the normal approximation is rough; the interval is still the honest order of
magnitude of the noise, which is what a summary needs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np


def midrank(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, equal values sharing the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.concatenate([[0], np.flatnonzero(xs[1:] != xs[:-1]) + 1]) if n else np.zeros(0, dtype=np.int64)
    ends = np.concatenate([starts[1:], [n]]) if n else starts
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def structural_components(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(auc[k], V10[k, m], V01[k, n])`` for ``scores`` of shape [N] or [k, N] (k models on the same customers)."""
    y = np.asarray(y_true).reshape(-1)
    s = np.asarray(scores, dtype=np.float64)
    s = s[None, :] if s.ndim == 1 else s
    if s.ndim != 2 or s.shape[1] != len(y):
        raise ValueError(f"scores must be [N] or [k, N] with N = {len(y)} labels, got shape {np.shape(scores)}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    pos = y > 0.5
    m, n = int(pos.sum()), int((~pos).sum())
    k = s.shape[0]
    if m == 0 or n == 0:
        return np.full(k, np.nan), np.zeros((k, m)), np.zeros((k, n))
    X, Y = s[:, pos], s[:, ~pos]
    v10, v01 = np.empty((k, m)), np.empty((k, n))
    for r in range(k):
        tz = midrank(np.concatenate([X[r], Y[r]]))
        v10[r] = (tz[:m] - midrank(X[r])) / n        # negatives below each positive (+ 1/2 per tie)
        v01[r] = 1.0 - (tz[m:] - midrank(Y[r])) / m  # positives above each negative (+ 1/2 per tie)
    return v10.mean(axis=1), v10, v01


def delong_covariance(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(auc[k], cov[k, k])``: the AUCs of k models scored on the same customers and DeLong's covariance."""
    auc, v10, v01 = structural_components(y_true, scores)
    k, m = v10.shape
    n = v01.shape[1]
    if m < 2 or n < 2:
        return auc, np.full((k, k), np.nan)
    cov = np.atleast_2d(np.cov(v10, ddof=1)) / m + np.atleast_2d(np.cov(v01, ddof=1)) / n
    return auc, cov


@dataclass(frozen=True)
class PairedAUC:
    """``diff = auc_a - auc_b`` on the same customers, its DeLong standard error and ``level`` interval."""

    auc_a: float
    auc_b: float
    diff: float
    se: float
    ci_low: float
    ci_high: float
    half_width: float
    z: float
    p_value: float
    level: float
    n_pos: int
    n_neg: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (two-sided test at 1 - level)."""
        return bool(self.ci_low > 0 or self.ci_high < 0)

    @property
    def direction(self) -> int:
        """+1 a significantly higher AUC of model a, -1 significantly lower, 0 not distinguishable."""
        return (1 if self.ci_low > 0 else -1) if self.significant else 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant, "direction": self.direction}


def paired_auc_difference(y_true: Any, scores_a: Any, scores_b: Any, *, level: float = 0.95) -> PairedAUC:
    """DeLong's paired comparison of model a against model b on the same customers (``y_true`` 0/1)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    a, b = np.asarray(scores_a, dtype=np.float64).reshape(-1), np.asarray(scores_b, dtype=np.float64).reshape(-1)
    if len(a) != len(b):
        raise ValueError(f"the two models must score the same customers: {len(a)} vs {len(b)} scores")
    y = np.asarray(y_true).reshape(-1)
    auc, cov = delong_covariance(y, np.stack([a, b]))
    diff = float(auc[0] - auc[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = math.sqrt(max(var, 0.0)) if not math.isnan(var) else float("nan")
    zq = NormalDist().inv_cdf(0.5 + level / 2)
    hw = zq * se
    nan = float("nan")
    if math.isnan(diff) or math.isnan(se):
        z = p = lo = hi = nan
    elif se == 0.0:  # identical component differences: the difference has no sampling variability
        z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        p = 1.0 if diff == 0 else 0.0
        lo = hi = diff
    else:
        z = diff / se
        p = math.erfc(abs(z) / math.sqrt(2))
        lo, hi = diff - hw, diff + hw
    n_pos = int((y > 0.5).sum())
    return PairedAUC(auc_a=float(auc[0]), auc_b=float(auc[1]), diff=diff, se=se, ci_low=lo, ci_high=hi,
                     half_width=hw, z=z, p_value=p, level=level, n_pos=n_pos, n_neg=len(y) - n_pos)
