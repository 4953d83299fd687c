"""A partner's cumulative DP-SGD accounting state for one run, kept in the node's ``context.state``.

Before its first round the partner calibrates one noise multiplier for all the steps it will take in
the whole run (rounds x steps per round) so that the final epsilon meets its target. After each round
the Opacus RDP accountant's history (sigma, q, steps) is extended and persisted, so the epsilon reported
after round r is the accountant's cumulative epsilon over rounds 1..r. A round that would push the
cumulative epsilon above the target is refused before any data is touched.
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field, replace

from federation.errors import BudgetExceededError, PrivacyError


def _rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    return _merged_rdp_epsilon(_merge_history(history), float(delta))


def _merge_history(history: list[tuple[float, float, int]]) -> tuple[tuple[float, float, int], ...]:
    """Entries with the same (sigma, q) as one entry with their summed steps. The RDP of ``steps`` Poisson-
    subsampled Gaussian steps is ``steps`` times that of one step (Opacus ``compute_rdp`` multiplies by
    ``steps``), so the epsilon is the same; Opacus itself recomputes every history entry, which made the
    per-round cost grow with the round number (O(rounds^2) over a run)."""
    steps: dict[tuple[float, float], int] = {}
    for s, q, k in history:
        steps[(float(s), float(q))] = steps.get((float(s), float(q)), 0) + int(k)
    return tuple((s, q, k) for (s, q), k in steps.items())


@functools.lru_cache(maxsize=1024)
def _merged_rdp_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Exactly Opacus ``RDPAccountant.get_epsilon`` (default orders): the RDP vector of each (sigma, q) is
    computed once per process and multiplied by its steps, as Opacus ``compute_rdp`` does (``rdp * steps``)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    if not history:
        return 0.0
    rdp = sum(_rdp_one_step(s, q) * k for s, q, k in history)
    eps, _ = analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=256)
def _rdp_one_step(noise_multiplier: float, sample_rate: float):
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    vec = analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    vec.setflags(write=False)  # shared by every caller of the cache
    return vec


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest sigma (to 0.01 epsilon tolerance) whose RDP epsilon after ``steps`` is <= target."""
    from opacus.accountants.utils import get_noise_multiplier

    if not target_epsilon > 0:
        raise PrivacyError(f"target epsilon must be > 0, got {target_epsilon}")
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
            epsilon_tolerance=0.01,
        )
    )


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
    ) -> "PrivacyState":
        sigma = calibrate_noise(
            target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps_per_round * rounds
        )
        return cls(target_epsilon, delta, sigma, sample_rate, steps_per_round, rounds, max_grad_norm)

    def epsilon(self) -> float:
        return _rdp_epsilon(self.history, self.delta)

    def epsilon_after_next_round(self) -> float:
        return _rdp_epsilon(self._next_history(), self.delta)

    def _next_history(self) -> list[tuple[float, float, int]]:
        return list(self.history) + [(self.noise_multiplier, self.sample_rate, self.steps_per_round)]

    def check_next_round(self) -> None:
        """Raise BudgetExceededError, with the numbers, if the next round would exceed the target."""
        nxt = self.epsilon_after_next_round()
        if nxt > self.target_epsilon + 1e-9:
            raise BudgetExceededError(
                f"privacy budget: round {self.rounds_done + 1} would raise epsilon from {self.epsilon():.4f} to "
                f"{nxt:.4f} > target {self.target_epsilon:.4f} (delta={self.delta:g}, RDP accountant, "
                f"sigma={self.noise_multiplier:.4f}, q={self.sample_rate:.5f}, steps={self.steps_per_round}); "
                "refusing to train"
            )

    def after_round(self) -> "PrivacyState":
        return replace(self, history=self._next_history(), rounds_done=self.rounds_done + 1)

    def after_refusal(self) -> "PrivacyState":
        return replace(self, refused_rounds=self.refused_rounds + 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PrivacyState":
        d = json.loads(text)
        d["history"] = [tuple(h) for h in d["history"]]
        return cls(**d)
