"""Model cards for released global models: a JSON document for machines and Markdown for people.

A card states what the model is for (task, model kind), what it reads (feature names, data-contract hash),
how it was trained (rounds, number of partners: counts only, never a partner's data), how well it does
(metrics combined from partners' score histograms, see :mod:`federation.metrics`) and the differential
privacy guarantee each partner's customers received (epsilon, delta, accountant, unit). Partners are named
by their pseudonymous node label from the federation config, never by customer data.

Both files are written atomically. JSON is deterministic (sorted keys, NaN/inf written as ``null``).
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from federation.atomicio import atomic_write_text
from federation.errors import FedpropError

CARD_SCHEMA = "fedprop-model-card"
CARD_SCHEMA_VERSION = 1
PRIVACY_UNITS = ("customer",)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

_HEADLINE = (
    ("auc_roc", "AUC-ROC"),
    ("pr_auc", "PR-AUC (average precision)"),
    ("log_loss", "Log loss"),
    ("brier", "Brier score"),
    ("ece", "Expected calibration error"),
    ("top_decile_lift", "Top-decile lift"),
    ("base_rate", "Base rate"),
    ("n", "Held-out customers"),
)


class ModelCardError(FedpropError):
    """Model card inputs are invalid; lists every problem."""


@dataclass(frozen=True, kw_only=True)
class PrivacyGuarantee:
    """The (epsilon, delta)-DP guarantee one partner's customers received for this model (all rounds)."""

    partner: str
    epsilon: float
    delta: float
    accountant: str
    unit: str = "customer"

    def problems(self) -> list[str]:
        out = []
        where = f"privacy[{self.partner!r}]"
        if not isinstance(self.partner, str) or not _LABEL.match(self.partner):
            out.append(f"{where}.partner must be a node label like 'partner-3' (letters, digits, _.-)")
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) or not (
            math.isfinite(self.epsilon) and self.epsilon > 0
        ):
            out.append(f"{where}.epsilon must be a finite number > 0, got {self.epsilon!r}")
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not 0 <= self.delta < 1:
            out.append(f"{where}.delta must be in [0, 1), got {self.delta!r}")
        if not isinstance(self.accountant, str) or not self.accountant:
            out.append(f"{where}.accountant must name the accountant that computed epsilon")
        if self.unit not in PRIVACY_UNITS:
            out.append(f"{where}.unit must be one of {list(PRIVACY_UNITS)}, got {self.unit!r}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"partner": self.partner, "epsilon": float(self.epsilon), "delta": float(self.delta),
                "accountant": self.accountant, "unit": self.unit}


