"""Fast local DP-SGD for models built from ``nn.Linear`` layers ("ghost norm" clipping).

The privacy mechanism is exactly Opacus's (``PrivacyEngine.make_private`` with Poisson sampling and
``loss_reduction="mean"``), so the accounting does not change:

1. Poisson sampling: every row joins a step's batch independently with probability ``q``
   (empty batches are possible and still take a step on pure noise).
2. Per-sample clipping of the gradient over *all* parameters to ``C`` with Opacus's factor
   ``min(1, C / (||g_i|| + 1e-6))``.
3. Gaussian noise ``N(0, sigma^2 C^2)`` added to the *sum* of clipped gradients.
4. Division by the expected batch size ``int(N * q)`` (what ``make_private`` passes to ``DPOptimizer``).

What is faster is only *how* step 2 is computed. For a linear layer ``z = a W^T + b`` the per-sample
weight gradient is the outer product ``g_i^T a_i``, so its squared norm is ``||a_i||^2 ||g_i||^2`` and the
bias gradient is ``g_i``: per-sample gradients are never materialised, and the clipped sum is one
reweighted matrix product per layer, ``(c * G)^T A``. For ``nn.Sequential`` chains of Linear layers and
ReLU/Tanh/Sigmoid/Identity the forward and backward passes are run by hand without autograd; other
modules whose parametrised leaves are all ``nn.Linear`` use autograd with forward hooks. Anything else
is refused by :func:`supports_fast_path`, and the caller falls back to Opacus.

Poisson sampling is done on index tensors already on the device. Instead of one ``torch.rand(n) < q``
per step (O(n) random numbers per step: ~0.8 ms for n=200k on CPU, more than a whole training step at
batch 1,024), the default draws the *gaps* between selected positions, which are i.i.d. Geometric(q):
the same distribution (independent Bernoulli(q) per row and step) with O(q n) work. ``method="mask"``
keeps the literal ``torch.rand(n) < q`` form as a reference.

Per-sample-independence caveat (shared with Opacus): functional code in a custom ``forward`` that mixes
samples of a batch (e.g. subtracting a batch mean) breaks per-sample clipping and cannot be detected.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from clients.noise import ChaChaNoise, source_device, uniform
from federation.errors import FedpropError, PrivacyError

__all__ = [
    "FastDPSGD",
    "FastPathError",
    "TrainStats",
    "expected_batch_size",
    "poisson_batches",
    "supports_fast_path",
    "train_steps",
    "train_steps_nonprivate",
]

_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity)
_SECURE_RNG_WARNING = (
    "Secure RNG turned off. This is perfectly fine for experimentation as it allows "
    "for much faster training performance, but remember to turn it on and retrain "
    "one last time before production with ``secure_mode`` turned on."
)


class FastPathError(FedpropError):
    """The model or loss cannot be trained by the fast DP-SGD path; use Opacus instead."""


@dataclass(frozen=True)
class TrainStats:
    """What a call to :func:`train_steps` / :func:`train_steps_nonprivate` did."""

    steps: int  # optimizer steps taken, including steps on empty batches
    examples: int  # rows processed, summed over steps (the realised Poisson batch sizes)


# ----------------------------------------------------------------------------------------- validation


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _is_count(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and int(x) >= 0


def _validate(
    *,
    noise_multiplier: object = 0.0,
    max_grad_norm: object = 1.0,
    sample_rate: object = 1.0,
    steps: object = 0,
    n: object = 0,
) -> None:
    """Collect every invalid privacy-critical parameter, then raise once."""
    problems = []
    if not _is_real(noise_multiplier) or float(noise_multiplier) < 0:  # type: ignore[arg-type]
        problems.append(
            f"noise_multiplier={noise_multiplier!r}: must be a finite number >= 0 (sigma of the Gaussian "
            "mechanism; the accountant's epsilon is derived from it)"
        )
    if not _is_real(max_grad_norm) or float(max_grad_norm) <= 0:  # type: ignore[arg-type]
        problems.append(
            f"max_grad_norm={max_grad_norm!r}: must be a finite number > 0 (clipping bound C is the "
            "sensitivity the noise is calibrated to)"
        )
    if not _is_real(sample_rate) or not 0.0 < float(sample_rate) <= 1.0:  # type: ignore[arg-type]
        problems.append(
            f"sample_rate={sample_rate!r}: must satisfy 0 < q <= 1 (Poisson sampling rate used by the "
            "accountant)"
        )
    if not _is_count(steps):
        problems.append(f"steps={steps!r}: must be an integer >= 0 (number of composed mechanisms)")
    if not _is_count(n):
        problems.append(f"n={n!r}: must be an integer >= 0 (number of rows)")
    if problems:
        raise PrivacyError("invalid DP-SGD parameter(s):\n" + "\n".join(f"  - {p}" for p in problems))


def expected_batch_size(n: int, *, sample_rate: float) -> int:
    """``int(n * q)``, the divisor Opacus's ``make_private`` gives ``DPOptimizer``; must be >= 1."""
    _validate(sample_rate=sample_rate, n=n)
    ebs = int(n * sample_rate)
    if ebs < 1:
        raise PrivacyError(
            f"expected batch size int(n * q) = int({n} * {sample_rate}) = 0: the averaged update would "
            "divide by zero. Raise sample_rate so that n * q >= 1."
        )
    return ebs


