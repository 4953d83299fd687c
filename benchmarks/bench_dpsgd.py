"""DP-SGD throughput vs non-private training, same data, model and process.

    python benchmarks/bench_dpsgd.py                 # CPU, batch 1024 and 8192
    python benchmarks/bench_dpsgd.py --quick         # short run (fewer reps, shorter timing windows)
    python benchmarks/bench_dpsgd.py --device cuda   # GPU, adds batch 65536
    python benchmarks/bench_dpsgd.py --profile       # + torch.profiler table of the fast path
    python benchmarks/bench_dpsgd.py --threads 1 --clock cpu   # shared/loaded machine: CPU time, 1 thread

Rows/s = rows actually processed (realised Poisson batch sizes) / wall time, median of repetitions after
a warm-up; each repetition is one call of the training loop (like one federated round), methods
interleaved. Ratios are against non-private autograd training on the *same* Poisson index batches
(`train_steps_nonprivate`); "nonprivate shuffle" (fixed-size slices of a random permutation, the usual
non-private loop) is shown for reference. All DP methods use the same mechanism (q, sigma=1, C=1).
"fast" draws noise and sampling from torch's generator (``privacy.noise=fast``: seeded from the OS CSPRNG per
release); "fast secure" from a ChaCha20 stream with floating-point hardened Gaussians (``privacy.noise=secure``,
the default): the ratio between the two rows is the cost of secure noise.
On a shared or small machine, `--threads 1` avoids OpenMP threads stalling on each other when another
process takes a core (2-thread figures on a loaded 2-core box are dominated by that, not by the method).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.fastdp import expected_batch_size, poisson_batches, train_steps, train_steps_nonprivate  # noqa: E402

SIGMA, C, LR = 1.0, 1.0, 0.05


def make_model(name: str, d: int) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))
    return nn.Linear(d, 1)


# ------------------------------------------------------------------------- one "round" per method


def nonprivate(model, X, y, q, steps, g):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    return train_steps_nonprivate(model, X, y, loss_fn=nn.BCEWithLogitsLoss(), optimizer=opt, sample_rate=q,
                                  steps=steps, generator=g).examples


def nonprivate_shuffle(model, X, y, q, steps, g):
    n = X.shape[0]
    b = max(1, round(n * q))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = nn.BCEWithLogitsLoss()
    perm, pos, rows = torch.randperm(n, generator=g, device=X.device), 0, 0
    for _ in range(steps):
        if pos + b > n:
            perm, pos = torch.randperm(n, generator=g, device=X.device), 0
        idx = perm[pos : pos + b]
        pos += b
        opt.zero_grad(set_to_none=True)
        loss_fn(model(X.index_select(0, idx)), y.index_select(0, idx)).backward()
        opt.step()
        rows += b
    return rows


def fast(model, X, y, q, steps, g):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    return train_steps(model, X, y, loss_fn=nn.BCEWithLogitsLoss(), optimizer=opt, noise_multiplier=SIGMA,
                       max_grad_norm=C, sample_rate=q, steps=steps, generator=g).examples


def fast_secure(model, X, y, q, steps, g):
    """privacy.noise=secure (the default): sampling and noise from a fresh ChaCha20 stream keyed by os.urandom,
    four-Gaussian sum per coordinate (clients/noise.py). ``g`` is ignored: a new source per call, as per release."""
    from clients.noise import ChaChaNoise

    opt = torch.optim.SGD(model.parameters(), lr=LR)
    return train_steps(model, X, y, loss_fn=nn.BCEWithLogitsLoss(), optimizer=opt, noise_multiplier=SIGMA,
                       max_grad_norm=C, sample_rate=q, steps=steps, generator=ChaChaNoise()).examples


def opacus_hooks(model, X, y, q, steps, g):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    gsm = GradSampleModule(model)
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=LR), noise_multiplier=SIGMA, max_grad_norm=C,
                      expected_batch_size=expected_batch_size(X.shape[0], sample_rate=q), generator=g)
    loss_fn, rows = nn.BCEWithLogitsLoss(), 0
    for idx in poisson_batches(X.shape[0], sample_rate=q, steps=steps, generator=g, device=X.device):
        rows += idx.shape[0]
        opt.zero_grad()
        loss_fn(gsm(X.index_select(0, idx)), y.index_select(0, idx)).backward()
        opt.step()
    gsm._close()
    return rows


def opacus_ghost(model, X, y, q, steps, g):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=C, use_ghost_clipping=True)
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(gsm.parameters(), lr=LR), noise_multiplier=SIGMA, max_grad_norm=C,
        expected_batch_size=expected_batch_size(X.shape[0], sample_rate=q), generator=g)
    crit, rows = DPLossFastGradientClipping(gsm, opt, nn.BCEWithLogitsLoss()), 0
    for idx in poisson_batches(X.shape[0], sample_rate=q, steps=steps, generator=g, device=X.device):
        rows += idx.shape[0]
        opt.zero_grad()
        # Per-sample loss must be 1-D: with (B, 1) logits/targets Opacus broadcasts its (B,) clipping
        # coefficients against a (B, 1) loss into a (B, B) product, which is both O(B^2) and unclipped.
        crit(gsm(X.index_select(0, idx)).squeeze(1), y.index_select(0, idx).squeeze(1)).backward()
        opt.step()
    gsm._close()
    return rows


METHODS = {"nonprivate": nonprivate, "nonprivate shuffle": nonprivate_shuffle, "fast": fast, "fast secure": fast_secure,
           "opacus hooks": opacus_hooks, "opacus ghost": opacus_ghost}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK = time.perf_counter


def timed(fn, model, X, y, q, steps, g, device):
    sync(device)
    t0 = CLOCK()
    rows = fn(model, X, y, q, steps, g)
    sync(device)
    return rows, CLOCK() - t0


def bench(model_name, batch, X, y, device, *, reps, window, methods):
    n, d = X.shape
    q = batch / n
    runs = {}
    for name in methods:
        torch.manual_seed(0)
        model = make_model(model_name, d).to(device)
        g = torch.Generator(device=device).manual_seed(0)
        fn = METHODS[name]
        timed(fn, model, X, y, q, 5, g, device)  # warm-up (allocations, lazy init, hooks)
        rows, dt = timed(fn, model, X, y, q, 10, g, device)
        steps = max(5, min(20000, int(window / max(dt / 10, 1e-6))))
        runs[name] = (fn, model, g, steps, [])
    for _ in range(reps):  # interleave methods so drift hits all alike
        for name, (fn, model, g, steps, rates) in runs.items():
            rows, dt = timed(fn, model, X, y, q, steps, g, device)
            rates.append(rows / dt)
    ref = runs["nonprivate"][4] if "nonprivate" in runs else None
    # Ratios are paired: each repetition of a method against the reference's repetition run right
    # before it, then the median of those ratios, so load drift on a shared machine cancels.
    return {name: (statistics.median(r[4]), statistics.median(a / b for a, b in zip(r[4], ref)) if ref else None)
            for name, r in runs.items()}


def profile_fast(X, y, device, batch, steps):
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = make_model("mlp", X.shape[1]).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for label, fn in (("nonprivate", nonprivate), ("fast", fast)):
        fn(model, X, y, batch / X.shape[0], 20, g)
        with profile(activities=acts) as prof:
            fn(model, X, y, batch / X.shape[0], steps, g)
            sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\n=== torch.profiler: {label}, MLP, batch {batch}, {steps} steps ===")
        print(prof.key_averages().table(sort_by=key, row_limit=18))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--features", type=int, default=40)
    ap.add_argument("--batches", type=int, nargs="*", default=None)
    ap.add_argument("--models", nargs="*", default=["mlp", "logreg"], choices=["mlp", "logreg"])
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time (CPU only; with --threads 1 it is insensitive to other load)")
    ap.add_argument("--quick", action="store_true", help="5 reps of ~0.2 s per method instead of 11 of ~0.5 s")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table for the fast path")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.clock == "cpu":
        if device.type != "cpu":
            ap.error("--clock cpu measures CPU devices only")
        global CLOCK
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = args.batches or ([1024, 8192, 65536] if device.type == "cuda" else [1024, 8192])
    reps = args.reps or (5 if args.quick else 11)
    window = 0.2 if args.quick else 0.5
    g = torch.Generator().manual_seed(42)
    X = torch.randn(args.rows, args.features, generator=g)
    w = torch.randn(args.features, 1, generator=g)
    y = ((X @ w + 0.5 * torch.randn(args.rows, 1, generator=g)) > 0).float()
    X, y = X.to(device), y.to(device)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}; {dev_name}; data {args.rows} x {args.features}; sigma={SIGMA} C={C}; "
          f"reps={reps} (median), ~{window}s each; clock={args.clock}")
    print("rows/s: median of reps; ratio: median over reps of (rows/s / nonprivate rows/s in the same rep)")
    print(f"{'model':7} {'batch':>6}  {'method':19} {'rows/s':>12} {'vs nonprivate':>14}")
    for model_name in args.models:
        for batch in batches:
            res = bench(model_name, batch, X, y, device, reps=reps, window=window, methods=args.methods)
            for name, (rate, ratio) in res.items():
                shown = f"{ratio:13.2f}x" if ratio is not None else ""
                print(f"{model_name:7} {batch:>6}  {name:19} {rate:12,.0f} {shown:>14}", flush=True)
    if args.profile:
        profile_fast(X, y, device, batches[0], 300)


if __name__ == "__main__":
    main()
