"""Local training at a partner: DP-SGD (Opacus, or the fused fast path for all-Linear models) and
plain non-private training for baselines. Knows nothing of Flower.

Mechanism (both DP engines): each step samples every local customer independently with probability q
(Poisson sampling), clips each customer's gradient to L2 norm C, sums, adds N(0, sigma^2 C^2) noise and
divides by the expected batch size q*n. One round = ``steps`` such steps. Accounting: Opacus RDP over
(sigma, q, steps) tuples; see ``clients/privacy_state.py``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from clients.noise import ChaChaNoise, uniform
from federation.errors import PrivacyError

_SECURE_RNG_WARNING = (
    "DP-SGD noise is drawn from torch's default (non-cryptographic) PRNG. This is fine for simulations "
    "and experiments; for production releases the noise source should be a CSPRNG (Opacus secure_mode)."
)


@dataclass(frozen=True)
class DPSGDParams:
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    # The public divisor of the noisy gradient sum (int(n_public * q) = the batch size). None = int(len(X) * q),
    # which depends on the private count of training customers: only for callers that treat it as public.
    expected_batch_size: int | None = None

    def __post_init__(self) -> None:
        if not self.noise_multiplier >= 0:
            raise PrivacyError(f"noise_multiplier={self.noise_multiplier} must be >= 0")
        if not self.max_grad_norm > 0:
            raise PrivacyError(f"max_grad_norm={self.max_grad_norm} must be > 0")
        if not 0 < self.sample_rate <= 1:
            raise PrivacyError(f"sample_rate={self.sample_rate} must be in (0, 1]")
        if self.steps < 1:
            raise PrivacyError(f"steps={self.steps} must be >= 1")
        if self.expected_batch_size is not None and self.expected_batch_size < 1:
            raise PrivacyError(f"expected_batch_size={self.expected_batch_size} must be >= 1")

    def divisor(self, n: int) -> int:
        return self.expected_batch_size if self.expected_batch_size is not None else _expected_batch(n, self.sample_rate)


def sampling_plan(*, n_train: int, batch_size: int, local_epochs: float) -> tuple[float, int]:
    """(q, steps per round): q = expected batch / n, steps = ceil(epochs / q)."""
    if n_train < 1:
        raise PrivacyError("cannot train on zero customers")
    q = min(1.0, batch_size / n_train)
    return q, max(1, math.ceil(local_epochs / q))


def per_sample_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over task heads of binary cross-entropy, one value per customer."""
    return nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").sum(dim=1)


def mean_loss(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, *, chunk: int = 65536) -> float:
    """Mean ``per_sample_loss`` over all rows, in chunks: bounded memory for any number of customers (a single
    forward pass over 1M rows of the 64-32 MLP holds ~0.5 GB of activations)."""
    if len(X) == 0:
        return float("nan")
    with torch.no_grad():
        total = sum(float(per_sample_loss(model(X[i : i + chunk]), Y[i : i + chunk]).sum()) for i in range(0, len(X), chunk))
    return total / len(X)


def _expected_batch(n: int, sample_rate: float) -> int:
    """The public divisor of the noisy gradient sum: int(n*q), as Opacus's make_private and the fast path."""
    return max(1, int(n * sample_rate))


def _proximal_step(model: nn.Module, global_params: list[torch.Tensor] | None, *, lr: float, mu: float) -> None:
    """FedProx's proximal pull towards the global model, applied as data-independent post-processing
    after each DP step (it touches no customer data, so it costs no privacy)."""
    if not global_params or mu <= 0:
        return
    with torch.no_grad():
        for p, g in zip(model.parameters(), global_params):
            p.sub_(lr * mu * (p - g))


