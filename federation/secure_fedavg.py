"""Secure FedAvg arithmetic shared by partners and server: what a partner puts into the secure sum, and how
the server turns the sum into a FedAvg step. Pure numpy: no Flower, no torch (see docs/secure-aggregation.md).

Vector layout (length ``num_params + 1``), for partner i with update delta_i = local - global::

    x_i = [ w_i * delta_i , w_i * R ]

* Without partner-level DP: ``delta_i`` is clipped per coordinate to ``[-secagg.clip, secagg.clip]``,
  ``w_i = min(n_i, weight_cap) / weight_cap`` (FedAvg by number of examples, capped as in McMahan et al. 2018)
  and ``R = secagg.clip``. The server sees only ``sum w_i delta_i`` and ``sum w_i``: no single n_i.
* With partner-level DP (``central_dp``): ``delta_i`` is clipped to L2 norm C, ``w_i = 1`` (equal weights: the
  sensitivity of the sum to one partner is C) and Gaussian noise N(0, (sigma C)^2 / t) is added to every
  coordinate of the delta part, where t is the SecAgg threshold. The server can unmask only a sum of at least
  t partners, so the released sum carries noise of variance >= (sigma C)^2 whenever at least t of the summed
  partners are honest. ``R = C + 10 * noise_std`` keeps the noisy share inside the quantization range with
  probability > 1 - 2e-23 per coordinate.

The server's new global model is ``global + sum(w_i delta_i) / sum(w_i)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from federation.config import FedpropConfig
from federation.errors import ConfigError
from federation.secagg.primitives import QuantizationSpec

__all__ = ["RANGE_SIGMAS", "SecureRoundPlan", "plan_round", "threshold_for", "partner_vector", "aggregate_step"]

RANGE_SIGMAS = 10.0  # quantization range head-room, in per-share noise standard deviations


def threshold_for(cfg: FedpropConfig, participants: int) -> int:
    """SecAgg threshold t for ``participants`` sampled partners: max(2, ceil(threshold_fraction * n))."""
    if participants < 2:
        raise ConfigError(f"secure aggregation needs at least 2 participating partners, got {participants}")
    return min(participants, max(2, math.ceil(cfg.secagg.threshold_fraction * participants - 1e-9)))


def noise_std_per_share(cfg: FedpropConfig, threshold: int) -> float:
    """Per-partner, per-coordinate Gaussian noise std: sigma * C / sqrt(t) (0 without central DP)."""
    if not cfg.central_dp.enabled:
        return 0.0
    return cfg.central_dp.noise_multiplier * cfg.central_dp.clipping_norm / math.sqrt(threshold)


def value_range(cfg: FedpropConfig, threshold: int) -> float:
    """R: every coordinate of a partner's vector lies in [-R, R] (with DP: except with probability ~1e-23)."""
    if cfg.central_dp.enabled:
        return cfg.central_dp.clipping_norm + RANGE_SIGMAS * noise_std_per_share(cfg, threshold)
    return cfg.secagg.clip


@dataclass(frozen=True)
class SecureRoundPlan:
    """Public parameters of one secure FedAvg round; both sides derive them from the run config."""

    num_params: int
    participants: int
    threshold: int
    quantization: QuantizationSpec
    noise_std: float
    degree: int | None  # None: complete graph (SecAgg); else SecAgg+ neighbours

    @property
    def vector_length(self) -> int:
        return self.num_params + 1


def plan_round(cfg: FedpropConfig, *, num_params: int, participants: int) -> SecureRoundPlan:
    t = threshold_for(cfg, participants)
    spec = QuantizationSpec(
        clip=value_range(cfg, t), modulus_bits=cfg.secagg.modulus_bits, max_summands=participants,
        rounding=cfg.secagg.rounding,  # type: ignore[arg-type]
    )
    degree = cfg.secagg.degree if 0 < cfg.secagg.degree < participants - 1 else None
    return SecureRoundPlan(num_params, participants, t, spec, noise_std_per_share(cfg, t), degree)


def partner_vector(
    cfg: FedpropConfig,
    *,
    delta: np.ndarray,
    num_examples: int,
    threshold: int,
    value_range_: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """The partner's input to the secure sum (float64, length len(delta) + 1); see the module docstring.

    ``threshold`` and ``value_range_`` are the round's SecAgg parameters as the protocol enforces them.
    """
    d = np.asarray(delta, dtype=np.float64).ravel()
    if not np.all(np.isfinite(d)):
        raise ValueError("the update delta contains NaN or infinite values; refusing to send it")
    if cfg.central_dp.enabled:
        c = cfg.central_dp.clipping_norm
        norm = float(np.linalg.norm(d))
        d = d * min(1.0, c / norm) if norm > 0 else d
        d = d + rng.normal(0.0, noise_std_per_share(cfg, threshold), size=d.shape)
        w = 1.0
    else:
        d = np.clip(d, -cfg.secagg.clip, cfg.secagg.clip)
        w = min(int(num_examples), cfg.secagg.weight_cap) / cfg.secagg.weight_cap
    return np.concatenate([w * d, [w * value_range_]])


def aggregate_step(total: np.ndarray, *, value_range_: float) -> tuple[np.ndarray, float]:
    """From the secure sum to the FedAvg step: (sum w_i delta_i / sum w_i, sum w_i)."""
    weight = float(total[-1]) / value_range_
    if not weight > 0:
        raise ValueError(f"the securely summed weight is {weight}; no partner contributed")
    return np.asarray(total[:-1], dtype=np.float64) / weight, weight
