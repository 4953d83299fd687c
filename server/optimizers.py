"""Server-side optimisation of the aggregated update, and the model the federation releases. Knows nothing of
Flower: a strategy calls ``step`` once per round with the global model it sent and the (weighted-average)
aggregate it received, and releases ``released()``.

* FedAvgM (Hsu et al. 2019, "Measuring the effects of non-identical data distribution..."): the server treats
  ``aggregate - global`` as a pseudo-gradient and applies heavy-ball momentum ``beta`` with server lr ``eta``;
  ``beta = 0, eta = 1`` is plain FedAvg.
* Tail averaging of the server iterates (Polyak-Ruppert; for DP-SGD e.g. De et al. 2022, "Unlocking high-accuracy
  differentially private image classification through scale", which average the DP iterates): the released
  model is the mean of the global models of the last ``ceil(tail * rounds)`` rounds, which divides the DP noise
  of a converged convex model by roughly the square root of their number.

Privacy: both are post-processing of the partners' DP releases (the aggregated updates) with public
parameters, so they spend nothing and need no ledger entry. Adversary: the coordinator runs them; a coordinator
that releases something else is detected only by partners that recompute the release from the aggregates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

StateDict = dict[str, torch.Tensor]


@dataclass
class ServerOptimizer:
    rounds: int
    momentum: float = 0.0  # FedAvgM beta
    lr: float = 1.0  # FedAvgM eta
    tail: float = 0.0  # released model = mean of the last ceil(tail * rounds) global models (0: the last one)
    _velocity: StateDict | None = field(default=None, repr=False)
    _sum: StateDict | None = field(default=None, repr=False)
    _count: int = 0
    _round: int = 0
    _last: StateDict | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds={self.rounds} must be >= 1")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"server momentum={self.momentum} must be in [0, 1)")
        if not self.lr > 0:
            raise ValueError(f"server lr={self.lr} must be > 0")
        if not 0 <= self.tail <= 1:
            raise ValueError(f"tail={self.tail} must be in [0, 1] (share of the last rounds averaged)")

    @property
    def tail_rounds(self) -> int:
        return max(1, math.ceil(self.tail * self.rounds))

    def step(self, global_sd: StateDict, aggregate: StateDict) -> StateDict:
        """The next global model from the one sent (``global_sd``) and the partners' weighted mean (``aggregate``)."""
        self._round += 1
        if self.momentum == 0 and self.lr == 1:
            new = {k: aggregate[k].detach().clone() for k in global_sd}
        else:
            delta = {k: aggregate[k] - global_sd[k] for k in global_sd}
            if self._velocity is None:
                self._velocity = {k: torch.zeros_like(v) for k, v in delta.items()}
            for k in delta:
                self._velocity[k].mul_(self.momentum).add_(delta[k])
            new = {k: global_sd[k] + self.lr * self._velocity[k] for k in global_sd}
        self._last = new
        if self._round > self.rounds - self.tail_rounds:
            if self._sum is None:
                self._sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in new.items()}
            for k, v in new.items():
                self._sum[k].add_(v.double())
            self._count += 1
        return new

    def released(self) -> StateDict:
        """The model to release after the last round (the last global model when no tail was averaged yet)."""
        if self._last is None:
            raise ValueError("no round has been aggregated")
        if self._count == 0:
            return self._last
        return {k: (v / self._count).to(self._last[k].dtype) for k, v in self._sum.items()}