def _jsonable(value: Any, where: str, problems: list[str]) -> Any:
    """Plain JSON value: numpy scalars/arrays to Python, non-finite floats to None."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                problems.append(f"{where}: key {k!r} is not a string")
                continue
            out[k] = _jsonable(v, f"{where}.{k}", problems)
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    problems.append(f"{where}: {type(value).__name__} is not JSON-serialisable")
    return None


def _positive_int(name: str, value: Any, problems: list[str], *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        problems.append(f"{name} must be an integer >= {minimum}, got {value!r}")


def build_model_card(
    *,
    task: str,
    model_kind: str,
    feature_names: Sequence[str],
    contract_hash: str,
    rounds: int,
    num_partners: int,
    metrics: Mapping[str, Any],
    privacy: Sequence[PrivacyGuarantee],
    model_file: str | None = None,
    model_sha256: str | None = None,
    evaluation_mechanism: Mapping[str, Any] | None = None,
    created_at: str | None = None,
    reproducible_noise: bool = False,
) -> dict[str, Any]:
    """Validate the inputs (all problems at once) and return the card as a JSON-ready dict.

    ``metrics``: e.g. :func:`federation.metrics.summarize` of the combined evaluation histogram.
    ``privacy``: one entry per partner that trained with DP; empty for a non-private model.
    ``evaluation_mechanism``: the mechanism dict of the DP evaluation release (its kind and unit) if evaluation
    aggregates were released with DP noise, else ``None``.
    """
    problems: list[str] = []
    for name, value in (("task", task), ("model_kind", model_kind)):
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{name} must be a non-empty string, got {value!r}")
    names = list(feature_names) if isinstance(feature_names, Sequence) and not isinstance(feature_names, str) else None
    if not names or not all(isinstance(f, str) and f for f in names):
        problems.append("feature_names must be a non-empty list of non-empty strings")
        names = []
    elif len(set(names)) != len(names):
        problems.append(f"feature_names has duplicates: {sorted({f for f in names if names.count(f) > 1})}")
    if not isinstance(contract_hash, str) or not _HEX64.match(contract_hash):
        problems.append(f"contract_hash must be a 64-character lowercase hex SHA-256, got {contract_hash!r}")
    if model_sha256 is not None and (not isinstance(model_sha256, str) or not _HEX64.match(model_sha256)):
        problems.append(f"model_sha256 must be a 64-character lowercase hex SHA-256, got {model_sha256!r}")
    _positive_int("rounds", rounds, problems, minimum=1)
    _positive_int("num_partners", num_partners, problems, minimum=1)
    entries = list(privacy)
    for e in entries:
        if not isinstance(e, PrivacyGuarantee):
            problems.append(f"privacy entries must be PrivacyGuarantee, got {type(e).__name__}")
        else:
            problems.extend(e.problems())
    labels = [e.partner for e in entries if isinstance(e, PrivacyGuarantee)]
    if len(set(labels)) != len(labels):
        problems.append(f"privacy lists a partner more than once: {sorted({p for p in labels if labels.count(p) > 1})}")
    if isinstance(num_partners, int) and len(entries) > num_partners:
        problems.append(f"privacy has {len(entries)} entries but the federation has {num_partners} partners")
    if not isinstance(metrics, Mapping):
        problems.append(f"metrics must be a mapping, got {type(metrics).__name__}")
        metrics = {}
    clean_metrics = _jsonable(metrics, "metrics", problems)
    mech = None if evaluation_mechanism is None else _jsonable(evaluation_mechanism, "evaluation_mechanism", problems)
    if mech is not None:
        if not isinstance(mech, dict):
            problems.append("evaluation_mechanism must be the evaluation release's mechanism dict (with kind and unit)")
        else:
            for key in ("kind", "unit"):
                if not isinstance(mech.get(key), str):
                    problems.append(f"evaluation_mechanism.{key} must be a string, got {mech.get(key)!r}")
            for key in ("epsilon", "delta"):
                v = mech.get(key)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                    problems.append(f"evaluation_mechanism.{key} must be a finite number >= 0, got {v!r}")
    if problems:
        raise ModelCardError(f"{len(problems)} problem(s) in the model card inputs:\n" +
                             "\n".join(f"  - {p}" for p in problems))
    guarantees = sorted((e.to_dict() for e in entries), key=lambda d: d["partner"])
    return {
        "schema": CARD_SCHEMA,
        "schema_version": CARD_SCHEMA_VERSION,
        "created_at": created_at,
        "task": task,
        "model": {"kind": model_kind, "file": model_file, "sha256": model_sha256},
        "data_contract": {"hash": contract_hash, "features": names, "n_features": len(names)},
        "training": {"rounds": rounds, "partners": num_partners},
        "metrics": clean_metrics,
        "evaluation": {"noise": mech},
        "privacy": {"differentially_private": bool(guarantees), "guarantees": guarantees,
                    # privacy.noise=reproducible: the noise can be replayed by anyone who knows the run's seed
                    **({"reproducible_noise_no_guarantee_against_seed_holders": True} if reproducible_noise else {})},
    }


def render_json(card: Mapping[str, Any]) -> str:
    """Deterministic JSON text of a card (sorted keys, strict: no NaN)."""
    return json.dumps(card, indent=2, sort_keys=True, allow_nan=False) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(card: Mapping[str, Any]) -> str:
    """Markdown text of a card, for people and pull requests."""
    m, model, contract = card["metrics"], card["model"], card["data_contract"]
    lines = [f"# Model card: {_cell(card['task'])} model", ""]
    if card["privacy"].get("reproducible_noise_no_guarantee_against_seed_holders"):
        lines += ["**WARNING: trained with reproducible noise (privacy.noise=reproducible). The DP noise is derived from "
                  "the run config's seed: this model gives NO differential-privacy guarantee against anyone who knows "
                  "the seed (the coordinator chose it).**", ""]
    lines += ["| | |", "|---|---|"]
    lines.append(f"| Task | {_cell(card['task'])} |")
    lines.append(f"| Model | {_cell(model['kind'])} |")
    if model["file"] is not None or model["sha256"] is not None:
        lines.append(f"| Model file | {_cell(model['file'])} (sha256 `{model['sha256'] or 'n/a'}`) |")
    lines.append(f"| Data contract | `{contract['hash']}` |")
    lines.append(f"| Features | {contract['n_features']} |")
    lines.append(f"| Training rounds | {card['training']['rounds']} |")
    lines.append(f"| Partners | {card['training']['partners']} |")
    if card.get("created_at"):
        lines.append(f"| Created | {_cell(card['created_at'])} |")

    lines += ["", "## Metrics", ""]
    shown = [(k, label) for k, label in _HEADLINE if k in m]
    dp = bool(m.get("dp_release"))
    if dp:  # every value below comes from noisy counts: say so where it is read, not only in a later table
        shown = [(k, "Held-out customers (noisy count)" if k == "n" else label) for k, label in shown]

    def value(k: str) -> str:
        hw = m.get("auc_roc_half_width")
        return f"{_cell(m[k])} +- {_cell(hw)}" if dp and k == "auc_roc" and hw is not None else _cell(m[k])

    if shown:
        lines += ["| Metric | " + ("DP estimate (from noisy counts)" if dp else "Value") + " |", "|---|---|"] + [
            f"| {label} | {value(k)} |" for k, label in shown]
    others = sorted(k for k, v in m.items() if k not in dict(_HEADLINE) and not isinstance(v, (dict, list)))
    if others:
        lines += ["", "| Other metric | Value |", "|---|---|"] + [f"| {_cell(k)} | {_cell(m[k])} |" for k in others]
    if not shown and not others:
        lines.append("No metrics were recorded.")
    if m.get("dp_release"):
        hw = m.get("auc_roc_half_width")
        lines += ["", "Computed from the partners' differentially private evaluation releases: per-class counts of "
                  "held-out customers in public score bins plus discrete Gaussian noise, summed over partners. "
                  f"Approximate 95% noise interval of the AUC (parametric bootstrap of the noise): +-{_cell(hw)}"
                  + ("" if m.get("auc_roc_meaningful", True) else " (too wide: the AUC is not meaningful at this noise)")
                  + ". Noise biases a released AUC towards 0.5 on small test sets, so the interval covers less than 95% "
                  "when it is wider than +-0.05 (then the AUC is marked not meaningful). Log loss, Brier and calibration "
                  "use each bin's public representative score (approximate)."]
    elif m.get("score_resolution"):
        lines += ["", f"Combined from partners' score histograms (bin width {m['score_resolution']:g}): log loss "
                  "and Brier are exact, ECE is exact for its bins, and AUC-ROC is within "
                  f"{_cell(m.get('auc_tie_bound'))} of the AUC of the pooled predictions."]
    gains = m.get("gains")
    if isinstance(gains, Mapping) and gains.get("fraction"):
        lines += ["", "### Cumulative gains and lift", "", "| Top share | Cumulative gains | Cumulative lift |",
                  "|---|---|---|"]
        for f, g, lift in zip(gains["fraction"], gains["cumulative_gains"], gains["cumulative_lift"]):
            lines.append(f"| {f:.0%} | {_cell(g)} | {_cell(lift)} |")

    lines += ["", "## Evaluation release", ""]
    noise = card["evaluation"]["noise"]
    if noise:
        lines.append(
            f"Each partner released its evaluation counts with {_cell(noise.get('kind'))} noise, "
            f"inside its privacy budget of epsilon = {noise.get('epsilon'):g}, delta = {noise.get('delta'):g} per "
            f"{_cell(noise.get('unit'))} for the whole run (training and evaluation composed together); the metrics "
            "above are computed from the noisy aggregates. Nothing else about the held-out customers left the nodes."
        )
    else:
        lines.append(
            "Evaluation histograms were released without noise (a non-private run): they reveal each partner's "
            "number of held-out customers, its base rate and its score distribution per class at bin resolution, "
            "and a sparsely populated bin can single out a customer's score and label."
        )

    lines += ["", "## Privacy", ""]
    if card["privacy"]["differentially_private"]:
        lines += ["| Partner | Epsilon | Delta | Accountant | Unit |", "|---|---|---|---|---|"]
        for g in card["privacy"]["guarantees"]:
            lines.append(f"| {_cell(g['partner'])} | {g['epsilon']:.3f} | {g['delta']:.1e} | "
                         f"{_cell(g['accountant'])} | {_cell(g['unit'])} |")
        lines += ["", "Each listed partner's customers are protected by (epsilon, delta)-differential privacy "
                  "at the customer level over all training rounds and evaluation releases of this model, as computed "
                  "by the named accountant from the privacy ledger's mechanism records (with secure aggregation the "
                  "server sees no per-partner figure: the epsilon listed is the target each partner's node enforced)."]
        missing = card["training"]["partners"] - len(card["privacy"]["guarantees"])
        if missing:
            lines.append(f"{missing} partner(s) have no differential-privacy guarantee for this model.")
    else:
        lines.append("**This model was trained without differential privacy.** No privacy guarantee is claimed.")

    lines += ["", "## Features", ""] + [f"- `{f.replace('`', '')}`" for f in contract["features"]]
    return "\n".join(lines) + "\n"


def write_model_card(card: Mapping[str, Any], out_dir: str | Path, *, stem: str = "model_card") -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` atomically into ``out_dir``; return (json_path, md_path)."""
    if not isinstance(stem, str) or not _LABEL.match(stem):
        raise ModelCardError(f"stem must be a plain file name (letters, digits, _.-), got {stem!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_text, md_text = render_json(card), render_markdown(card)  # render both before writing either
    return atomic_write_text(out / f"{stem}.json", json_text), atomic_write_text(out / f"{stem}.md", md_text)