# ------------------------------------------------------------------------------------ Poisson sampling


def poisson_batches(
    n: int,
    *,
    sample_rate: float,
    steps: int,
    generator: "torch.Generator | ChaChaNoise | None",
    device: torch.device | str | None = None,
    method: str = "geometric",
) -> Iterator[torch.Tensor]:
    """Yield ``steps`` sorted int64 index tensors on ``device``; row ``i`` is in each independently w.p. q.

    ``method="geometric"`` (default) draws the gaps between selected positions for a chunk of steps at
    once (one host sync per chunk); ``method="mask"`` is the literal ``(torch.rand(n) < q).nonzero()``.
    Both give independent Bernoulli(q) membership per row and step; batches may be empty.
    """
    _validate(sample_rate=sample_rate, steps=steps, n=n)
    if method not in ("geometric", "mask"):
        raise FedpropError(f"method={method!r}: must be 'geometric' or 'mask'")
    if device is None:
        device = source_device(generator)
    device = torch.device(device)
    q = float(sample_rate)
    if q == 1.0:
        everyone = torch.arange(n, device=device)
        for _ in range(steps):
            yield everyone
        return
    if method == "mask":
        for _ in range(steps):
            mask = uniform(generator, n, device=device, dtype=torch.float32) < q
            yield mask.nonzero().view(-1)
        return
    if n == 0:
        empty = torch.empty(0, dtype=torch.long, device=device)
        for _ in range(steps):
            yield empty
        return
    log1mq = math.log1p(-q)
    remaining = steps
    while remaining:
        # Concatenate k steps into one index space of size k*n: position s*n + i is row i at step s.
        k = max(1, min(remaining, 1024, int(2**18 / max(1.0, n * q))))
        total = k * n
        parts, last = [], -1
        while last < total - 1:
            mean = (total - 1 - last) * q
            m = int(mean + 8.0 * math.sqrt(mean) + 64)
            u = uniform(generator, m, device=device, dtype=torch.float64)
            # P(gap >= j) = P(log(1-U) <= j log(1-q)) = (1-q)^j: failures before the next success.
            gaps = torch.floor_divide(torch.log1p(-u), log1mq).long()
            pos = torch.cumsum(gaps + 1, 0) + last
            parts.append(pos)
            last = int(pos[-1])
        pos = torch.cat(parts) if len(parts) > 1 else parts[0]
        bounds = torch.arange(1, k + 1, device=device, dtype=torch.long) * n
        ends = torch.searchsorted(pos, bounds).tolist()  # positions < total are the selected ones
        pos = pos[: ends[-1]]
        steps_of = torch.div(pos, n, rounding_mode="floor")
        idx = pos - steps_of * n
        start = 0
        for end in ends:
            yield idx[start:end]
            start = end
        remaining -= k


# ----------------------------------------------------------------------------------- model inspection


