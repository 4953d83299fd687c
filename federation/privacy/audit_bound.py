"""Empirical lower bound on epsilon from ONE training run (Steinke, Nasr and Jagielski 2023, "Privacy auditing
with one (1) training run", NeurIPS 2023, arXiv:2305.08846: its bound for (epsilon, delta)-DP, computed as
the algorithm of its Appendix D does).

The experiment: ``m`` canaries, each included in the training data independently with probability 1/2 (a fair
coin from the OS CSPRNG). After training, the auditor guesses "in" or "out" for ``r`` of them (abstaining on
the rest) and ``v`` guesses are correct. If the training algorithm is (epsilon, delta)-DP, then

    P[v correct or more] <= P[Binomial(r, e^eps / (1 + e^eps)) >= v] + 2 m delta * alpha,
    alpha = max_{1 <= i <= v} P[v - i <= Binomial(r, e^eps / (1 + e^eps)) < v] / i,

which is the p-value of the hypothesis "the algorithm is (epsilon, delta)-DP". The empirical lower bound at
confidence 1 - p is the largest epsilon that this p-value rejects (p-value < p): with probability >= 1 - p over
the coins and the training randomness, the algorithm is NOT (epsilon', delta)-DP for any epsilon' below it.
A correct implementation therefore yields a bound below its true epsilon with probability >= 1 - p; the bound is
also never above the value for "every guess correct", which grows only like log(r) (about 5.8 for r = 1,000 at
95%): one run cannot certify a large epsilon.

Pure Python (``math`` only): compliance can check this module alone. Binomial terms are computed in log space.
"""
from __future__ import annotations

import math
from typing import Sequence

from federation.errors import PrivacyError

_BISECTIONS = 60  # epsilon resolution of the search: about 1e-16 x the bracket


def _check(m: int, r: int, v: int, delta: float) -> None:
    for name, x in (("m", m), ("guesses", r), ("correct", v)):
        if not isinstance(x, int) or isinstance(x, bool):
            raise PrivacyError(f"audit bound: {name}={x!r} must be an integer")
    if not 0 <= v <= r <= m:
        raise PrivacyError(f"audit bound: need 0 <= correct ({v}) <= guesses ({r}) <= canaries m ({m})")
    if not 0 <= delta < 1:
        raise PrivacyError(f"audit bound: delta={delta} must be in [0, 1)")


def _log_pmfs(r: int, eps: float) -> list[float]:
    """log P[Binomial(r, q) = k] for k = 0..r, q = e^eps / (1 + e^eps), stable for large eps."""
    log_q = -math.log1p(math.exp(-eps))  # log q
    log_1q = -eps + log_q  # log(1 - q) = log q - eps
    lg = math.lgamma
    base = lg(r + 1)
    return [base - lg(k + 1) - lg(r - k + 1) + k * log_q + (r - k) * log_1q for k in range(r + 1)]


def _logsumexp(xs: Sequence[float]) -> float:
    if not xs:
        return -math.inf
    top = max(xs)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(x - top) for x in xs))


def p_value(*, m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Probability, under the hypothesis "(epsilon, delta)-DP", of ``correct`` or more correct guesses out of
    ``guesses`` with ``m`` canaries (Steinke, Nasr, Jagielski 2023). Clipped to 1."""
    _check(m, guesses, correct, delta)
    if not epsilon >= 0:
        raise PrivacyError(f"audit bound: epsilon={epsilon} must be >= 0")
    r, v = guesses, correct
    if v == 0:
        return 1.0
    pmf = _log_pmfs(r, float(epsilon))
    beta = math.exp(_logsumexp(pmf[v:]))  # P[B >= v]
    alpha, acc = 0.0, 0.0
    if delta > 0:
        for i in range(1, v + 1):  # acc = P[v - i <= B < v]
            acc += math.exp(pmf[v - i])
            alpha = max(alpha, acc / i)
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(*, m: int, guesses: int, correct: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that ``correct`` out of ``guesses`` rejects at ``confidence`` (0 if none): with
    probability >= ``confidence`` the audited algorithm is not (epsilon, delta)-DP for any smaller epsilon."""
    _check(m, guesses, correct, delta)
    if not 0 < confidence < 1:
        raise PrivacyError(f"audit bound: confidence={confidence} must be in (0, 1), e.g. 0.95")
    p = 1.0 - confidence

    def rejects(eps: float) -> bool:
        return p_value(m=m, guesses=guesses, correct=correct, epsilon=eps, delta=delta) < p

    if not rejects(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejects(hi):  # p-value -> 1 as eps -> inf (q -> 1), so this ends
        lo, hi = hi, 2 * hi
    for _ in range(_BISECTIONS):
        mid = (lo + hi) / 2
        if rejects(mid):
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return lo


def max_epsilon_lower_bound(*, m: int, guesses: int, delta: float, confidence: float = 0.95) -> float:
    """The most one run can show: every one of ``guesses`` correct."""
    return epsilon_lower_bound(m=m, guesses=guesses, correct=guesses, delta=delta, confidence=confidence)


def best_lower_bound(*, m: int, candidates: Sequence[tuple[int, int]], delta: float,
                     confidence: float = 0.95) -> tuple[float, int]:
    """(bound, index) of the best of several PRE-DECLARED guess sets ``(guesses, correct)`` made from the same
    run, each tested at significance (1 - confidence) / len(candidates) (Bonferroni), so that the best of
    them still holds at ``confidence``. Choosing the number of guesses after seeing the scores without such a
    correction would overstate the confidence."""
    if not candidates:
        raise PrivacyError("audit bound: no guess set to evaluate")
    if not 0 < confidence < 1:
        raise PrivacyError(f"audit bound: confidence={confidence} must be in (0, 1), e.g. 0.95")
    level = 1.0 - (1.0 - confidence) / len(candidates)
    bounds = [epsilon_lower_bound(m=m, guesses=r, correct=v, delta=delta, confidence=level) for r, v in candidates]
    best = max(range(len(bounds)), key=lambda i: bounds[i])
    return bounds[best], best
