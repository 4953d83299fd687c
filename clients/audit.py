"""``fedprop audit``: an empirical lower bound on a partner's DP-SGD epsilon from ONE run of fedprop's real
training code (``clients.training.train_dp``, both engines), following Steinke, Nasr and Jagielski 2023,
"Privacy auditing with one (1) training run" (the bound: ``federation/privacy/audit_bound.py``).

Experiment (one configuration = engine x noise on/off):

1. Background: one synthetic partner of the default run (partner 0 of ``fedprop simulate``), default model (MLP
   64-32, churn + propensity heads), default training (batch 128, 2 epochs per round, 10 rounds, lr 2, C 1).
2. Canaries: ``m`` "Dirac" customers. The model gets ``m`` extra input columns, zero for every real customer;
   canary ``i`` is the record ``x = scale * e_i`` on its own column, with random labels. Its gradient is the only one
   that ever touches first-layer column ``i``, so that column is a clean channel for the canary. Each canary is
   included independently with probability 1/2 (bits from ``os.urandom``).
3. Noise: the node's own calibration (``clients.node.initial_privacy_state``: q and steps from the public
   training-set size, sigma for the target epsilon with evaluation's share reserved). The claimed epsilon is
   the node's accountant's epsilon for the audited release: every training step of the run (evaluation releases
   are not audited). Noise off = sigma 0, clipping on (shows that the audit has power).
4. Threat model (``observe``): "step" (default) = the adversary sees the model after EVERY DP-SGD step and
   knows the canaries (white-box). That is stronger than any party of the federation (the coordinator sees one
   update per round), and the claimed epsilon covers it: the accountant composes every step. "round" = the
   adversary sees the partner's model after each round (what the coordinator receives without secure
   aggregation). The auditor's score for canary i is, per observed step, the log-likelihood ratio of "sampled"
   vs "not sampled" for the released column given the canary's clipped gradient at the released model
   (Neyman-Pearson optimal for one step), summed over steps; in "round" mode and with noise off, the plain
   alignment of the column's change with the canary's gradient.
5. Guesses: top-k "in" and bottom-k "out" for a pre-declared list of k, Bonferroni-corrected; count correct;
   lower bound at ``confidence``.

Check: with DP on the bound must be <= the claimed epsilon (a correct implementation fails this with
probability <= 1 - confidence); with noise off it must exceed the claimed epsilon (otherwise the audit could not
have caught anything). A passing audit does not prove the claim: it is a lower bound, and one run of m canaries
cannot show more than about log(m) (5.8 for m = 1,000 at 95%).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from federation.errors import ConfigError, FedpropError
from federation.privacy import audit_bound

SCHEMA = "fedprop-audit/1"
ENGINES = ("fast", "opacus")
OBSERVE = ("step", "round")
GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.45)  # k / m per side, declared before any run
CANARY_SCALE = 30.0  # canary feature value: its column carries ~95% of the clipped gradient at initialisation


@dataclass(frozen=True)
class AuditResult:
    engine: str
    observe: str
    dp: bool  # False = noise off (sigma 0, clipping on): the power check
    target_epsilon: float
    claimed_epsilon: float  # the accountant's epsilon of the audited release (all training steps)
    delta: float
    accountant: str
    noise_multiplier: float  # sigma that ran (0 with noise off)
    calibrated_noise_multiplier: float  # sigma the node calibrated for the target
    sample_rate: float
    steps: int  # DP-SGD steps over the run
    rounds: int
    max_grad_norm: float
    background_customers: int
    canaries: int
    included: int
    guesses: int
    correct: int
    guesses_per_side: int
    confidence: float
    epsilon_lower_bound: float
    max_possible_bound: float  # the bound if every guess of the chosen set were correct
    passed: bool
    seconds: float

    @property
    def check(self) -> str:
        return "bound <= claimed" if self.dp else "bound > claimed (power)"


def _canary_columns(model: nn.Sequential, Xc: torch.Tensor, Yc: torch.Tensor, *, max_grad_norm: float,
                    scale: float) -> torch.Tensor:
    """[m, h] the first-layer column gradient of each canary, clipped as DP-SGD clips it (Opacus's factor
    min(1, C / (||g|| + 1e-6)) over the whole per-sample gradient), at the current model."""
    from clients.training import per_sample_loss

    ins, outs = [], []
    a = Xc
    for layer in model:
        if isinstance(layer, nn.Linear):
            ins.append((a, layer.bias is not None))
            a = layer(a)
            outs.append(a)
        else:
            a = layer(a)
    deltas = torch.autograd.grad(per_sample_loss(a, Yc).sum(), outs)
    sq = sum(d.square().sum(1) * (x.square().sum(1) + float(has_bias)) for d, (x, has_bias) in zip(deltas, ins))
    factor = (max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    return (deltas[0] * (factor * scale)[:, None]).detach()


def _guess_sets(m: int) -> list[int]:
    ks = sorted({max(1, round(f * m)) for f in GUESS_FRACTIONS if 2 * max(1, round(f * m)) <= m})
    if not ks:
        raise ConfigError(f"audit: --canaries {m} is too few; use at least 2 (1,000 for a meaningful bound)")
    return ks


def guess_and_bound(scores: np.ndarray, included: np.ndarray, *, delta: float,
                    confidence: float) -> tuple[float, int, int, int, float]:
    """(bound, guesses, correct, k, max possible bound): top-k "in", bottom-k "out" for every pre-declared k
    (ties broken by canary index, which is independent of the coins), best of them with Bonferroni."""
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    candidates = []
    ks = _guess_sets(m)
    for k in ks:
        correct = int(included[order[:k]].sum()) + int((1 - included[order[m - k:]]).sum())
        candidates.append((2 * k, correct))
    bound, best = audit_bound.best_lower_bound(m=m, candidates=candidates, delta=delta, confidence=confidence)
    r, v = candidates[best]
    level = 1.0 - (1.0 - confidence) / len(candidates)
    top = audit_bound.max_epsilon_lower_bound(m=m, guesses=r, delta=delta, confidence=level)
    return bound, r, v, ks[best], top


def background(cfg, partner: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The default run's synthetic partner ``partner``: features and (churn, propensity) labels."""
    from clients.local_data import load_node_features
    from federation.models import federations

    heads = federations(cfg.task, cfg.model.heads)[0]
    fs = load_node_features(cfg, {"partition-id": partner})
    Y = np.stack([fs.y[h] for h in heads], axis=1).astype(np.float32)
    return torch.from_numpy(fs.X.astype(np.float32)), torch.from_numpy(Y)