def _fast_path_problems(model: nn.Module) -> list[str]:
    problems = []
    n_trainable_linear = 0
    for name, mod in model.named_modules():
        where = name or "<model>"
        own = list(mod.parameters(recurse=False))
        if type(mod) is nn.Linear:
            n_trainable_linear += any(p.requires_grad for p in own)
            continue
        if own:
            problems.append(f"{where}: {type(mod).__name__} holds parameters; only nn.Linear is supported")
        elif not list(mod.children()) and type(mod) not in _ACTIVATIONS:
            problems.append(
                f"{where}: {type(mod).__name__} is not a supported layer "
                "(nn.Linear, ReLU, Tanh, Sigmoid, Identity)"
            )
    if n_trainable_linear == 0:
        problems.append("model has no trainable nn.Linear layer")
    return problems


def supports_fast_path(model: nn.Module) -> bool:
    """True iff every parametrised leaf is ``nn.Linear`` and every other leaf is ReLU/Tanh/Sigmoid/Identity.

    Exact types only (subclasses may change ``forward``); no parameters outside Linear layers.
    """
    return not _fast_path_problems(model)


def _flatten_chain(model: nn.Module) -> list[nn.Module] | None:
    """Ops of a pure chain (nested ``nn.Sequential`` of supported layers), else None."""
    if type(model) is nn.Linear or type(model) in _ACTIVATIONS:
        return [model]
    if type(model) is not nn.Sequential:
        return None
    ops: list[nn.Module] = []
    for child in model:
        sub = _flatten_chain(child)
        if sub is None:
            return None
        ops.extend(sub)
    return ops


# ----------------------------------------------------------------------------------- loss gradients


def _loss_reduction(loss_fn: Callable) -> str:
    red = getattr(loss_fn, "reduction", None)
    if red not in ("sum", "mean"):
        raise FastPathError(
            f"loss_fn {loss_fn!r} has reduction={red!r}: the fast path needs a torch loss module with "
            "reduction 'sum' or 'mean' to recover per-sample gradients (as Opacus's loss_reduction)."
        )
    return red


def _closed_form_kind(loss_fn: Callable) -> str | None:
    if type(loss_fn) is nn.BCEWithLogitsLoss and loss_fn.weight is None and loss_fn.pos_weight is None:
        return "bce_logits"
    if type(loss_fn) is nn.MSELoss:
        return "mse"
    return None


def _output_grad(loss_fn: Callable, kind: str | None, reduction: str, z: torch.Tensor, y: torch.Tensor):
    """Per-sample gradient of each sample's loss w.r.t. the model output ``z`` (batch-first).

    With reduction 'mean' the autograd gradient is multiplied by the batch size, exactly as Opacus's
    GradSampleModule does for ``loss_reduction="mean"``.
    """
    if kind is not None and z.shape == y.shape:
        if kind == "bce_logits":
            g = torch.sigmoid(z).sub_(y)
        else:
            g = (z - y).mul_(2.0)
        if reduction == "mean":
            g.mul_(z.shape[0] / z.numel())
        return g
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(zz, y), zz)
    if reduction == "mean":
        g = g * z.shape[0]
    return g


_ACT_FWD = {nn.ReLU: torch.relu, nn.Tanh: torch.tanh, nn.Sigmoid: torch.sigmoid}
_ACT_BWD = {
    nn.ReLU: lambda g, out: torch.ops.aten.threshold_backward(g, out, 0),
    nn.Tanh: torch.ops.aten.tanh_backward,
    nn.Sigmoid: torch.ops.aten.sigmoid_backward,
}


# ------------------------------------------------------------------------------------- the optimizer


