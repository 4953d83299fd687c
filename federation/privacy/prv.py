"""Privacy loss random variables (PRV; Gopi, Lee, Wutschitz 2021, "Numerical composition of differential
privacy"): a port of Opacus 1.6 ``opacus/accountants/prv.py`` and ``opacus/accountants/analysis/prv/``
(Apache License 2.0, Meta Platforms), which itself follows microsoft/prv_accountant.

Why a port: importing anything under ``opacus`` imports torch, and ``federation.privacy`` must be auditable
without torch. For Poisson-subsampled Gaussians (and the Gaussian, q = 1) the numbers are Opacus's own:
``tests/privacy/test_accountants.py`` compares them with ``opacus.accountants.PRVAccountant``.

This is an implementation independent of dp-accounting's PLD: another discretisation (Opacus: mean-preserving
on a grid sized from an RDP tail bound, error bound ``eps_error`` on epsilon, ``delta_error`` on delta) and
another composition code (FFT self-composition, pairwise convolution).

Extension beyond Opacus (which only knows the subsampled Gaussian): the discrete Gaussian and the Laplace
mechanism (sensitivity 1) have PRVs with atoms, for which Opacus's mean-preserving discretisation and its error
analysis do not apply. They are discretised PESSIMISTICALLY instead: every bit of probability mass is moved
UP to the next grid point (a privacy loss that is never smaller than the true one, so the resulting delta(eps)
dominates the true one), and mass above the grid's top is added to delta. Their rounding costs at most one
mesh step per composition and needs no error allowance. Nothing is assumed about the discrete Gaussian being
dominated by the continuous one.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import integrate
from scipy.fft import irfft, rfft
from scipy.signal import convolve
from scipy.special import erfc

from federation.errors import PrivacyError
from federation.privacy.events import DiscreteGaussian, Gaussian, Laplace, PoissonSampledGaussian

__all__ = ["PRV_EPS_ERROR", "prv_epsilon_bounds", "domain_for"]

#: Opacus PRVAccountant defaults: eps_error 0.01, delta_error = delta / 1000.
PRV_EPS_ERROR = 0.01
PRV_DELTA_ERROR_FRACTION = 1e-3
_SQRT2 = math.sqrt(2.0)
_MAX_ATOMS = 2_000_001
#: grid points beyond which the PRV is not computed (memory ~ 8 bytes x size x a few arrays)
MAX_DOMAIN_SIZE = 1 << 23


class PrvDomainTooLarge(PrivacyError):
    """The composition needs a finer or wider grid than MAX_DOMAIN_SIZE (very long or very lossy histories)."""


@dataclass(frozen=True)
class _Domain:
    t_min: float
    t_max: float
    size: int
    shifts: float = 0.0

    @classmethod
    def create_aligned(cls, t_min: float, t_max: float, dt: float) -> "_Domain":
        t_min = np.floor(t_min / dt) * dt
        t_max = np.ceil(t_max / dt) * dt
        size = int(np.round((t_max - t_min) / dt)) + 1
        if size % 2 == 1:
            size += 1
            t_max += dt
        domain = cls(float(t_min), float(t_max), size)
        if abs(domain.dt - dt) / dt >= 1e-8:
            raise PrivacyError("internal: PRV domain is not aligned to its mesh.")
        return domain

    def shift_right(self, dt: float) -> "_Domain":
        return _Domain(self.t_min + dt, self.t_max + dt, self.size, self.shifts + dt)

    @property
    def dt(self) -> float:
        return (self.t_max - self.t_min) / (self.size - 1)

    @property
    def ts(self) -> np.ndarray:
        return np.linspace(self.t_min, self.t_max, self.size)


class _SubsampledGaussianPRV:
    """Opacus ``PoissonSubsampledGaussianPRV`` (Gopi et al. Prop. B1, B4); q = 1 is the Gaussian mechanism."""

    def __init__(self, sample_rate: float, noise_multiplier: float) -> None:
        self.q, self.sigma = float(sample_rate), float(noise_multiplier)
        self.t_low = math.log(1 - self.q) if self.q < 1 else -math.inf

    def pdf(self, t):
        q, sigma = self.q, self.sigma
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            z = np.log((np.exp(t) + q - 1) / q)
            val = sigma * np.exp(-(sigma**2) * z**2 / 2 - 1 / (8 * sigma**2) + 2 * t) / (
                _SQRT2 * np.sqrt(np.pi) * (np.exp(t) + q - 1) * ((np.exp(t) + q - 1) / q) ** 0.5
            )
        return np.where(t > self.t_low, val, 0.0)

    def cdf(self, t):
        q, sigma = self.q, self.sigma
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            z = np.log(np.where(t > self.t_low, (np.exp(t) + q - 1) / q, 1))
        return np.where(
            t > self.t_low,
            -q * erfc((2 * z * sigma**2 - 1) / (2 * _SQRT2 * sigma)) / 2
            - (1 - q) * erfc((2 * z * sigma**2 + 1) / (2 * _SQRT2 * sigma)) / 2
            + 1.0,
            0.0,
        )


class _Truncated:
    """Opacus ``TruncatedPrivacyRandomVariable``: the PRV conditioned on [t_min, t_max)."""

    def __init__(self, prv: _SubsampledGaussianPRV, t_min: float, t_max: float) -> None:
        self._prv, self.t_min, self.t_max = prv, t_min, t_max
        self._remaining_mass = self._prv.cdf(t_max) - self._prv.cdf(t_min)

    def cdf(self, t):
        return np.where(
            t < self.t_min, 0.0,
            np.where(t < self.t_max, (self._prv.cdf(t) - self._prv.cdf(self.t_min)) / self._remaining_mass, 1.0),
        )

    def mean(self) -> float:
        lower_exponent = int(np.log10(np.abs(self.t_min)))
        upper_exponent = int(np.log10(self.t_max))
        points = np.concatenate([
            [self.t_min], -np.logspace(start=lower_exponent, stop=-5, num=10), [0],
            np.logspace(start=-5, stop=upper_exponent, num=10), [self.t_max],
        ])
        mean = 0.0
        for left, right in zip(points[:-1], points[1:]):
            integral, _ = integrate.quad(self.cdf, left, right, limit=500)
            mean += right * self.cdf(right) - left * self.cdf(left) - integral
        return float(mean)


def _discretize_mean_preserving(prv: _SubsampledGaussianPRV, domain: _Domain) -> tuple[np.ndarray, _Domain]:
    """Opacus ``discretize``: mass of each mesh cell at its centre, then shift to keep the mean."""
    tprv = _Truncated(prv, domain.t_min, domain.t_max)
    tc = domain.ts
    pmf = tprv.cdf(tc + domain.dt / 2) - tprv.cdf(tc - domain.dt / 2)
    mean_shift = tprv.mean() - float(np.dot(domain.ts, pmf))
    if abs(mean_shift) >= domain.dt / 2:
        raise PrivacyError("PRV: discrete mean differs significantly from the continuous mean.")
    return pmf, domain.shift_right(mean_shift)


def _round_up(values: np.ndarray, masses: np.ndarray, domain: _Domain) -> tuple[np.ndarray, float]:
    """Pessimistic: each atom's mass moves to the smallest grid point >= its loss; above the grid -> tail."""
    ts = domain.ts
    idx = np.searchsorted(ts, values - 1e-12 * domain.dt, side="left")
    top = idx >= len(ts)
    pmf = np.bincount(idx[~top], weights=masses[~top], minlength=len(ts)).astype(float)
    return pmf, float(masses[top].sum())


