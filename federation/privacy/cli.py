"""``fedprop budget plan | report | verify | init``: privacy budget commands for data teams and compliance.

Trust is pinned (PRINCIPLES 16): ``report`` and ``verify`` take the node's key as ``--public-key FILE`` or
``--fingerprint SHA256:...`` obtained at onboarding, and refuse a public key file lying in the ledger's own
folder (whoever can rewrite the ledger can replace that file too).

Mounted by the ``fedprop`` entry point through ``register(subparsers)``; ``main(argv)`` runs it standalone
(``python -m federation.privacy.cli budget ...``). Exit codes: 0 ok, 1 verification/policy failure,
2 usage or input error.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from federation.errors import FedpropError, LedgerIntegrityError
from federation.privacy.accountants import available_accountants, calibrate_noise_multiplier, get_accountant
from federation.privacy.events import PoissonSampledGaussian
from federation.privacy.ledger import Ledger, init_node_ledger, verify, verify_against
from federation.privacy.policy import load_policy
from federation.privacy.report import build_report, render_json, render_markdown, write_report

__all__ = ["register", "run", "main", "sampling_plan"]


def sampling_plan(*, n_customers: int, batch_size: int, epochs_per_round: float) -> tuple[float, int]:
    """(q, steps per round) exactly as the client trains: q = min(1, batch/n), steps = ceil(epochs / q)."""
    if n_customers < 1 or batch_size < 1 or not epochs_per_round > 0:
        raise FedpropError("n_customers and batch_size must be >= 1 and epochs_per_round > 0.")
    q = min(1.0, batch_size / n_customers)
    return q, max(1, math.ceil(epochs_per_round / q))


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    budget = subparsers.add_parser("budget", help="privacy budget: plan a run, report and verify a ledger")
    sub = budget.add_subparsers(dest="budget_command", required=True)

    plan = sub.add_parser("plan", help="epsilon a run will spend, or the noise needed for a target epsilon")
    plan.add_argument("--config", type=Path, help="resolved run config YAML (rounds, train.*, privacy.*)")
    plan.add_argument("--n-customers", type=int, help="training customers at the partner (n)")
    rate = plan.add_mutually_exclusive_group()
    rate.add_argument("--batch-size", type=int, help="expected Poisson batch size (q = batch / n)")
    rate.add_argument("--sampling-rate", type=float, help="Poisson sampling rate q")
    length = plan.add_mutually_exclusive_group()
    length.add_argument("--epochs-per-round", type=float, help="expected local epochs per round")
    length.add_argument("--steps", type=int, help="optimizer steps per round")
    plan.add_argument("--rounds", type=int, help="rounds in the run")
    plan.add_argument("--delta", type=float, help="target delta (default: config privacy.delta or 1e-5)")
    noise = plan.add_mutually_exclusive_group()
    noise.add_argument("--noise-multiplier", type=float, help="sigma: print the epsilon the run spends")
    noise.add_argument("--target-epsilon", type=float, help="print the sigma needed for this epsilon over the run")
    plan.add_argument(
        "--accountant", action="append", choices=available_accountants(),
        help="accountant(s) to use (repeatable; default: all registered)",
    )
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(budget_func=_plan)

    report = sub.add_parser("report", help="compliance report from a ledger (HTML, Markdown or JSON)")
    report.add_argument("ledger", type=Path)
    _pin_args(report)
    report.add_argument("--policy", type=Path, help="budget policy YAML")
    report.add_argument("--server-ledger", type=Path, help="the server's federation ledger (partner-level layer)")
    report.add_argument("--server-public-key", type=Path, help="public key of the server ledger")
    report.add_argument("--partner", help="partner to report on (when the ledger holds several)")
    report.add_argument("--audit", type=Path, help="a `fedprop audit --out` JSON: its line goes into the statement "
                        "(the claim tested, not just computed)")
    report.add_argument("--format", choices=("html", "md", "json"), default="md")
    report.add_argument("--out", type=Path, help="output file (default: stdout for md/json)")
    report.set_defaults(budget_func=_report)

    ver = sub.add_parser("verify", help="check hash chain, signatures and recompute every epsilon")
    ver.add_argument("ledger", type=Path)
    _pin_args(ver)
    ver.add_argument(
        "--expected-head", metavar="SEQ:HASH", help="head recorded outside the node (detects rollback)"
    )
    ver.add_argument("--against", type=Path, metavar="FEDERATION_LEDGER",
                     help="compare with the heads the server recorded per round (rollback, truncation, replacement)")
    fed = ver.add_mutually_exclusive_group()
    fed.add_argument("--federation-public-key", type=Path, help="the server's pinned ledger key (PEM)")
    fed.add_argument("--federation-fingerprint", help="the server's pinned ledger key fingerprint")
    ver.add_argument("--partner", help="partner name in the federation ledger (default: the ledger's)")
    ver.set_defaults(budget_func=_verify)

    init = sub.add_parser("init", help="create this node's ledger; where it already had one, an explicit reset")
    init.add_argument("ledger", type=Path, help="the node's ledger path (must not exist)")
    init.add_argument("--node-key", type=Path, required=True, help="the node's ledger-signing key (key directory)")
    init.add_argument("--reason", required=True, help="why: recorded in the signed genesis, seen by the federation")
    init.set_defaults(budget_func=_init)
    budget.set_defaults(func=run)
    return budget


def _pin_args(parser: argparse.ArgumentParser) -> None:
    pin = parser.add_mutually_exclusive_group(required=True)
    pin.add_argument("--public-key", type=Path, help="the node's Ed25519 public key (PEM), kept apart from the ledger")
    pin.add_argument("--fingerprint", help="the node key's fingerprint (SHA256:...), registered at onboarding")


def _pinned(ledger: Path, public_key: Path | None) -> None:
    if public_key is not None and Path(public_key).resolve().parent == Path(ledger).resolve().parent:
        raise FedpropError(
            f"--public-key {public_key} lies in the ledger's own folder: whoever can rewrite the ledger can replace "
            "it too. Use the key or --fingerprint registered at onboarding (kept apart from the node's disk)."
        )


def _cfg_get(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _auto_rounds(cfg: dict, target: float | None) -> int:
    """The rounds a run of this config would train: its ``rounds`` (0 or absent = auto), resolved as the run resolves
    it (``federation.config._resolve_auto``, schema defaults for absent keys; ``--target-epsilon`` stands for the
    config's epsilon). A value the run would refuse is refused here, naming the key."""
    import dataclasses

    from federation.config import FedpropConfig, _resolve_auto, _typed

    base = FedpropConfig()

    def value(key: str, default: Any) -> Any:
        got = _cfg_get(cfg, key)
        return default if got is None else _typed(key, got, default)

    run = dataclasses.replace(
        base, rounds=value("rounds", base.rounds), task=value("task", base.task),
        model=dataclasses.replace(base.model, heads=value("model.heads", base.model.heads)),
        privacy=dataclasses.replace(base.privacy, enabled=value("privacy.enabled", base.privacy.enabled),
                                    epsilon=float(target) if target is not None
                                    else value("privacy.epsilon", base.privacy.epsilon)))
    _resolve_auto(run)
    if run.rounds < 1:
        raise FedpropError(f"rounds={run.rounds} in --config must be >= 1 (or 0: chosen from privacy.epsilon)")
    return run.rounds


def _plan(args: argparse.Namespace, out) -> int:
    cfg: dict = {}
    if args.config is not None:
        cfg = yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}
    rounds = args.rounds if args.rounds is not None else _cfg_get(cfg, "rounds")
    delta = args.delta if args.delta is not None else (_cfg_get(cfg, "privacy.delta") or 1e-5)
    delta = float(delta)
    batch = args.batch_size if args.batch_size is not None else _cfg_get(cfg, "train.batch_size")
    epochs = args.epochs_per_round if args.epochs_per_round is not None else _cfg_get(cfg, "train.local_epochs")
    target = args.target_epsilon
    if target is None and args.noise_multiplier is None:
        target = _cfg_get(cfg, "privacy.epsilon")
    if args.rounds is None and args.config is not None:
        rounds = _auto_rounds(cfg, target)
    missing = [name for name, v in (("--rounds", rounds),) if v is None]
    if args.sampling_rate is not None:
        q = args.sampling_rate
    elif batch is not None and args.n_customers is not None:
        q = min(1.0, batch / args.n_customers)
    else:
        missing.append("--sampling-rate, or --batch-size with --n-customers")
        q = None
    if args.steps is not None:
        steps = args.steps
    elif epochs is not None and q is not None:
        steps = max(1, math.ceil(float(epochs) / q))
    else:
        missing.append("--steps or --epochs-per-round")
        steps = None
    if target is None and args.noise_multiplier is None:
        missing.append("--noise-multiplier or --target-epsilon")
    if missing:
        raise FedpropError("budget plan needs: " + "; ".join(missing) + ".")
    accountants = args.accountant or list(available_accountants())
    total_steps = int(rounds) * int(steps)
    result: dict[str, Any] = {
        "sampling_rate": q, "steps_per_round": steps, "rounds": int(rounds), "total_steps": total_steps,
        "delta": delta, "accountants": {},
    }
    if args.noise_multiplier is not None:
        sigma = args.noise_multiplier
        per_round = PoissonSampledGaussian(sampling_rate=q, noise_multiplier=sigma, steps=steps)
        run = PoissonSampledGaussian(sampling_rate=q, noise_multiplier=sigma, steps=total_steps)
        result["noise_multiplier"] = sigma
        for name in accountants:
            acc = get_accountant(name)
            result["accountants"][name] = {
                "epsilon_per_round": acc.epsilon([per_round], delta=delta),
                "epsilon_run": acc.epsilon([run], delta=delta),
            }
    else:
        result["target_epsilon"] = float(target)
        for name in accountants:
            sigma = calibrate_noise_multiplier(
                target_epsilon=float(target), delta=delta, sampling_rate=q, steps=total_steps, accountant=name
            )
            eps = get_accountant(name).epsilon(
                [PoissonSampledGaussian(sampling_rate=q, noise_multiplier=sigma, steps=total_steps)], delta=delta
            )
            result["accountants"][name] = {"noise_multiplier": sigma, "epsilon_run": eps}
    if args.json:
        out.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
        return 0
    out.write(
        f"Plan: q={q:.6g}, {steps} steps/round x {rounds} rounds = {total_steps} Poisson-sampled Gaussian steps, "
        f"delta={delta:g}, privacy unit = one customer\n"
    )
    for name, row in result["accountants"].items():
        if args.noise_multiplier is not None:
            out.write(
                f"  {name:8s} sigma={args.noise_multiplier:g}: epsilon per round {row['epsilon_per_round']:.4f}, "
                f"whole run {row['epsilon_run']:.4f}\n"
            )
        else:
            out.write(
                f"  {name:8s} target epsilon {float(target):g}: noise multiplier {row['noise_multiplier']:.4f} "
                f"(spends {row['epsilon_run']:.4f})\n"
            )
    return 0