class FastDPSGD:
    """DP-SGD step for a fast-path model: ghost-norm clipping, Gaussian noise, scaling, optimizer step.

    Same mechanism as Opacus ``DPOptimizer(noise_multiplier, max_grad_norm, expected_batch_size,
    loss_reduction="mean")`` wrapped around ``optimizer``. ``generator`` draws the noise (pass a
    cryptographically secure one in production; ``secure_mode=True`` additionally uses Opacus's
    floating-point-attack-resistant noise sampling). Per-sample loss = the sample's share of ``loss_fn``
    (times the batch size when ``loss_fn.reduction == "mean"``, like Opacus).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss_fn: Callable,
        optimizer: torch.optim.Optimizer,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        generator: "torch.Generator | ChaChaNoise | None",
        secure_mode: bool = False,
    ) -> None:
        _validate(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm)
        if not _is_count(expected_batch_size) or expected_batch_size < 1:
            raise PrivacyError(f"expected_batch_size={expected_batch_size!r}: must be an integer >= 1")
        problems = _fast_path_problems(model)
        if problems:
            raise FastPathError(
                "model not supported by the fast DP-SGD path (use Opacus):\n"
                + "\n".join(f"  - {p}" for p in problems)
            )
        if isinstance(generator, ChaChaNoise):
            secure_mode = True
        elif secure_mode:
            if generator is None:
                raise PrivacyError("secure_mode=True needs an explicit cryptographically secure generator")
        else:
            warnings.warn(_SECURE_RNG_WARNING)
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = int(expected_batch_size)
        self.generator = generator
        self.secure_mode = bool(secure_mode)
        self._reduction = _loss_reduction(loss_fn)
        self._loss_kind = _closed_form_kind(loss_fn)

        self._linears: list[nn.Linear] = [m for m in model.modules() if type(m) is nn.Linear]
        # One flat gradient buffer; each trainable parameter's .grad is a view into it.
        self.params = [p for p in model.parameters() if p.requires_grad]
        opt_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [i for i, p in enumerate(self.params) if id(p) not in opt_params]
        if missing:
            raise FastPathError(f"optimizer does not hold trainable parameter(s) #{missing} of the model")
        ref = self.params[0]
        total = sum(p.numel() for p in self.params)
        self._flat = torch.zeros(total, dtype=ref.dtype, device=ref.device)
        self._noise = torch.empty_like(self._flat)
        self._views: dict[int, torch.Tensor] = {}
        off = 0
        for p in self.params:
            self._views[id(p)] = self._flat[off : off + p.numel()].view_as(p)
            off += p.numel()
        # Per Linear layer: (weight grad view or None, bias grad view or None).
        self._slots = []
        for lin in self._linears:
            w = self._views.get(id(lin.weight)) if lin.weight.requires_grad else None
            b = self._views.get(id(lin.bias)) if lin.bias is not None and lin.bias.requires_grad else None
            self._slots.append((w, b))

        self._chain = _flatten_chain(model)
        if self._chain is not None:
            self._first_linear = next(i for i, op in enumerate(self._chain) if type(op) is nn.Linear)
            self._chain_slots = [
                self._slots[self._linears.index(op)] if type(op) is nn.Linear else None for op in self._chain
            ]

    # ------------------------------------------------------------------ per-layer records (A, ||A||^2, G)

    @torch.no_grad()
    def _records_chain(self, x: torch.Tensor, y: torch.Tensor, x_sqnorm: torch.Tensor | None):
        ops = self._chain
        saved: list[torch.Tensor | None] = [None] * len(ops)  # Linear: its input; activation: its output
        cur = x
        for i, op in enumerate(ops):
            t = type(op)
            if t is nn.Linear:
                saved[i] = cur
                cur = F.linear(cur, op.weight, op.bias)
            elif t is nn.Identity:
                saved[i] = cur
            else:
                cur = _ACT_FWD[t](cur)
                saved[i] = cur
        g = _output_grad(self.loss_fn, self._loss_kind, self._reduction, cur, y)
        records = []
        first = self._first_linear
        for i in range(len(ops) - 1, first - 1, -1):
            op = ops[i]
            t = type(op)
            if t is nn.Linear:
                w_slot, b_slot = self._chain_slots[i]
                a = saved[i]
                asq = x_sqnorm if (i == 0 and x_sqnorm is not None) else None
                records.append((a, asq, g, w_slot, b_slot))
                if i > first:
                    g = g.mm(op.weight)
            elif t is not nn.Identity:
                g = _ACT_BWD[t](g, saved[i])
        return records

    def _records_hooks(self, x: torch.Tensor, y: torch.Tensor):
        captured: dict[int, list] = {}

        def hook(mod, inp, out):
            captured.setdefault(id(mod), []).append((inp[0].detach(), out, out._version))

        handles = [lin.register_forward_hook(hook) for lin in self._linears]
        try:
            with torch.enable_grad():
                out = self.model(x)
                loss = self.loss_fn(out, y)
        finally:
            for h in handles:
                h.remove()
        outs, layers = [], []
        for k, lin in enumerate(self._linears):
            calls = captured.get(id(lin), [])
            if len(calls) > 1:
                raise FastPathError(
                    f"nn.Linear #{k} ran {len(calls)} times in one forward (shared weights): ghost norms "
                    "would be wrong; use Opacus"
                )
            if calls:
                a, z, version = calls[0]
                if z._version != version:
                    raise FastPathError(
                        f"the output of nn.Linear #{k} was modified in place during forward (e.g. "
                        "ReLU(inplace=True) outside nn.Sequential); use inplace=False"
                    )
                outs.append(z)
                layers.append((a, self._slots[k]))
        grads = torch.autograd.grad(loss, outs, allow_unused=True)
        scale = x.shape[0] if self._reduction == "mean" else None
        records = []
        for (a, (w_slot, b_slot)), g in zip(layers, grads):
            if g is None:
                g = torch.zeros(a.shape[0], w_slot.shape[0] if w_slot is not None else b_slot.shape[0],
                                dtype=a.dtype, device=a.device)
            elif scale is not None:
                g = g * scale
            records.append((a, None, g, w_slot, b_slot))
        return records

    # -------------------------------------------------------------------------------- clipping core

    @torch.no_grad()
    def clipped_grad_sum(
        self, x: torch.Tensor, y: torch.Tensor, *, x_sqnorm: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Write sum_i clip(g_i) (no noise, no scaling) into the parameters' grads; return the flat buffer.

        ``x_sqnorm`` optionally gives the precomputed row norms ``||x_i||^2`` for the first layer.
        The returned tensor is the live buffer (overwritten by the next call).
        """
        flat = self._flat
        if x.shape[0] == 0:
            flat.zero_()
            return flat
        if self._chain is not None:
            records = self._records_chain(x, y, x_sqnorm)
        else:
            records = self._records_hooks(x, y)
        # Per-sample squared norm over all parameters: sum_l ||g_l||^2 (||a_l||^2 [W] + 1 [b]).
        # One fused reduction per (B x d) matrix; the rest are B-vector operations.
        sq = None
        for a, asq, g, w_slot, b_slot in records:
            if w_slot is None and b_slot is None:
                continue
            if g.shape[1] == 1:  # a row reduction costs ~10 ns/row even for one column
                gsq = g.reshape(-1).square()
            else:
                gsq = torch.linalg.vector_norm(g, dim=1).square_()
            if w_slot is None:
                sq = gsq if sq is None else sq.add_(gsq)
                continue
            if asq is None:
                asq = torch.linalg.vector_norm(a, dim=1).square_()
                if b_slot is not None:
                    asq.add_(1.0)
            elif b_slot is not None:
                asq = asq.add(1.0)  # never mutate the caller's x_sqnorm
            sq = gsq.mul_(asq) if sq is None else sq.addcmul_(gsq, asq)
        # Opacus: per_sample_clip_factor = (max_grad_norm / (per_sample_norms + 1e-6)).clamp(max=1.0)
        clip = torch.reciprocal_(sq.sqrt_().add_(1e-6)).mul_(self.max_grad_norm).clamp_(max=1.0)
        clip_col = clip.unsqueeze(1)
        for a, _, g, w_slot, b_slot in records:
            if w_slot is not None:  # sum_i c_i g_i^T a_i: scale the narrower of the two factors
                if a.shape[1] < g.shape[1]:
                    torch.mm(g.t(), a * clip_col, out=w_slot)
                else:
                    torch.mm((g * clip_col).t(), a, out=w_slot)
            if b_slot is not None:
                torch.mv(g.t(), clip, out=b_slot)
        return flat

    @torch.no_grad()
    def _add_noise_and_scale(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        flat, noise = self._flat, self._noise
        if std > 0:
            if isinstance(self.generator, ChaChaNoise):  # CSPRNG stream, four-Gaussian sum (clients/noise.py)
                flat.add_(self.generator.gaussian(flat.shape, std, dtype=flat.dtype, device=flat.device))
            elif self.secure_mode:  # Opacus's _generate_noise(secure_mode=True)
                torch.normal(0.0, std, size=(1, 1), generator=self.generator, device=flat.device,
                             dtype=flat.dtype)
                acc = torch.zeros_like(flat)
                for _ in range(4):
                    acc += torch.normal(0.0, std, size=flat.shape, generator=self.generator,
                                        device=flat.device, dtype=flat.dtype)
                flat.add_(acc.div_(2))
            else:
                torch.randn(flat.shape, generator=self.generator, out=noise)
                flat.add_(noise, alpha=std)
        flat.div_(self.expected_batch_size)

    def _bind_grads(self) -> None:
        for p in self.params:
            v = self._views[id(p)]
            if p.grad is not v:
                p.grad = v

    def step(self, x: torch.Tensor, y: torch.Tensor, *, x_sqnorm: torch.Tensor | None = None) -> None:
        """One DP-SGD step on batch ``(x, y)`` (may be empty): clip, sum, add noise, divide, step."""
        self.clipped_grad_sum(x, y, x_sqnorm=x_sqnorm)
        self._add_noise_and_scale()
        self._bind_grads()
        self.optimizer.step()


# ------------------------------------------------------------------------------------- training loops


def train_steps(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: Callable,
    optimizer: torch.optim.Optimizer,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    steps: int,
    generator: "torch.Generator | ChaChaNoise | None",
    secure_mode: bool = False,
    expected_batch: int | None = None,
) -> TrainStats:
    """``steps`` DP-SGD steps on Poisson batches of ``(X, y)``; same mechanism as Opacus (see module doc).

    Accounting: one "Poisson-sampled Gaussian (q=sample_rate, sigma=noise_multiplier)" composed
    ``steps`` times. ``generator`` drives both the sampling and the noise. ``expected_batch`` is the public
    divisor of the noisy sum (default ``int(n * q)``, which treats the row count as public).
    """
    _validate(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, sample_rate=sample_rate,
              steps=steps)
    n = X.shape[0]
    if y.shape[0] != n:
        raise FedpropError(f"X has {n} rows but y has {y.shape[0]}: features and labels must align")
    dp = FastDPSGD(
        model, loss_fn=loss_fn, optimizer=optimizer, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch if expected_batch is not None else expected_batch_size(n, sample_rate=sample_rate),
        generator=generator, secure_mode=secure_mode,
    )
    first = dp._chain[0] if dp._chain is not None else None
    x_sqnorm = torch.linalg.vector_norm(X, dim=1).square_() if type(first) is nn.Linear else None
    examples = 0
    for idx in poisson_batches(n, sample_rate=sample_rate, steps=steps, generator=generator,
                               device=X.device):
        examples += idx.shape[0]
        dp.step(X.index_select(0, idx), y.index_select(0, idx),
                x_sqnorm=None if x_sqnorm is None else x_sqnorm.index_select(0, idx))
    return TrainStats(steps=steps, examples=examples)


def train_steps_nonprivate(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: Callable,
    optimizer: torch.optim.Optimizer,
    sample_rate: float,
    steps: int,
    generator: "torch.Generator | ChaChaNoise | None",
) -> TrainStats:
    """Plain autograd training on the same Poisson index batches (the non-private reference).

    Empty batches take no step (there is nothing to learn from and no noise to add).
    """
    _validate(sample_rate=sample_rate, steps=steps)
    examples = 0
    for idx in poisson_batches(X.shape[0], sample_rate=sample_rate, steps=steps, generator=generator,
                               device=X.device):
        b = idx.shape[0]
        examples += b
        if b == 0:
            continue
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(X.index_select(0, idx)), y.index_select(0, idx)).backward()
        optimizer.step()
    return TrainStats(steps=steps, examples=examples)