def run_audit(cfg, X_bg: torch.Tensor, Y_bg: torch.Tensor, *, engine: str, canaries: int, dp: bool = True,
              observe: str = "step", confidence: float = 0.95, noise_factor: float | None = None,
              scale: float = CANARY_SCALE) -> AuditResult:
    """One audited training run. ``noise_factor`` multiplies the calibrated sigma that actually runs (default 1
    with ``dp``, 0 without); the claim stays the calibrated one, so a factor < 1 plants an under-noising bug."""
    from clients.node import PartnerData, initial_privacy_state, public_size
    from clients.noise import make_noise_source
    from clients.training import DPSGDParams, train_dp
    from federation.models import build_model

    if engine not in ENGINES:
        raise ConfigError(f"audit: engine={engine!r} is not allowed; use one of {', '.join(ENGINES)}")
    if observe not in OBSERVE:
        raise ConfigError(f"audit: observe={observe!r} is not allowed; use one of {', '.join(OBSERVE)}")
    if observe == "step" and cfg.train.momentum != 0:
        raise ConfigError("audit: observe=step runs one train_dp call per step, which needs train.momentum=0")
    if not 0 < confidence < 1:
        raise ConfigError(f"audit: confidence={confidence} must be in (0, 1), e.g. 0.95")
    factor = (1.0 if dp else 0.0) if noise_factor is None else float(noise_factor)
    if not factor >= 0:
        raise ConfigError(f"audit: noise_factor={noise_factor} must be >= 0")
    m, d = int(canaries), X_bg.shape[1]
    _guess_sets(m)
    started = time.perf_counter()
    included = (np.frombuffer(os.urandom(m), dtype=np.uint8) & 1).astype(np.int64)  # fair coins, OS CSPRNG
    Xc = torch.zeros((m, d + m))
    Xc[torch.arange(m), d + torch.arange(m)] = scale
    # Random labels (fixed before training, known to the auditor): with one shared label the included canaries
    # teach the shared layers to predict it for every canary, whose gradients then vanish (measured: logits ~85).
    Yc = torch.from_numpy((np.frombuffer(os.urandom(m * Y_bg.shape[1]), dtype=np.uint8) & 1)
                          .reshape(m, Y_bg.shape[1]).astype(np.float32))
    inc = torch.from_numpy(included.astype(bool))
    X = torch.cat([torch.cat([X_bg, torch.zeros((len(X_bg), m))], dim=1), Xc[inc]]).contiguous()
    Y = torch.cat([Y_bg, Yc[inc]]).contiguous()
    heads = tuple(f"head{i}" for i in range(Y.shape[1]))
    # The public size is fixed before the coins (background + m/2), so q, steps and the divisor reveal nothing.
    public_n = public_size(len(X_bg) + m // 2)
    data = PartnerData(0, heads, X, Y, X[:0], Y[:0], (), public_n_train=public_n)
    state = initial_privacy_state(cfg, data)
    claimed_state = state
    for _ in range(cfg.rounds):
        claimed_state = claimed_state.after_round()
    claimed = claimed_state.training_epsilon()
    sigma = state.noise_multiplier * factor
    q, C, lr = state.sample_rate, state.max_grad_norm, cfg.train.lr
    B = max(1, int(public_n * q))

    model = build_model(cfg.model, n_features=d + m, n_outputs=Y.shape[1])
    first = model[0]
    scores = np.zeros(m)
    log_q, log_1q = math.log(q), math.log1p(-q) if q < 1 else -math.inf

    def observe_release(before: torch.Tensor, u: torch.Tensor, *, llr: bool) -> None:
        G = ((before - first.weight.detach()[:, d:]) * (B / lr)).T.double()  # [m, h]: noisy clipped sum
        ud = u.double()
        a = (G * ud).sum(1)
        if llr and sigma > 0:  # log [(1-q) N(G; 0) + q N(G; u)] / N(G; 0), noise N(0, (sigma C)^2 I)
            z = (a - 0.5 * ud.square().sum(1)) / (sigma * C) ** 2
            s = torch.logaddexp(torch.full_like(z, log_1q), log_q + z) if q < 1 else z
        elif llr:  # noise off: the alignment itself (0 unless the canary was in the batch)
            s = a
        else:  # one release per round, many steps: the alignment with the round-start gradient's direction
            s = a / ud.norm(dim=1).clamp(min=1e-12)
        scores[:] += s.numpy()

    steps_each = 1 if observe == "step" else state.steps_per_round
    for _ in range(cfg.rounds):
        gen = make_noise_source(cfg.privacy.noise)  # a fresh source per release, as a node does
        for _ in range(state.steps_per_round // steps_each):
            u = _canary_columns(model, Xc, Yc, max_grad_norm=C, scale=scale)
            before = first.weight.detach()[:, d:].clone()
            params = DPSGDParams(noise_multiplier=sigma, max_grad_norm=C, sample_rate=q, steps=steps_each,
                                 expected_batch_size=B)
            train_dp(model, X, Y, params=params, lr=lr, momentum=cfg.train.momentum, generator=gen, engine=engine)
            observe_release(before, u, llr=observe == "step")
    bound, r, v, k, top = guess_and_bound(scores, included, delta=state.delta, confidence=confidence)
    passed = bound <= claimed if dp else bound > claimed
    return AuditResult(
        engine=engine, observe=observe, dp=dp, target_epsilon=float(cfg.privacy.epsilon), claimed_epsilon=claimed,
        delta=state.delta, accountant=state.accountant, noise_multiplier=sigma,
        calibrated_noise_multiplier=state.noise_multiplier, sample_rate=q,
        steps=state.steps_per_round * cfg.rounds, rounds=cfg.rounds, max_grad_norm=C,
        background_customers=len(X_bg), canaries=m, included=int(included.sum()), guesses=r, correct=v,
        guesses_per_side=k, confidence=confidence, epsilon_lower_bound=bound, max_possible_bound=top,
        passed=bool(passed), seconds=time.perf_counter() - started,
    )


# ------------------------------------------------------------------------------------------ reporting


def to_json(results: list[AuditResult]) -> dict:
    return {
        "schema": SCHEMA,
        "method": "Steinke, Nasr, Jagielski 2023, one training run (arXiv:2305.08846); Dirac canaries",
        "passed": all(r.passed for r in results),
        "line": audit_line(results),
        "results": [dataclasses.asdict(r) for r in results],
    }


def from_json(data: dict) -> list[AuditResult]:
    """Results from an audit JSON, refusing any other schema or field set."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise FedpropError(f"audit file: schema is not {SCHEMA!r}; re-run `fedprop audit --out FILE`")
    names = {f.name for f in dataclasses.fields(AuditResult)}
    out = []
    for i, row in enumerate(data.get("results", [])):
        if not isinstance(row, dict) or set(row) != names:
            raise FedpropError(f"audit file: result {i} does not have the fields of {SCHEMA}; re-run the audit")
        out.append(AuditResult(**row))
    if not out:
        raise FedpropError("audit file: no results")
    return out


def load_audit(path: str) -> list[AuditResult]:
    """Read an audit JSON written by ``fedprop audit --out`` (for reports)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise FedpropError(f"audit file {path}: cannot be read as JSON ({type(e).__name__}); re-run "
                           "`fedprop audit --out FILE`") from None
    return from_json(data)


def audit_line(results: list[AuditResult]) -> str:
    """One line for a compliance report: the claim tested, not just computed."""
    parts = []
    for r in results:
        what = "DP" if r.dp else "noise off"
        parts.append(f"{r.engine}/{what}: claimed {r.claimed_epsilon:.2f}, lower bound {r.epsilon_lower_bound:.2f} "
                     f"({r.correct}/{r.guesses} correct, m={r.canaries}) {'ok' if r.passed else 'FAILED'}")
    c = results[0]
    head = (f"Empirical audit, tested not just computed ({'PASS' if all(r.passed for r in results) else 'FAIL'}; one run, "
            f"{c.confidence:.0%} confidence, adversary sees {'every step' if c.observe == 'step' else 'every round'}, "
            f"delta {c.delta:g}): ")
    return head + "; ".join(parts)


def render_audit(results: list[AuditResult]) -> str:
    """The audit as a text table (also what ``fedprop audit`` prints)."""
    rows = [("engine", "noise", "sigma", "claimed eps", "lower bound", "conf", "m", "guesses", "correct",
             "max bound", "check", "result", "s")]
    for r in results:
        rows.append((r.engine, "on" if r.dp else "off", f"{r.noise_multiplier:.3f}", f"{r.claimed_epsilon:.3f}",
                     f"{r.epsilon_lower_bound:.3f}", f"{r.confidence:.0%}", str(r.canaries), str(r.guesses),
                     str(r.correct), f"{r.max_possible_bound:.2f}", r.check, "ok" if r.passed else "FAILED",
                     f"{r.seconds:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    c = results[0]
    lines.append(f"threat model: white-box, adversary sees the model after every {c.observe} and chose the canaries; "
                 f"q={c.sample_rate:.4f}, {c.steps} steps, C={c.max_grad_norm:g}, delta={c.delta:g}, "
                 f"accountant {c.accountant}, {c.background_customers} background customers")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ command line


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="empirical privacy audit: lower bound on epsilon from one run with canaries")
    p.add_argument("--engine", choices=(*ENGINES, "both"), default="both")
    p.add_argument("--epsilon", type=float, default=3.0, help="target epsilon the node calibrates for (default 3)")
    p.add_argument("--canaries", type=int, default=1000, help="number of canaries m (default 1000)")
    p.add_argument("--observe", choices=OBSERVE, default="step",
                   help="what the adversary sees: every DP-SGD step (default) or every round's update")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--partner", type=int, default=0, help="synthetic partner of the default run used as background")
    p.add_argument("--out", default="", help="write the results as JSON (atomic)")
    p.set_defaults(func=_cmd_audit)


def _cmd_audit(args: argparse.Namespace) -> int:
    from federation.atomicio import atomic_write_text
    from federation.config import FedpropConfig, validate

    if not (math.isfinite(args.epsilon) and args.epsilon > 0):
        raise SystemExit(f"fedprop audit: --epsilon {args.epsilon} must be a finite number > 0")
    if args.canaries < 2:
        raise SystemExit(f"fedprop audit: --canaries {args.canaries} must be >= 2 (1000 for a meaningful bound)")
    cfg = FedpropConfig()
    cfg.privacy.epsilon = float(args.epsilon)
    try:
        cfg = validate(cfg)
        X, Y = background(cfg, args.partner)
        engines = ENGINES if args.engine == "both" else (args.engine,)
        results = []
        for engine in engines:
            for dp in (True, False):
                results.append(run_audit(cfg, X, Y, engine=engine, canaries=args.canaries, dp=dp,
                                         observe=args.observe, confidence=args.confidence))
                print(f"  {engine} noise {'on' if dp else 'off'}: bound {results[-1].epsilon_lower_bound:.3f} "
                      f"({results[-1].seconds:.0f} s)", file=sys.stderr)
    except FedpropError as e:
        print(f"fedprop audit: {e}", file=sys.stderr)
        return 2
    print(render_audit(results))
    print(audit_line(results))
    if args.out:
        atomic_write_text(args.out, json.dumps(to_json(results), indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.out}")
    return 0 if all(r.passed for r in results) else 1
