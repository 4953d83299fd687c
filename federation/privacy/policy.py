"""A partner's privacy budget policy (YAML) and its enforcement before a run and before each round.

Example ``policy.yaml``::

    privacy_unit: customer          # the only unit a partner policy may govern
    max_epsilon: 1.0                # per period, composed over every release recorded in the ledger
    period: calendar-month          # calendar-month | calendar-year | all-time | <N> (days, rolling)
    delta: 1.0e-5
    min_noise_multiplier: 0.5
    max_rounds: 50                  # per run; null for no limit
    lifetime_max_epsilon: 10.0      # optional: cap over ALL recorded time, on top of the per-period cap
    allowed_accountants: [tight]    # optional, default [tight]
    record_only: false              # true: record every release, enforce NOTHING (printed in every report)

Enforcement is conservative: the spend that counts is the MAXIMUM over ``allowed_accountants``, each
composing the ledger's mechanisms in the period (and, for the lifetime cap, in all recorded time) with the
planned ones (epsilons are not added). ``tight`` is itself the larger of two independent tight accountants
(dp-accounting PLD, PRV), each taken as an upper bound.

``default_policy()`` is what a deployment node enforces when it has no policy file (``resolve_policy``).
"Record only" is never a default: it must be chosen with ``record_only: true``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping, Sequence

import yaml

from federation.errors import BudgetExceededError, ConfigError, PrivacyError
from federation.privacy.accountants import available_accountants, get_accountant, validate_delta

__all__ = [
    "Period",
    "BudgetPolicy",
    "BudgetCheck",
    "PolicyError",
    "PolicyViolationError",
    "load_policy",
    "policy_from_mapping",
    "default_policy",
    "resolve_policy",
    "DEFAULT_ACCOUNTANTS",
    "check_run",
    "check_round",
]

PRIVACY_UNITS = ("customer",)
#: Accountants a policy enforces when it names none: the larger of two independent tight accountants.
DEFAULT_ACCOUNTANTS = ("tight",)


class PolicyError(ConfigError, PrivacyError):
    """The policy file itself is invalid (names every offending YAML key)."""


class PolicyViolationError(PrivacyError):
    """A planned run or round breaks a non-budget rule of the policy (noise, rounds, accountant, unit)."""


def _utc(at: datetime | None) -> datetime:
    if at is None:
        return datetime.now(timezone.utc)
    if at.tzinfo is None:
        raise PrivacyError(f"timestamps must be timezone-aware (UTC), got naive {at.isoformat()}.")
    return at.astimezone(timezone.utc)


@dataclass(frozen=True)
class Period:
    """A budget period: ``calendar-month``, ``calendar-year``, ``all-time`` or a rolling window of N days."""

    kind: str  # "calendar-month" | "calendar-year" | "all-time" | "days"
    days: int | None = None

    @classmethod
    def parse(cls, value: Any) -> "Period":
        if isinstance(value, bool):
            raise PrivacyError(f"period must be calendar-month, calendar-year, all-time or a number of days, got {value!r}.")
        if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
            days = int(value)
            if days < 1:
                raise PrivacyError(f"period in days must be >= 1, got {value!r}.")
            return cls("days", days)
        if isinstance(value, str) and value.endswith("d") and value[:-1].isdigit():
            return cls.parse(int(value[:-1]))
        if value in ("calendar-month", "calendar-year", "all-time"):
            return cls(value)
        raise PrivacyError(
            f"period must be calendar-month, calendar-year, all-time or a number of days, got {value!r}."
        )

    def window(self, at: datetime | None = None) -> tuple[datetime | None, datetime | None]:
        """[start, end) of the period containing ``at`` (UTC); None means unbounded."""
        at = _utc(at)
        if self.kind == "all-time":
            return None, None
        if self.kind == "days":
            return at - timedelta(days=self.days or 0), None
        if self.kind == "calendar-year":
            return datetime(at.year, 1, 1, tzinfo=timezone.utc), datetime(at.year + 1, 1, 1, tzinfo=timezone.utc)
        start = datetime(at.year, at.month, 1, tzinfo=timezone.utc)
        end = datetime(at.year + (at.month == 12), at.month % 12 + 1, 1, tzinfo=timezone.utc)
        return start, end

    def contains(self, ts: datetime, *, at: datetime | None = None) -> bool:
        start, end = self.window(at)
        ts = _utc(ts)
        return (start is None or ts >= start) and (end is None or ts < end)

    def label(self) -> str:
        return f"rolling {self.days} days" if self.kind == "days" else self.kind

    def to_yaml_value(self) -> Any:
        return self.days if self.kind == "days" else self.kind


@dataclass(frozen=True, kw_only=True)
class BudgetPolicy:
    max_epsilon: float
    period: Period
    delta: float
    min_noise_multiplier: float
    max_rounds: int | None
    allowed_accountants: tuple[str, ...] = DEFAULT_ACCOUNTANTS
    privacy_unit: str = "customer"
    #: cap over all recorded time (None: none); enforced together with the per-period ``max_epsilon``
    lifetime_max_epsilon: float | None = None
    #: True: nothing is enforced, every release is still recorded; every report says so
    record_only: bool = False
    #: where the policy came from (a file path, "default policy", ...); shown in reports
    source: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "privacy_unit": self.privacy_unit,
            "max_epsilon": None if math.isinf(self.max_epsilon) else self.max_epsilon,
            "period": self.period.to_yaml_value(),
            "delta": self.delta,
            "min_noise_multiplier": self.min_noise_multiplier,
            "max_rounds": self.max_rounds,
            "allowed_accountants": list(self.allowed_accountants),
            "lifetime_max_epsilon": self.lifetime_max_epsilon,
            "record_only": self.record_only,
        }


_KEYS = (
    "privacy_unit", "max_epsilon", "period", "delta", "min_noise_multiplier", "max_rounds", "allowed_accountants",
    "lifetime_max_epsilon", "record_only",
)
_REQUIRED = ("max_epsilon", "period", "delta", "min_noise_multiplier")


def _number(value: Any) -> float | None:
    """YAML 1.1 reads ``1e-5`` as a string; accept numeric strings, refuse bools."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def policy_from_mapping(data: Any, *, source: str = "policy") -> BudgetPolicy:
    """Validate a mapping; collect every problem (each naming its key), then raise one PolicyError."""
    if not isinstance(data, Mapping):
        raise PolicyError(f"{source}: the policy must be a YAML mapping with keys {', '.join(_KEYS)}.")
    problems: list[str] = []
    for key in sorted(set(data) - set(_KEYS), key=str):
        problems.append(f"{key}: unknown key; allowed keys: {', '.join(_KEYS)}.")
    record_only = data.get("record_only", False)
    if not isinstance(record_only, bool):
        problems.append(f"record_only: must be true or false, got {record_only!r}.")
        record_only = False
    if record_only:  # nothing is enforced: the caps may be omitted, the delta defaults to 1e-5
        data = {
            "max_epsilon": math.inf, "period": "all-time", "delta": 1e-5, "min_noise_multiplier": 1e-12,
            **{k: v for k, v in data.items() if v is not None},
        }
    for key in _REQUIRED:
        if key not in data:
            problems.append(f"{key}: required key is missing.")

    unit = data.get("privacy_unit", "customer")
    if unit not in PRIVACY_UNITS:
        problems.append(f"privacy_unit: must be one of {list(PRIVACY_UNITS)}, got {unit!r}.")

    max_eps = _number(data.get("max_epsilon"))
    if "max_epsilon" in data and (max_eps is None or not 0 < max_eps < math.inf) and not (record_only and max_eps == math.inf):
        problems.append(f"max_epsilon: must be a finite number > 0, got {data.get('max_epsilon')!r}.")
    lifetime = data.get("lifetime_max_epsilon")
    if lifetime is not None:
        lifetime = _number(lifetime)
        if lifetime is None or not 0 < lifetime < math.inf:
            problems.append(
                f"lifetime_max_epsilon: must be a finite number > 0 or null, got {data.get('lifetime_max_epsilon')!r}."
            )
        elif max_eps is not None and math.isfinite(max_eps) and lifetime < max_eps:
            problems.append(f"lifetime_max_epsilon: {lifetime:g} is below the per-period max_epsilon {max_eps:g}.")

    period = None
    if "period" in data:
        try:
            period = Period.parse(data["period"])
        except PrivacyError as exc:
            problems.append(f"period: {exc}")

    delta = _number(data.get("delta"))
    if "delta" in data and (delta is None or not 0 < delta < 1):
        problems.append(f"delta: must be a number in (0, 1), got {data.get('delta')!r}.")

    min_sigma = _number(data.get("min_noise_multiplier"))
    if "min_noise_multiplier" in data and (min_sigma is None or not 0 < min_sigma < math.inf):
        problems.append(
            f"min_noise_multiplier: must be a finite number > 0, got {data.get('min_noise_multiplier')!r}."
        )

    max_rounds = data.get("max_rounds")
    if max_rounds is not None and (isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1):
        problems.append(f"max_rounds: must be an integer >= 1 or null, got {max_rounds!r}.")

    accountants = data.get("allowed_accountants", list(DEFAULT_ACCOUNTANTS))
    if "allowed_accountants" in data:
        if not isinstance(accountants, list) or not accountants or not all(isinstance(a, str) for a in accountants):
            problems.append(
                f"allowed_accountants: must be a non-empty list of names from {list(available_accountants())}, "
                f"got {accountants!r}."
            )
        else:
            unknown = [a for a in accountants if a not in available_accountants()]
            if unknown:
                problems.append(
                    f"allowed_accountants: unknown accountant(s) {unknown}; available: {list(available_accountants())}."
                )
    if problems:
        raise PolicyError(f"{len(problems)} problem(s) in {source}:\n" + "\n".join(f"  - {p}" for p in problems))
    return BudgetPolicy(
        max_epsilon=float(max_eps),  # type: ignore[arg-type]
        period=period,  # type: ignore[arg-type]
        delta=float(delta),  # type: ignore[arg-type]
        min_noise_multiplier=float(min_sigma),  # type: ignore[arg-type]
        max_rounds=max_rounds,
        allowed_accountants=tuple(dict.fromkeys(accountants)),  # type: ignore[arg-type]
        privacy_unit=unit,
        lifetime_max_epsilon=lifetime,
        record_only=record_only,
        source=source,
    )