def _use_noise_source(opt, source: ChaChaNoise) -> None:
    """Replace DPOptimizer.add_noise (same computation: p.grad = summed clipped grad + N(0, (sigma C)^2)) with
    noise from the CSPRNG source; Opacus's own generator is a torch (Mersenne Twister) generator."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    def add_noise() -> None:
        std = opt.noise_multiplier * opt.max_grad_norm
        for p in opt.params:
            _check_processed_flag(p.summed_grad)
            noise = source.gaussian(p.summed_grad.shape, std, dtype=p.summed_grad.dtype, device=p.summed_grad.device)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    opt.add_noise = add_noise


def train_dp_opacus(
    model: nn.Module,
    X: torch.Tensor,
    Y: torch.Tensor,
    *,
    params: DPSGDParams,
    lr: float,
    momentum: float = 0.0,
    generator: "torch.Generator | ChaChaNoise",
    proximal_mu: float = 0.0,
) -> float:
    """One round of DP-SGD with Opacus's GradSampleModule + DPOptimizer, Poisson sampling on tensors.

    Returns the mean training loss over the non-empty steps. ``model`` is updated in place.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    secure = isinstance(generator, ChaChaNoise)
    if not secure:
        warnings.warn(_SECURE_RNG_WARNING, UserWarning, stacklevel=2)
    n = len(X)
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    gsm = GradSampleModule(model, loss_reduction="sum")
    opt = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=lr, momentum=momentum),
        noise_multiplier=params.noise_multiplier,
        max_grad_norm=params.max_grad_norm,
        expected_batch_size=params.divisor(n),
        loss_reduction="sum",
        generator=None if secure else generator,
    )
    if secure:  # Opacus clips and sums; the noise comes from the CSPRNG stream (clients/noise.py)
        _use_noise_source(opt, generator)
    # Opacus with reduction "sum" divides by expected batch size only for "mean"; do it explicitly.
    scale = 1.0 / params.divisor(n)
    losses = []
    gsm.train()
    for _ in range(params.steps):
        mask = uniform(generator, n, device=X.device, dtype=torch.float32) < params.sample_rate
        idx = mask.nonzero().squeeze(1)
        opt.zero_grad(set_to_none=True)
        if len(idx) == 0:
            for p in gsm.parameters():
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
        else:
            loss = per_sample_loss(gsm(X[idx]), Y[idx]).sum()
            loss.backward()
            losses.append(loss.detach().item() / len(idx))
        opt.pre_step()  # clip per sample, sum, add noise (sigma * C) -> p.grad
        with torch.no_grad():
            for p in gsm.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        opt.original_optimizer.step()
        _proximal_step(model, global_params, lr=lr, mu=proximal_mu)
    gsm._close()
    return sum(losses) / len(losses) if losses else float("nan")


def train_dp(
    model: nn.Module,
    X: torch.Tensor,
    Y: torch.Tensor,
    *,
    params: DPSGDParams,
    lr: float,
    momentum: float = 0.0,
    generator: "torch.Generator | ChaChaNoise",
    engine: str = "auto",
    proximal_mu: float = 0.0,
) -> float:
    """DP-SGD round with the chosen engine ("fast" needs an all-Linear model; "auto" picks it when it can)."""
    if engine in ("auto", "fast"):
        from clients import fastdp

        # FedProx's per-step proximal pull is only wired into the Opacus loop.
        if fastdp.supports_fast_path(model) and proximal_mu <= 0:
            return _train_dp_fast(model, X, Y, params=params, lr=lr, momentum=momentum, generator=generator)
        if engine == "fast":
            raise PrivacyError(
                "train.engine=fast needs a model of nn.Linear layers and activations and no FedProx term; use auto"
            )
    return train_dp_opacus(
        model, X, Y, params=params, lr=lr, momentum=momentum, generator=generator, proximal_mu=proximal_mu
    )


def _train_dp_fast(
    model: nn.Module, X: torch.Tensor, Y: torch.Tensor, *, params: DPSGDParams, lr: float, momentum: float,
    generator: "torch.Generator | ChaChaNoise",
) -> float:
    """Same mechanism as ``train_dp_opacus`` via the fused ghost-norm path (clients/fastdp.py)."""
    from clients import fastdp

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model.train()
    fastdp.train_steps(
        model, X, Y, loss_fn=nn.BCEWithLogitsLoss(reduction="sum"), optimizer=opt,
        noise_multiplier=params.noise_multiplier, max_grad_norm=params.max_grad_norm,
        sample_rate=params.sample_rate, steps=params.steps, generator=generator,
        expected_batch=params.divisor(len(X)),
    )
    return mean_loss(model, X, Y)  # training loss after the round, on the local data (never released raw)


def train_nonprivate(
    model: nn.Module,
    X: torch.Tensor,
    Y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 256,
    generator: torch.Generator,
) -> None:
    """Plain Adam mini-batch training (baselines: centralized and local-only)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(X)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            per_sample_loss(model(X[idx]), Y[idx]).mean().backward()
            opt.step()