def _load_verified(path: Path, public_key: Path | None, fingerprint: str | None = None):
    _pinned(path, public_key)
    result = verify(path, public_key, fingerprint=fingerprint)
    with Ledger.open(path, signing_key=None) as ledger:
        return ledger.entries(), result


def _audit_summary(path: Path) -> dict:
    """The audit JSON written by ``fedprop audit --out`` (schema checked; plain JSON, no torch here)."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise FedpropError(f"--audit {path}: not a readable audit JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("fedprop-audit") \
            or not isinstance(data.get("line"), str) or not isinstance(data.get("passed"), bool):
        raise FedpropError(f"--audit {path}: not a fedprop audit file (write one with `fedprop audit --out FILE`)")
    return {"line": data["line"], "passed": data["passed"], "results": data.get("results", [])}


def _report(args: argparse.Namespace, out) -> int:
    entries, result = _load_verified(args.ledger, args.public_key, args.fingerprint)
    if args.server_ledger is not None:
        if args.server_public_key is None:
            raise FedpropError("--server-ledger needs --server-public-key.")
        server_entries, _ = _load_verified(args.server_ledger, args.server_public_key)
        entries = entries + [e for e in server_entries if e.layer == "partner"]
    policy = load_policy(args.policy) if args.policy else None
    report = build_report(entries, policy=policy, verification=result, partner=args.partner)
    if args.audit is not None:
        report["audit"] = _audit_summary(args.audit)
        report["statement"] += ("\n\n" + report["audit"]["line"] + f" (from {args.audit})")
    if args.out is not None:
        write_report(report, args.out, fmt=args.format)
        out.write(f"wrote {args.out}\n")
    elif args.format == "html":
        raise FedpropError("--format html needs --out FILE.")
    else:
        out.write(render_json(report) if args.format == "json" else render_markdown(report))
    comp = report["compliance"]
    return 1 if comp is not None and not comp["compliant"] else 0


def _verify(args: argparse.Namespace, out) -> int:
    head = None
    if args.expected_head:
        seq, _, h = args.expected_head.partition(":")
        if not seq.isdigit() or not h:
            raise FedpropError(f"--expected-head must be SEQ:HASH, got {args.expected_head!r}.")
        head = (int(seq), h)
    _pinned(args.ledger, args.public_key)
    result = verify(args.ledger, args.public_key, fingerprint=args.fingerprint, expected_head=head)
    reset = (result.genesis or {}).get("reset_of")
    out.write(
        f"OK {result.path}: {result.entries} entries, head seq={result.head_seq} {result.head_hash[:16]}, "
        f"key {result.public_key_fingerprint} (pinned by {result.pinned_by}), ledger {result.ledger_id}"
        + (f" (a RESET of ledger {reset}: {(result.genesis or {}).get('reason')})" if reset else "")
        + f"; epsilons recomputed with {', '.join(result.accountants)}\n"
    )
    if args.against is not None:
        if args.federation_public_key is None and args.federation_fingerprint is None:
            raise FedpropError("--against needs --federation-public-key or --federation-fingerprint (pinned).")
        res = verify_against(
            args.ledger, args.against, public_key=args.public_key, fingerprint=args.fingerprint,
            federation_public_key=args.federation_public_key, federation_fingerprint=args.federation_fingerprint,
            partner=args.partner,
        )
        for line in res.heads_ignored:
            out.write(f"ignored: {line}\n")
        if res.heads_checked == 0:
            raise FedpropError(f"{args.against}: the server recorded no head signed by this ledger's key for partner "
                               f"{res.partner!r} ({len(res.heads_ignored)} unsigned or wrongly signed head(s) ignored).")
        out.write(
            f"OK against {args.against}: {res.heads_checked} head(s) the server recorded for {res.partner} match"
            + (f"; resets seen: {', '.join(res.resets_seen)}" if res.resets_seen else "")
            + (f"; {len(res.heads_ignored)} head(s) under this name not signed by this ledger's key ignored"
               if res.heads_ignored else "") + "\n"
        )
    return 0


def _init(args: argparse.Namespace, out) -> int:
    with init_node_ledger(args.ledger, key_path=args.node_key, reason=args.reason) as ledger:
        ident = ledger.identity()
    out.write(
        f"created {args.ledger}: ledger {ident['ledger_id']}, key {ident['public_key_fingerprint']}"
        + (f", RESET of ledger {ident['reset_of']} (the federation will see it)" if ident["reset"] else "") + "\n"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``budget`` command (``args.func`` after ``register``); returns the exit code."""
    try:
        return args.budget_func(args, sys.stdout)
    except LedgerIntegrityError as exc:
        print(f"LEDGER VERIFICATION FAILED: {exc}", file=sys.stderr)
        return 1
    except (FedpropError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedprop")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
