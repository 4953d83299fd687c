"""A partner's cumulative privacy state for one run (training AND evaluation), kept in ``context.state``.

Before its first round the partner calibrates, for the whole run and together:

* the evaluation releases: ``eval_planned`` discrete Gaussian releases (one per task head per evaluated
  round) with noise ``eval_sigma`` chosen so that they alone would cost ``eval_share`` x the target epsilon;
* the DP-SGD noise multiplier ``noise_multiplier`` for all rounds x steps, chosen so that the composition of
  every training step AND every planned evaluation release meets the target (epsilon, delta).

Epsilon is always computed by a registered accountant of ``federation.privacy.accountants`` over mechanism
records (Poisson-subsampled Gaussian for training, discrete Gaussian for evaluation), the same records the
ledger holds. A round or an evaluation that would push the cumulative epsilon (including the evaluation
releases still reserved for later) above the target is refused before any data is touched.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field, replace

from federation.errors import BudgetExceededError, PrivacyError

_TOL = 0.01  # epsilon tolerance of the calibrations (the result is always <= target)


def _events(history: tuple[tuple[float, float, int], ...], eval_sigma: float, eval_count: int) -> list:
    from federation.privacy.events import DiscreteGaussian, PoissonSampledGaussian

    ev: list = [PoissonSampledGaussian(sampling_rate=q, noise_multiplier=s, steps=k) for s, q, k in history if k > 0]
    if eval_count > 0:
        ev.append(DiscreteGaussian(noise_multiplier=eval_sigma, count=eval_count))
    return ev


def _merge_history(history: list[tuple[float, float, int]]) -> tuple[tuple[float, float, int], ...]:
    """Entries with the same (sigma, q) as one entry with their summed steps (same epsilon: RDP and PLD of
    ``k`` self-composed steps depend only on k), so the per-round cost does not grow with the round number."""
    steps: dict[tuple[float, float], int] = {}
    for s, q, k in history:
        steps[(float(s), float(q))] = steps.get((float(s), float(q)), 0) + int(k)
    return tuple((s, q, k) for (s, q), k in steps.items())


@functools.lru_cache(maxsize=4096)
def _epsilon(history: tuple[tuple[float, float, int], ...], eval_sigma: float, eval_count: int, delta: float,
             accountant: str) -> float:
    from federation.privacy.accountants import get_accountant

    events = _events(history, eval_sigma, eval_count)
    if not events:
        return 0.0
    # "a+b": the larger of several accountants (the node's run target AND its policy's enforcement accountants)
    return max(float(get_accountant(name).epsilon(events, delta=delta)) for name in accountant.split("+"))


def _rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Training-only epsilon under fedprop's RDP accountant (= Opacus RDPAccountant, default orders)."""
    return _epsilon(_merge_history(history), 1.0, 0, float(delta), "rdp")


def _smallest_sigma(eps_at, target: float, what: str) -> float:
    """Smallest sigma (bisection, as Opacus get_noise_multiplier) with eps_at(sigma) <= target, within _TOL."""
    lo, hi, eps_hi = 0.0, 10.0, math.inf
    while eps_hi > target:
        hi *= 2
        if hi > 1e6:
            raise PrivacyError(f"{what}: target epsilon {target:.4g} is unreachable with a noise multiplier <= 1e6")
        eps_hi = eps_at(hi)
    while target - eps_hi > _TOL:
        mid = (lo + hi) / 2
        e = eps_at(mid)
        if e <= target:
            hi, eps_hi = mid, e
        else:
            lo = mid
        if hi - lo < 1e-9 * hi:
            break
    return hi


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    eval_sigma: float = 1.0, eval_count: int = 0, accountant: str = "rdp") -> float:
    """Smallest DP-SGD sigma such that ``steps`` steps at ``sample_rate`` plus ``eval_count`` discrete Gaussian
    releases at ``eval_sigma`` spend at most ``target_epsilon`` (and within 0.01 of it) at ``delta``."""
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise PrivacyError(f"target epsilon must be a finite number > 0, got {target_epsilon}")
    if eval_count and _epsilon((), eval_sigma, eval_count, float(delta), accountant) >= target_epsilon:
        raise PrivacyError("the evaluation releases alone use the whole target epsilon; lower evaluation.epsilon_share")
    return _smallest_sigma(
        lambda s: _epsilon(((s, float(sample_rate), int(steps)),), eval_sigma, eval_count, float(delta), accountant),
        target_epsilon, "DP-SGD calibration")


def calibrate_evaluation(*, epsilon: float, delta: float, releases: int, accountant: str = "rdp") -> float:
    """Discrete Gaussian sigma such that ``releases`` releases (sensitivity 1 each) cost at most ``epsilon``."""
    return _smallest_sigma(lambda s: _epsilon((), s, releases, float(delta), accountant), epsilon,
                           "evaluation calibration")