def default_policy() -> BudgetPolicy:
    """What a partner node enforces when it configures no policy file.

    * ``max_epsilon`` 5 per calendar month: room for one default run (target epsilon 3) plus a second one
      or a few evaluation releases in the same month; two default runs (each calibrated to 3) compose to
      4.34-4.39 under the tight accountants (n_train 480..4800, measured), so they fit; a third (5.43-5.52)
      does not.
    * ``lifetime_max_epsilon`` 10 over all recorded time: monthly caps alone leave the spend unbounded
      (12 months x 5 = 60 a year). 10 is the upper end of what published DP deployments claim for a whole
      data release; a partner that needs more must say so in its own policy file.
    * ``delta`` 1e-5 (the run default), ``min_noise_multiplier`` 0.3 (the default runs use 0.6 to 1.5),
      enforced with the ``tight`` accountants.
    """
    return BudgetPolicy(
        max_epsilon=5.0, period=Period("calendar-month"), delta=1e-5, min_noise_multiplier=0.3, max_rounds=None,
        allowed_accountants=DEFAULT_ACCOUNTANTS, lifetime_max_epsilon=10.0, source="fedprop default policy",
    )


def resolve_policy(path: str | os.PathLike[str] | None) -> BudgetPolicy:
    """The policy file at ``path``, or ``default_policy()`` when none is given (never "no policy")."""
    if path is None or str(path) == "":
        return default_policy()
    return load_policy(path)