@functools.lru_cache(maxsize=256)
def _discrete_gaussian_atoms(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """PRV of N_Z(0, sigma^2) vs N_Z(1, sigma^2): loss (1 - 2x) / (2 sigma^2) with x ~ N_Z(0, sigma^2)."""
    k = int(math.ceil(12 * sigma + 12))
    if 2 * k + 1 > _MAX_ATOMS:
        raise PrivacyError(f"PRV: discrete Gaussian sigma={sigma:g} is too large to enumerate; use dp_pld.")
    x = np.arange(-k, k + 1, dtype=float)
    logp = -(x**2) / (2 * sigma**2)
    p = np.exp(logp - logp.max())
    p /= p.sum()
    return (1 - 2 * x) / (2 * sigma**2), p


def _laplace_pmf(b: float, domain: _Domain) -> tuple[np.ndarray, float]:
    """PRV of Lap(0, b) vs Lap(1, b), rounded up: F(t) = exp(-(1 - t b) / (2 b)) / 2 on [-1/b, 1/b), 1 at 1/b."""
    ts = domain.ts

    def cdf(t):
        t = np.asarray(t, dtype=float)
        inner = 0.5 * np.exp(-(1 - np.clip(t, -1 / b, 1 / b) * b) / (2 * b))
        return np.where(t < -1 / b, 0.0, np.where(t < 1 / b, inner, 1.0))

    upper = cdf(ts)
    pmf = np.diff(np.concatenate([[0.0], upper]))  # mass in (t_{i-1}, t_i] at t_i; all mass <= t_min at t_min
    return pmf, float(1.0 - upper[-1])


def domain_for(total_count: int, l_max: float, eps_error: float, delta_error: float) -> _Domain:
    """Opacus ``PRVAccountant._get_domain``: [-L, L] with L = max(L_max, eps_error) + 3 and its mesh."""
    L = max(l_max, eps_error) + 3
    mesh = eps_error / np.sqrt(total_count * np.log(12 / delta_error) / 2)
    return _Domain.create_aligned(-L, L, float(mesh))


def _compose_fourier(pmf: np.ndarray, domain: _Domain, n: int) -> tuple[np.ndarray, _Domain]:
    composed = irfft(rfft(pmf) ** n, n=len(pmf))
    m = n - 1
    if n % 2 == 0:
        m += len(composed) // 2
    return np.roll(composed, m), domain.shift_right(domain.shifts * (n - 1))


def _compose_two(a: tuple[np.ndarray, _Domain], b: tuple[np.ndarray, _Domain]) -> tuple[np.ndarray, _Domain]:
    return convolve(a[0], b[0], mode="same"), a[1].shift_right(b[1].shifts)


def prv_epsilon_bounds(
    events: list, delta: float, *, l_max: float, eps_error: float = PRV_EPS_ERROR, delta_error: float | None = None
) -> tuple[float, float, float]:
    """(lower, estimate, upper) epsilon of the composition of merged ``events`` at ``delta``.

    ``l_max``: an upper bound on the privacy loss beyond which the mass is negligible (Opacus: the RDP
    epsilon of the whole composition at delta_error / 4, and of each mechanism at delta_error / (8 N)).
    ``upper`` is the guarantee (Opacus returns it too); ``lower`` is a proven lower bound up to the same
    errors, used to check the other tight accountant."""
    delta_error = delta * PRV_DELTA_ERROR_FRACTION if delta_error is None else delta_error
    total = sum(e.count for e in events)
    domain = domain_for(total, l_max, eps_error, delta_error)
    if domain.size > MAX_DOMAIN_SIZE:
        raise PrvDomainTooLarge(
            f"PRV: {total} compositions with privacy loss up to {l_max:.3g} need {domain.size} grid points "
            f"(> {MAX_DOMAIN_SIZE}); not computed."
        )
    parts, tail = [], 0.0
    for e in events:
        if isinstance(e, PoissonSampledGaussian):
            pmf, dom = _discretize_mean_preserving(_SubsampledGaussianPRV(e.sampling_rate, e.noise_multiplier), domain)
        elif isinstance(e, Gaussian):
            pmf, dom = _discretize_mean_preserving(_SubsampledGaussianPRV(1.0, e.noise_multiplier), domain)
        elif isinstance(e, DiscreteGaussian):
            pmf, t = _round_up(*_discrete_gaussian_atoms(e.noise_multiplier), domain)
            dom, tail = domain, tail + e.count * t  # union bound over the count compositions
        elif isinstance(e, Laplace):
            pmf, t = _laplace_pmf(e.noise_multiplier, domain)
            dom, tail = domain, tail + e.count * t
        else:  # pragma: no cover - check() refuses other kinds first
            raise PrivacyError(f"PRV: unsupported event {e!r}.")
        parts.append(_compose_fourier(pmf, dom, e.count))
    while len(parts) > 1:
        nxt = [parts.pop()] if len(parts) % 2 == 1 else []
        nxt += [_compose_two(a, b) for a, b in zip(parts[:-1:2], parts[1::2])]
        parts = nxt
    pmf, dom = parts[0]
    if np.finfo(np.longdouble).eps * dom.size > delta - delta_error - tail:
        raise PrivacyError(f"PRV: delta={delta:g} is too small for this domain (floating-point errors dominate).")
    t = dom.ts
    d1 = np.flip(np.flip(pmf).cumsum())
    d2 = np.flip(np.flip(pmf * np.exp(-t)).cumsum())
    ndelta = np.exp(t) * d2 - d1

    def find_epsilon(target: float) -> float:
        i = int(np.searchsorted(ndelta, -target, side="left"))
        if i <= 0:
            raise PrivacyError(f"PRV: cannot compute epsilon at delta={target:g} on this domain.")
        return float(np.log((d1[i] - target) / d2[i]))

    upper = find_epsilon(delta - delta_error - tail) + eps_error
    lower = find_epsilon(delta + delta_error) - eps_error
    estimate = find_epsilon(delta)
    return max(0.0, lower), max(0.0, estimate), max(0.0, upper)
