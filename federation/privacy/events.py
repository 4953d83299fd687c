"""Mechanism records: what actually ran, in the vocabulary of Google dp-accounting ``DpEvent``s.

The privacy ledger stores these records, never an epsilon: any accountant can recompute epsilon from
them later (PRINCIPLES.md 1). They load through the closed ``EVENT_KINDS`` table below; nothing named in
the data is ever imported (PRINCIPLES.md 2). Every record is frozen and validated keyword-only.

Sensitivity convention: every noise multiplier is relative to the L2 (Gaussian) or L1 (Laplace)
sensitivity of the released quantity, as in dp-accounting and Opacus.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, Mapping, Union

import dp_accounting

from federation.errors import PrivacyError

__all__ = [
    "PoissonSampledGaussian",
    "Gaussian",
    "Laplace",
    "DiscreteGaussian",
    "Event",
    "EVENT_KINDS",
    "event_from_dict",
]


def _check_real(cls_name: str, field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PrivacyError(
            f"{cls_name}.{field} must be a number, got {type(value).__name__} {value!r}."
        )
    value = float(value)
    if not math.isfinite(value):
        raise PrivacyError(f"{cls_name}.{field} must be finite, got {value!r}.")
    return value


def _check_count(cls_name: str, field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PrivacyError(
            f"{cls_name}.{field} must be an integer >= 1, got {type(value).__name__} {value!r}."
        )
    if value < 1:
        raise PrivacyError(f"{cls_name}.{field} must be an integer >= 1, got {value!r}.")
    return value


def _check_noise(cls_name: str, value: Any) -> float:
    value = _check_real(cls_name, "noise_multiplier", value)
    if value <= 0:
        raise PrivacyError(
            f"{cls_name}.noise_multiplier must be > 0, got {value!r}: a zero noise multiplier "
            "is a non-private release and cannot be recorded as a DP mechanism."
        )
    return value


class _EventBase:
    kind: ClassVar[str]
    _count_field: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, ``kind`` first; ``event_from_dict`` is its inverse."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):  # type: ignore[arg-type]
            out[f.name] = getattr(self, f.name)
        return out

    @property
    def count(self) -> int:
        """How many times the base mechanism is self-composed."""
        return getattr(self, self._count_field)

    def composition_key(self) -> tuple:
        """Records with equal keys differ only in their count and may be merged by summing counts."""
        return (self.kind,) + tuple(
            getattr(self, f.name) for f in fields(self) if f.name != self._count_field  # type: ignore[arg-type]
        )

    def with_count(self, count: int) -> "_EventBase":
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        kwargs[self._count_field] = count
        return type(self)(**kwargs)


@dataclass(frozen=True, kw_only=True)
class PoissonSampledGaussian(_EventBase):
    """One client round of DP-SGD: Gaussian noise on a Poisson-sampled batch, self-composed ``steps`` times.

    ``sampling_rate`` is q (each example is in each batch independently with probability q);
    ``noise_multiplier`` is sigma (noise std / clipping norm).
    """

    kind: ClassVar[str] = "poisson_sampled_gaussian"
    _count_field: ClassVar[str] = "steps"

    sampling_rate: float
    noise_multiplier: float
    steps: int

    def __post_init__(self) -> None:
        name = type(self).__name__
        q = _check_real(name, "sampling_rate", self.sampling_rate)
        if not 0 < q <= 1:
            raise PrivacyError(f"{name}.sampling_rate must be in (0, 1], got {q!r}.")
        object.__setattr__(self, "sampling_rate", q)
        object.__setattr__(self, "noise_multiplier", _check_noise(name, self.noise_multiplier))
        _check_count(name, "steps", self.steps)

    def to_dp_accounting(self) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                self.sampling_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)
            ),
            self.steps,
        )

    def describe(self) -> str:
        return (
            f"Poisson-sampled Gaussian (q={self.sampling_rate:g}, sigma={self.noise_multiplier:g}) "
            f"x {self.steps} steps"
        )


@dataclass(frozen=True, kw_only=True)
class _NoiseTimesCount(_EventBase):
    """A noise mechanism with one parameter, self-composed ``count`` times (Gaussian, Laplace)."""

    _count_field: ClassVar[str] = "count"

    noise_multiplier: float
    count: int = 1

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "noise_multiplier", _check_noise(name, self.noise_multiplier))
        _check_count(name, "count", self.count)


@dataclass(frozen=True, kw_only=True)
class Gaussian(_NoiseTimesCount):
    """A Gaussian mechanism without sampling amplification, self-composed ``count`` times.

    Used for the server's partner-level DP (noise on the clipped sum of partner updates, with no claim
    of amplification by partner sampling), and for any sampled release where amplification is not claimed.
    """

    kind: ClassVar[str] = "gaussian"


    def to_dp_accounting(self) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(self.noise_multiplier), self.count
        )

    def describe(self) -> str:
        return f"Gaussian (sigma={self.noise_multiplier:g}) x {self.count}"


@dataclass(frozen=True, kw_only=True)
class Laplace(_NoiseTimesCount):
    """A Laplace mechanism (noise scale / L1 sensitivity = ``noise_multiplier``), composed ``count`` times.

    E.g. a noisy count of customers released with an evaluation report.
    """

    kind: ClassVar[str] = "laplace"


    def to_dp_accounting(self) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.LaplaceDpEvent(self.noise_multiplier), self.count
        )

    def describe(self) -> str:
        return f"Laplace (b={self.noise_multiplier:g}) x {self.count}"


@dataclass(frozen=True, kw_only=True)
class DiscreteGaussian(_NoiseTimesCount):
    """The discrete Gaussian mechanism on integer counts of L2 (= L1) sensitivity 1, ``count`` times.

    Each release adds N_Z(0, sigma^2) (Canonne, Kamath, Steinke 2020) to integer counts of which one
    customer changes a single entry by 1 (an evaluation histogram of one task head: the customer's bin of its
    class). ``noise_multiplier`` is sigma. It satisfies (1/(2 sigma^2))-zCDP (CKS 2020, Theorem 4), so its RDP
    is at most that of the continuous Gaussian with the same sigma at every order: RDP accountants use the
    Gaussian curve (an upper bound); PLD accountants use dp-accounting's exact discrete Gaussian PLD.
    """

    kind: ClassVar[str] = "discrete_gaussian"

    def to_dp_accounting(self) -> dp_accounting.DpEvent:
        # RDP upper bound (zCDP); dp_accounting has no discrete Gaussian DpEvent. PLD accountants must not use
        # this: federation/privacy/accountants.py builds the exact discrete Gaussian PLD instead.
        return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(self.noise_multiplier), self.count)

    def describe(self) -> str:
        return f"discrete Gaussian (sigma={self.noise_multiplier:g}, integer counts) x {self.count}"


Event = Union[PoissonSampledGaussian, Gaussian, Laplace, DiscreteGaussian]

#: The closed table of mechanism kinds. Add kinds; never remove or redefine one (ledger compatibility).
EVENT_KINDS: Mapping[str, type] = {
    PoissonSampledGaussian.kind: PoissonSampledGaussian,
    Gaussian.kind: Gaussian,
    Laplace.kind: Laplace,
    DiscreteGaussian.kind: DiscreteGaussian,
}


def event_from_dict(data: Mapping[str, Any]) -> Event:
    """Load a record written by ``to_dict`` through the closed ``EVENT_KINDS`` table.

    Unknown kinds and unknown fields are refused: a mechanism that is not fully understood cannot be accounted.
    """
    if not isinstance(data, Mapping):
        raise PrivacyError(f"A mechanism record must be a mapping, got {type(data).__name__}.")
    kind = data.get("kind")
    cls = EVENT_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise PrivacyError(
            f"Unknown mechanism kind {kind!r}; known kinds: {', '.join(sorted(EVENT_KINDS))}."
        )
    allowed = {f.name for f in fields(cls)}
    extra = sorted(set(data) - allowed - {"kind"})
    if extra:
        raise PrivacyError(
            f"Mechanism record of kind {kind!r} has unknown field(s) {extra}; allowed: {sorted(allowed)}. "
            "A mechanism that is not fully understood cannot be accounted."
        )
    missing = sorted(f.name for f in fields(cls) if f.name not in data and f.default is MISSING)
    if missing:
        raise PrivacyError(f"Mechanism record of kind {kind!r} lacks field(s) {missing}.")
    return cls(**{k: v for k, v in data.items() if k != "kind"})
