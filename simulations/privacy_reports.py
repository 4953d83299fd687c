"""Privacy ledgers around a simulation: resolve their location before it, write budget reports after it.

``prepare_ledgers(cfg)`` (before the federation) makes ``privacy.ledger_dir`` and ``privacy.policy``
absolute, so every ClientApp (whatever its worker's working directory) uses the same ledgers, and loads the
policy once so a broken policy file fails before anything runs.

``write_privacy_reports(cfg, run_dir)`` (after it) verifies each partner's ledger (hash chain, signatures,
signed head, every epsilon recomputed) and writes ``<run_dir>/privacy/partner-<i>.md|json|html``: the
compliance report of ``federation.privacy.report`` over the partner's WHOLE ledger (every run in the
period, not only this one). ``render_privacy_section`` is the summary's paragraph pointing at them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from clients.ledger_hooks import resolve_node_ledger
from federation.config import FedpropConfig
from federation.privacy.ledger import Ledger, verify
from federation.privacy.policy import default_policy, load_policy
from federation.privacy.report import build_report, write_report

__all__ = ["prepare_ledgers", "write_privacy_reports", "render_privacy_section"]

FORMATS = ("md", "json", "html")


def prepare_ledgers(cfg: FedpropConfig, *, run_dir: Path | None = None) -> FedpropConfig:
    """``privacy.ledger_dir=""`` (the default) gives this run its own ledgers under ``<run_dir>/ledgers``, so a
    user's experiments do not spend each other's budget; a directory shared by several runs simulates a
    partner's year (its budget is then cumulative)."""
    if not cfg.privacy.enabled:
        return cfg
    policy = str(Path(cfg.privacy.policy).resolve()) if cfg.privacy.policy else ""
    if policy:
        load_policy(policy)  # PolicyError (a ConfigError) naming every bad key, before any node starts
    ledger_dir = cfg.privacy.ledger_dir or (str(Path(run_dir) / "ledgers") if run_dir is not None else "")
    if not ledger_dir:
        raise ValueError("prepare_ledgers: privacy.ledger_dir is empty and no run directory was given")
    privacy = dataclasses.replace(cfg.privacy, ledger_dir=str(Path(ledger_dir).resolve()), policy=policy)
    return dataclasses.replace(cfg, privacy=privacy)


def write_privacy_reports(cfg: FedpropConfig, run_dir: Path) -> dict[str, Any]:
    """Verify every partner's ledger and write its report in Markdown, JSON and HTML; return an index."""
    out: dict[str, Any] = {"dir": None, "ledger_dir": cfg.privacy.ledger_dir, "policy": cfg.privacy.policy or None,
                           "partners": {}}
    if not cfg.privacy.enabled:
        return out
    rdir = Path(run_dir) / "privacy"
    rdir.mkdir(parents=True, exist_ok=True)
    out["dir"] = str(rdir)
    policy = load_policy(cfg.privacy.policy) if cfg.privacy.policy else default_policy()  # what the nodes enforced
    for i in range(cfg.partners):
        node = resolve_node_ledger(cfg, {"partition-id": i})
        if not node.ledger_path.exists():
            out["partners"][str(i)] = {"ledger": str(node.ledger_path), "missing": True}
            continue
        result = verify(node.ledger_path, node.public_key_path)
        with Ledger.open(node.ledger_path, signing_key=None) as ledger:
            entries = ledger.entries()
        report = build_report(entries, policy=policy, verification=result, partner=node.partner)
        files = {fmt: str(write_report(report, rdir / f"{node.partner}.{fmt}", fmt=fmt)) for fmt in FORMATS}
        this_run = entries[-1].run_id if entries else None
        acc = report["enforced_accountant"]
        out["partners"][str(i)] = {
            "ledger": str(node.ledger_path),
            "public_key": str(node.public_key_path),
            "reports": files,
            "verified_entries": result.entries,
            "run_id": this_run,
            "rounds_released_this_run": sum(
                1 for e in entries if e.run_id == this_run and e.kind == "dpsgd_round"),
            "refusals_this_run": [e.extra.get("reason") for e in entries
                                  if e.run_id == this_run and e.kind == "refusal" and e.extra],
            "period": report["period"]["label"],
            "period_epsilon": report["current_period_epsilon"][acc],
            "accountant": acc,
            "delta": report["delta"],
            "compliant": None if report["compliance"] is None else report["compliance"]["compliant"],
            "remaining_epsilon": None if report["compliance"] is None else report["compliance"]["remaining_epsilon"],
        }
    return out


def render_privacy_section(index: dict[str, Any]) -> str:
    if not index.get("dir"):
        return ""
    lines = ["", "### Privacy budget reports", "",
             f"Verified ledgers in {index['ledger_dir']} (per run unless privacy.ledger_dir names a shared folder); reports in {index['dir']} "
             f"(partner-<i>.md / .json / .html). Policy: {index['policy'] or 'fedprop default policy (epsilon 5 per calendar month, 10 lifetime, tight accountants; enforced)'}.",
             "", "| partner | rounds released (this run) | refusals (this run) | epsilon in period | remaining | policy |",
             "|---|---|---|---|---|---|"]
    for pid, p in sorted(index["partners"].items(), key=lambda kv: int(kv[0])):
        if p.get("missing"):
            lines.append(f"| {pid} | - | - | no ledger at {p['ledger']} | - | - |")
            continue
        rem = "-" if p["remaining_epsilon"] is None else f"{p['remaining_epsilon']:.3f}"
        verdict = "-" if p["compliant"] is None else ("compliant" if p["compliant"] else "NOT COMPLIANT")
        lines.append(
            f"| {pid} | {p['rounds_released_this_run']} | {len(p['refusals_this_run'])} | "
            f"{p['period_epsilon']:.3f} ({p['accountant']}, {p['period']}) | {rem} | {verdict} |"
        )
    return "\n".join(lines) + "\n"