def load_policy(path: str | os.PathLike[str]) -> BudgetPolicy:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from exc
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy file: {exc}") from exc
    return policy_from_mapping(data, source=str(path))


@dataclass(frozen=True, kw_only=True)
class BudgetCheck:
    """The numbers behind an allowed run/round. Epsilons are the maximum over the allowed accountants."""

    spent_epsilon: float
    planned_epsilon: float
    total_epsilon: float
    max_epsilon: float
    delta: float
    accountant: str  # the accountant that gave the maximum total
    per_accountant_total: Mapping[str, float]
    #: all-time figures (None when the policy has no lifetime cap)
    lifetime_total_epsilon: float | None = None
    lifetime_max_epsilon: float | None = None
    record_only: bool = False

    @property
    def remaining_after(self) -> float:
        return self.max_epsilon - self.total_epsilon


def _spend(policy: BudgetPolicy, spent: Sequence[Any], planned: Sequence[Any]) -> BudgetCheck:
    per_spent, per_planned, per_total = {}, {}, {}
    for name in policy.allowed_accountants:
        acc = get_accountant(name)
        acc.check(list(spent) + list(planned))
        per_spent[name] = acc.epsilon(list(spent), delta=policy.delta)
        per_planned[name] = acc.epsilon(list(planned), delta=policy.delta)
        per_total[name] = acc.epsilon(list(spent) + list(planned), delta=policy.delta)
    worst = max(per_total, key=lambda n: per_total[n])
    return BudgetCheck(
        spent_epsilon=max(per_spent.values()),
        planned_epsilon=max(per_planned.values()),
        total_epsilon=per_total[worst],
        max_epsilon=policy.max_epsilon,
        delta=policy.delta,
        accountant=worst,
        per_accountant_total=per_total,
    )


def _rule_problems(policy: BudgetPolicy, planned: Sequence[Any], privacy_unit: str) -> list[str]:
    problems = []
    if privacy_unit != policy.privacy_unit:
        problems.append(f"privacy unit {privacy_unit!r} differs from the policy's {policy.privacy_unit!r}")
    for i, event in enumerate(planned):
        # min_noise_multiplier governs Gaussian mechanisms (DP-SGD rounds); a Laplace scale is another unit
        sigma = event.noise_multiplier if getattr(event, "kind", None) in ("poisson_sampled_gaussian", "gaussian") else None
        if sigma is not None and sigma < policy.min_noise_multiplier:
            problems.append(
                f"planned event #{i} ({event.describe()}) has noise_multiplier {sigma:g} < policy "
                f"min_noise_multiplier {policy.min_noise_multiplier:g}"
            )
    return problems


