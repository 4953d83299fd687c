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

The server's new global model is ``global + sum(w_i delta_i) / sum(w_i)``, released only if the unmasked sum
passes :func:`aggregate_step`'s range checks (summed weight in ``[n / weight_cap, n]``, every coordinate of the
step within the quantization range): a hostile partner can shift the step only inside what honest inputs
could produce, never wreck it. Clipping is the partners' own; the server checks the range of the result.

Threshold: t = max(2, ceil(threshold_fraction * h)) where h is the number of share holders per partner
(``secagg.degree + 1`` for SecAgg+, all sampled partners for the complete graph), so h/2 < t <= h; up to
h - t of each partner's holders may drop out. The quantization leaves room for ``2 n`` summands so that a
wrongly unmasked sum falls outside the range (and is rejected) with probability >= 1 - 2**-d.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from federation.config import FedpropConfig
from federation.errors import ConfigError
from federation.secagg.primitives import AggregateRejectedError, QuantizationSpec, SecAggError
from federation.secagg.protocol import holders_count, threshold_from_neighbourhood

__all__ = ["RANGE_SIGMAS", "SecureRoundPlan", "plan_round", "threshold_for", "partner_vector", "aggregate_step"]

RANGE_SIGMAS = 10.0  # quantization range head-room, in per-share noise standard deviations


def graph_degree(cfg: FedpropConfig, participants: int) -> int | None:
    """The SecAgg+ degree for ``participants`` partners, or None for the complete graph (SecAgg)."""
    return cfg.secagg.degree if 0 < cfg.secagg.degree < participants - 1 else None


def threshold_for(cfg: FedpropConfig, participants: int) -> int:
    """SecAgg threshold t for ``participants`` sampled partners, from the share holders per partner h
    (secagg.degree + 1, or n): max(2, ceil(threshold_fraction * h)), with h/2 < t <= h."""
    if participants < 2:
        raise ConfigError(f"secure aggregation needs at least 2 participating partners, got {participants}")
    holders = holders_count(participants=participants, degree=graph_degree(cfg, participants))
    try:
        return threshold_from_neighbourhood(holders=holders, fraction=cfg.secagg.threshold_fraction)
    except SecAggError as exc:
        raise ConfigError(str(exc)) from None


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
        clip=value_range(cfg, t), modulus_bits=cfg.secagg.modulus_bits, max_summands=2 * participants,
        rounding=cfg.secagg.rounding,  # type: ignore[arg-type]
    )
    return SecureRoundPlan(num_params, participants, t, spec, noise_std_per_share(cfg, t), graph_degree(cfg, participants))


def plan_problems(cfg: FedpropConfig, *, threshold: int, degree: int | None, vector_length: int,
                  quantization: QuantizationSpec, num_params: int, participants_seen: int) -> list[str]:
    """What a partner finds wrong with the server's round parameters, recomputed from its own run config
    (the server announces ``n`` through ``max_summands = 2 n``). Empty when they match exactly."""
    n, odd = divmod(quantization.max_summands, 2)
    if odd or not max(2, participants_seen) <= n <= cfg.partners:
        return [f"max_summands={quantization.max_summands} does not announce 2n for {participants_seen} <= n <= "
                f"{cfg.partners} partners"]
    plan = plan_round(cfg, num_params=num_params, participants=n)
    p = []
    if (threshold, degree) != (plan.threshold, plan.degree):
        p.append(f"threshold/degree {threshold}/{degree} differ from the run config's {plan.threshold}/{plan.degree} "
                 f"(secagg.threshold_fraction, secagg.degree) for {n} partners")
    if vector_length != plan.vector_length:
        p.append(f"vector_length {vector_length} does not fit the model's {num_params} parameters")
    if quantization != plan.quantization:
        p.append(f"quantization (clip {quantization.clip}, {quantization.modulus_bits} bits, {quantization.rounding}) "
                 f"differs from the run config's (clip {plan.quantization.clip}, {plan.quantization.modulus_bits} bits, "
                 f"{plan.quantization.rounding}; secagg.clip / central_dp)")
    return p


def partner_vector(
    cfg: FedpropConfig,
    *,
    delta: np.ndarray,
    num_examples: int,
    threshold: int,
    value_range_: float,
    rng,
) -> np.ndarray:
    """The partner's input to the secure sum (float64, length len(delta) + 1); see the module docstring.

    ``rng``: anything with numpy's ``normal(loc, scale, size)``; nodes pass ``clients.noise.ChaChaNoise`` (a
    ChaCha20 keystream keyed by the OS CSPRNG), tests may pass a seeded numpy Generator.

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
        w = max(1, min(int(num_examples), cfg.secagg.weight_cap)) / cfg.secagg.weight_cap
    return np.concatenate([w * d, [w * value_range_]])


def min_partner_weight(cfg: FedpropConfig) -> float:
    """The smallest weight an honest partner sends (1 with central DP: equal weights)."""
    return 1.0 if cfg.central_dp.enabled else 1.0 / cfg.secagg.weight_cap


def aggregate_step(total: np.ndarray, *, value_range_: float, survivors: int, min_weight: float,
                   error_bound: float) -> tuple[np.ndarray, float]:
    """From the secure sum of ``survivors`` partner vectors to the FedAvg step: (sum w_i delta_i / sum w_i,
    sum w_i), after checking what any honest inputs satisfy (else AggregateRejectedError, nothing released):
    the summed weight lies in [survivors * min_weight, survivors] and every coordinate |sum w_i delta_i| is at
    most the weight coordinate sum w_i R (each |w_i delta_i| <= w_i R), up to the quantization error bound."""
    t = np.asarray(total, dtype=np.float64)
    weight = float(t[-1]) / value_range_
    tol = error_bound / value_range_
    if not (survivors * min_weight - tol <= weight <= survivors + tol) or not weight > 0:
        raise AggregateRejectedError(
            f"the securely summed weight is outside [{survivors} * {min_weight:g}, {survivors}] for {survivors} "
            "partners: a partner sent an inconsistent vector. The round is rejected; no aggregate is released.")
    if t.size > 1 and not float(np.abs(t[:-1]).max()) <= float(t[-1]) + error_bound:
        raise AggregateRejectedError(
            "a coordinate of the securely summed update exceeds its weighted range (sum w_i * R): a partner sent an "
            "out-of-range vector. The round is rejected; no aggregate is released.")
    return np.clip(t[:-1] / weight, -value_range_, value_range_), weight