@dataclass(frozen=True)
class PrivacyState:
    target_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    max_grad_norm: float
    history: list[tuple[float, float, int]] = field(default_factory=list)
    rounds_done: int = 0
    refused_rounds: int = 0
    accountant: str = "rdp"
    eval_sigma: float = 1.0  # discrete Gaussian noise of one evaluation release (one head); 1.0 unused if none
    eval_planned: int = 0  # evaluation releases reserved for this run (heads x evaluated rounds)
    eval_done: int = 0
    eval_share: float = 0.0

    @classmethod
    def plan(
        cls,
        *,
        target_epsilon: float,
        delta: float,
        sample_rate: float,
        steps_per_round: int,
        rounds: int,
        max_grad_norm: float,
        eval_releases: int = 0,
        eval_share: float = 0.0,
        accountant: str = "rdp",
    ) -> "PrivacyState":
        # Training first: alone it gets (1 - eval_share) x target. Then the evaluation gets the smallest discrete
        # Gaussian noise whose releases, composed with every training step, keep the whole run within target.
        eval_sigma = 1.0
        share = eval_share if eval_releases > 0 else 0.0
        if eval_releases > 0 and not 0 < eval_share < 1:
            raise PrivacyError(f"evaluation.epsilon_share={eval_share} must be in (0, 1) when evaluation is on")
        sigma = calibrate_noise(target_epsilon=(1 - share) * target_epsilon, delta=delta, sample_rate=sample_rate,
                                steps=steps_per_round * rounds, accountant=accountant)
        if eval_releases > 0:
            train = ((sigma, float(sample_rate), int(steps_per_round * rounds)),)
            eval_sigma = _smallest_sigma(
                lambda s: _epsilon(train, s, eval_releases, float(delta), accountant), target_epsilon,
                "evaluation calibration")
        return cls(target_epsilon, delta, sigma, sample_rate, steps_per_round, rounds, max_grad_norm,
                   accountant=accountant, eval_sigma=eval_sigma, eval_planned=eval_releases, eval_share=eval_share)

    def _eps(self, history: list[tuple[float, float, int]], eval_count: int) -> float:
        return _epsilon(_merge_history(history), self.eval_sigma, eval_count, float(self.delta), self.accountant)

    def epsilon(self) -> float:
        """Spent so far: training rounds done and evaluation releases made."""
        return self._eps(self.history, self.eval_done)

    def epsilon_with_evaluation(self) -> float:
        """Training so far plus every evaluation release of the run (made or still reserved): what a model
        evaluated after this round has cost, an upper bound if an evaluation is later refused."""
        return self._eps(self.history, max(self.eval_planned, self.eval_done))

    def training_epsilon(self) -> float:
        return self._eps(self.history, 0)

    def epsilon_after_next_round(self) -> float:
        """Training so far + the next round + every evaluation release of the run (made or still reserved)."""
        return self._eps(self._next_history(), max(self.eval_planned, self.eval_done))

    def _next_history(self) -> list[tuple[float, float, int]]:
        return list(self.history) + [(self.noise_multiplier, self.sample_rate, self.steps_per_round)]

    def _numbers(self) -> str:
        return (f"delta={self.delta:g}, accountant {self.accountant}, sigma={self.noise_multiplier:.4f}, "
                f"q={self.sample_rate:.5f}, steps={self.steps_per_round}, evaluation sigma={self.eval_sigma:.3f} "
                f"x {self.eval_planned} releases")

    def check_next_round(self) -> None:
        """Raise BudgetExceededError, with the numbers, if the next round would exceed the target."""
        nxt = self.epsilon_after_next_round()
        if nxt > self.target_epsilon + 1e-9:
            raise BudgetExceededError(
                f"privacy budget: round {self.rounds_done + 1} would raise epsilon (training + reserved evaluation) "
                f"to {nxt:.4f} > target {self.target_epsilon:.4f} ({self._numbers()}); refusing to train"
            )

    def check_next_evaluation(self, releases: int = 1) -> None:
        """Refuse evaluation releases beyond the ones planned (and hence calibrated) for this run."""
        if self.eval_done + releases > self.eval_planned:
            raise BudgetExceededError(
                f"privacy budget: evaluation releases {self.eval_done + 1}-{self.eval_done + releases} exceed the "
                f"{self.eval_planned} planned and "
                f"accounted for this run ({self._numbers()}); refusing to release"
            )

    def after_round(self) -> "PrivacyState":
        return replace(self, history=self._next_history(), rounds_done=self.rounds_done + 1)

    def after_evaluation(self, releases: int = 1) -> "PrivacyState":
        return replace(self, eval_done=self.eval_done + releases)

    def after_refusal(self) -> "PrivacyState":
        return replace(self, refused_rounds=self.refused_rounds + 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PrivacyState":
        d = json.loads(text)
        d["history"] = [tuple(h) for h in d["history"]]
        return cls(**d)