def _enforce(policy: BudgetPolicy, spent, planned, problems: list[str], what: str, lifetime=None) -> BudgetCheck:
    if not planned:
        raise PrivacyError(f"{what}: no planned events to check.")
    delta = validate_delta(policy.delta)
    if policy.record_only:  # explicitly chosen: nothing is enforced (the report says so)
        return BudgetCheck(
            spent_epsilon=0.0, planned_epsilon=0.0, total_epsilon=0.0, max_epsilon=math.inf, delta=delta,
            accountant="(record only)", per_accountant_total={}, record_only=True,
        )
    if policy.lifetime_max_epsilon is not None and lifetime is None:
        raise PrivacyError(
            f"{what}: the policy has a lifetime cap ({policy.lifetime_max_epsilon:g}) but no all-time spend was "
            "given (lifetime_events); refusing to check only the period."
        )
    check = _spend(policy, spent, planned)
    if policy.lifetime_max_epsilon is not None:
        life = _spend(policy, lifetime, planned)
        check = replace(
            check, lifetime_total_epsilon=life.total_epsilon, lifetime_max_epsilon=policy.lifetime_max_epsilon
        )
        if life.total_epsilon > policy.lifetime_max_epsilon:
            raise BudgetExceededError(
                f"{what} refused: it would bring the all-time spend to epsilon {life.total_epsilon:.4f} (already "
                f"spent {life.spent_epsilon:.4f}, composed by {life.accountant}) against the lifetime limit of "
                f"{policy.lifetime_max_epsilon:g} at delta={delta:g}; remaining lifetime budget "
                f"{max(0.0, policy.lifetime_max_epsilon - life.spent_epsilon):.4f}."
                + ("".join(f"\n  - also: {p}" for p in problems))
            )
    if check.total_epsilon > policy.max_epsilon:
        raise BudgetExceededError(
            f"{what} refused: it would spend epsilon {check.total_epsilon:.4f} in the {policy.period.label()} "
            f"period (already spent {check.spent_epsilon:.4f}, planned {check.planned_epsilon:.4f} on its own, "
            f"composed by {check.accountant}) against a limit of {policy.max_epsilon:g} at delta={delta:g}; "
            f"remaining budget {max(0.0, policy.max_epsilon - check.spent_epsilon):.4f}."
            + ("".join(f"\n  - also: {p}" for p in problems))
        )
    if problems:
        raise PolicyViolationError(f"{what} refused by policy:\n" + "\n".join(f"  - {p}" for p in problems))
    return check


def check_run(
    policy: BudgetPolicy,
    *,
    spent_events: Sequence[Any],
    planned_events: Sequence[Any],
    planned_rounds: int,
    privacy_unit: str = "customer",
    lifetime_events: Sequence[Any] | None = None,
) -> BudgetCheck:
    """Before touching data: refuse a run whose planned mechanisms, composed with those already recorded in
    the current period (``spent_events``), would exceed ``max_epsilon``, or which breaks another rule.
    ``lifetime_events`` (every release ever recorded) is required when the policy has a lifetime cap."""
    problems = _rule_problems(policy, planned_events, privacy_unit)
    if isinstance(planned_rounds, bool) or not isinstance(planned_rounds, int) or planned_rounds < 1:
        raise PrivacyError(f"planned_rounds must be an integer >= 1, got {planned_rounds!r}.")
    if policy.max_rounds is not None and planned_rounds > policy.max_rounds:
        problems.append(f"planned_rounds {planned_rounds} > policy max_rounds {policy.max_rounds}")
    return _enforce(policy, spent_events, planned_events, problems, "run", lifetime_events)


def check_round(
    policy: BudgetPolicy,
    *,
    spent_events: Sequence[Any],
    round_event: Any,
    round_number: int,
    privacy_unit: str = "customer",
    lifetime_events: Sequence[Any] | None = None,
) -> BudgetCheck:
    """Before releasing round ``round_number`` (1-based): refuse if it would exceed the remaining budget."""
    problems = _rule_problems(policy, [round_event], privacy_unit)
    if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 1:
        raise PrivacyError(f"round_number must be an integer >= 1, got {round_number!r}.")
    if policy.max_rounds is not None and round_number > policy.max_rounds:
        problems.append(f"round {round_number} > policy max_rounds {policy.max_rounds}")
    return _enforce(policy, spent_events, [round_event], problems, f"round {round_number}", lifetime_events)
