"""`fedprop score`: a partner scores its own current customers with the federation's global model, on its node.

    fedprop score --model model_churn+propensity.pt --data customers.csv --contract contracts/x.yaml \
                  --out scores.parquet --public-key /etc/fedprop/federation.pub [--thresholds churn=0.4,propensity=0.6]
    fedprop score ... --key-fingerprint sha256:<hex>     # pin by fingerprint instead (from onboarding)

1. The model's Ed25519 signature (``MODEL.sig``) must verify against the federation key the partner pinned at
   onboarding, before a byte of the model is deserialised: ``--public-key`` (a file the partner keeps, not
   the one that came with the model) and/or ``--key-fingerprint``. A key found next to the model is used only
   when its fingerprint equals the pinned ``--key-fingerprint``; with neither flag nothing is scored. Whoever
   can put a model, its ``.sig`` and a ``federation.pub`` into the model's folder cannot get it scored.
2. The data must satisfy the data contract (``federation.validation``: every problem reported at once, no
   label needed), and the contract must encode the features the model was trained on (feature names; and the
   contract hash of the model card next to the model, when there is one).
3. Scores stay on the node: per customer the churn probability and/or propensity score, the decile of each
   (1 = the 10% highest scores), and a segment from the thresholds: ``high churn risk``, ``high purchase
   propensity``, ``both`` or ``neither``. Output CSV or Parquet by extension, written atomically.

Event logs are scored at the contract's cutoff (features use events strictly before it); ``--cutoff`` sets
another one (``--cutoff today`` for the current date). Exit codes: 0 scored, 1 refused (signature, data),
2 unusable inputs (contract, key, thresholds).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from federation.errors import ConfigError, DataValidationError, FedpropError

SEGMENTS = ("both", "high churn risk", "high purchase propensity", "neither")
DEFAULT_SCORING_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "scoring.yaml"
DEFAULT_THRESHOLDS = {"churn": 0.5, "propensity": 0.5}


class ScoringRefused(FedpropError):
    """The model or the data was refused; the message says which file and why."""


@dataclass(frozen=True)
class ScoredModel:
    model: Any
    heads: tuple[str, ...]
    feature_names: tuple[str, ...]
    manifest: dict[str, Any]


# ------------------------------------------------------------------------------------------ pieces
def load_thresholds(config: str | Path | None, overrides: str | None) -> dict[str, float]:
    """Thresholds per head: defaults < scoring config YAML (``thresholds:``) < ``churn=0.4,propensity=0.6``."""
    import yaml

    out = dict(DEFAULT_THRESHOLDS)
    path = Path(config) if config else (DEFAULT_SCORING_CONFIG if DEFAULT_SCORING_CONFIG.is_file() else None)
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"scoring config {path}: cannot read it ({type(exc).__name__}: {exc})") from None
        th = data.get("thresholds", {}) if isinstance(data, dict) else None
        if not isinstance(th, dict):
            raise ConfigError(f"scoring config {path}: 'thresholds' must map head -> probability")
        out.update(th)
    if overrides:
        for item in overrides.split(","):
            head, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--thresholds {overrides!r}: write head=value pairs, e.g. churn=0.4,propensity=0.6")
            out[head.strip()] = value.strip()
    problems, clean = [], {}
    for head, v in out.items():
        if head not in DEFAULT_THRESHOLDS:
            problems.append(f"threshold for unknown head {head!r} (heads: churn, propensity)")
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            problems.append(f"threshold {head}={v!r} is not a number")
            continue
        if not 0.0 < f < 1.0:
            problems.append(f"threshold {head}={f} must be a probability strictly between 0 and 1")
        clean[head] = f
    if problems:
        raise ConfigError("invalid scoring thresholds:\n" + "\n".join(f"  - {p}" for p in problems))
    return clean


def load_signed_model(model_path: str | Path, public_key: str | Path) -> ScoredModel:
    """Verify the signature, then deserialise exactly the verified bytes (no check-then-use race)."""
    import torch

    from federation.config import ModelConfig
    from federation.models import build_model
    from federation.signing import public_key_fingerprint, read_verified_bytes

    data = read_verified_bytes(model_path, public_key)  # SignatureError / SigningKeyError name the file
    manifest = {"sha256": hashlib.sha256(data).hexdigest(), "key_fingerprint": public_key_fingerprint(public_key)}
    blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    meta = blob["meta"]
    m = meta["model"]
    cfg = ModelConfig(kind=m["kind"], hidden=list(m.get("hidden", [])), heads=m.get("heads", "two_head"))
    model = build_model(cfg, n_features=len(meta["feature_names"]), n_outputs=len(meta["heads"]))
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return ScoredModel(model, tuple(meta["heads"]), tuple(meta["feature_names"]), manifest)


def pinned_public_key(model: Path, public_key: str | Path | None, key_fingerprint: str | None) -> Path:
    """The federation public key to verify ``model`` with: only a key the partner pinned (see module doc)."""
    from federation.signing import SigningKeyError, public_key_fingerprint

    if public_key is None and not key_fingerprint:
        raise SigningKeyError(
            "no pinned federation key: pass --public-key FILE (the federation.pub you received and checked at "
            "onboarding, kept outside the model folder) or --key-fingerprint sha256:<hex>. A key lying next to "
            "the model proves nothing: whoever replaced the model could replace it too"
        )
    key = Path(public_key) if public_key is not None else Path(model).with_name("federation.pub")
    if key_fingerprint:
        got = public_key_fingerprint(key)
        if got != key_fingerprint.strip():
            raise ScoringRefused(
                f"refusing {model}: the key {key} has fingerprint {got}, not the pinned {key_fingerprint.strip()}; "
                "the model was not signed by your federation's coordinator (or you were given the wrong key)"
            )
    return key


def load_cards(model_path: Path, heads: tuple[str, ...], public_key: str | Path) -> dict[str, dict]:
    """The model cards beside the model (one per head), each verified with the pinned federation key before it is
    read: a card whoever writes the model's folder edited (to hide a contract mismatch or a calibration warning)
    is refused, not believed. A head without a card is absent from the result."""
    from federation.signing import read_verified_bytes

    cards = {}
    for head in heads:
        path = model_path.with_name(f"model_card_{head}.json")
        if not path.is_file():
            continue
        data = read_verified_bytes(path, public_key)  # SignatureError names the card
        try:
            cards[head] = json.loads(data)
        except json.JSONDecodeError:
            raise ScoringRefused(f"model card {path} is unreadable") from None
    return cards


def check_contract_matches(model_path: Path, sm: ScoredModel, contract, cards: dict[str, dict]) -> list[str]:
    """Problems if the contract does not encode what the model was trained on."""
    problems = []
    names = tuple(contract.feature_names())
    if names != sm.feature_names:
        missing = [f for f in sm.feature_names if f not in names]
        extra = [f for f in names if f not in sm.feature_names]
        problems.append(
            f"contract {contract.name!r} encodes {len(names)} features but the model expects {len(sm.feature_names)}"
            + (f"; missing {missing[:8]}" if missing else "") + (f"; unexpected {extra[:8]}" if extra else "")
            + ("; same names in another order" if not missing and not extra else ""))
    for head, card in cards.items():
        if card.get("model", {}).get("file") != model_path.name:
            continue
        dc = card.get("data_contract", {})
        want = dc.get("hash")
        if want and want != contract.contract_hash() and contract.kind == "events" and dc.get("cutoff"):
            # a model trained with data.cutoff / data.horizon_days overriding the contract's window: same encodings
            # (the window says which events are read, not how features are encoded); scoring uses its own cutoff
            try:
                trained = contract.with_events(cutoff=str(dc["cutoff"]),
                                               horizon_days=int(dc.get("horizon_days", contract.events.horizon_days)))
            except (TypeError, ValueError):
                trained = contract
            if trained.contract_hash() == want:
                break
        if want and want != contract.contract_hash():
            problems.append(
                f"contract {contract.name!r} has hash {contract.contract_hash()[:12]}, but the model card "
                f"model_card_{head}.json says the model was trained under {card['data_contract'].get('name', '?')!r} "
                f"hash {want[:12]}: bounds or vocabularies differ, so features would be encoded differently; use the "
                "federation's contract")
        break
    return problems


def score_column(head: str) -> str:
    return "churn_probability" if head == "churn" else "propensity_score"


ECE_WARN = 0.05  # expected calibration error above which a probability is not to be read as one


def calibration_warnings(heads: tuple[str, ...], cards: dict[str, dict]) -> list[str]:
    """One line per head whose released probabilities are not known to be calibrated: the model card's DP
    evaluation measured an ECE above ECE_WARN, could not measure it (noise), or there is no card.
    fedprop does not recalibrate released models (see README: DP recalibration is measured, not applied)."""
    out = []
    for head in heads:
        m = cards.get(head, {}).get("metrics", {})
        ece, hw = m.get("ece"), m.get("ece_half_width")
        use = (f"use the deciles and segments for ranking, and do not read {score_column(head)} as a rate")
        if not isinstance(ece, (int, float)) or ece != ece:
            out.append(f"{head}: calibration unknown (no evaluation in model_card_{head}.json); {use}")
        elif not m.get("ece_meaningful", True):
            out.append(f"{head}: calibration not measurable (DP evaluation noise +-{hw:.3f}); {use}")
        elif ece > ECE_WARN:
            base = m.get("base_rate")
            out.append(f"{head}: probabilities are not calibrated: the federation's evaluation measured ECE {ece:.3f}"
                       + (f" +-{hw:.3f}" if isinstance(hw, (int, float)) else "")
                       + (f" against a base rate of {base:.3f}" if isinstance(base, (int, float)) else "") + f"; {use}")
    return out


def score_frame(sm: ScoredModel, X: np.ndarray, customer_ids: np.ndarray, thresholds: dict[str, float],
                personalised=None) -> pd.DataFrame:
    """Per customer: score per head, decile per head (1 = top 10%), segment. ``personalised``: the partner's
    ``PersonalisedModel`` (derived from ``sm``), used instead of the global model."""
    import torch

    from federation.models import predict_proba

    Xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    P = personalised.predict_proba(Xt) if personalised is not None else predict_proba(sm.model, Xt).numpy()
    out = pd.DataFrame({"customer_id": np.asarray(customer_ids).astype(str)})
    flags = {}
    for j, head in enumerate(sm.heads):
        col = score_column(head)
        p = P[:, j].astype(np.float64)
        out[col] = p
        out[f"{head}_decile"] = deciles(p)
        flags[head] = p >= thresholds[head]
    churn = flags.get("churn", np.zeros(len(out), bool))
    prop = flags.get("propensity", np.zeros(len(out), bool))
    seg = np.where(churn & prop, SEGMENTS[0], np.where(churn, SEGMENTS[1], np.where(prop, SEGMENTS[2], SEGMENTS[3])))
    out["segment"] = pd.Categorical(seg, categories=list(SEGMENTS))
    return out


def deciles(p: np.ndarray) -> np.ndarray:
    """Decile 1 holds the highest 10% of scores, 10 the lowest (ties broken by position, stable)."""
    n = len(p)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-p, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return (rank * 10 // n + 1).astype(np.int64)


def write_scores(frame: pd.DataFrame, out: str | Path) -> Path:
    from federation.atomicio import atomic_write_bytes

    out = Path(out)
    name = out.name.lower()
    buf = io.BytesIO()
    if name.endswith((".parquet", ".pq")):
        frame.to_parquet(buf, index=False)
    elif name.endswith(".csv"):
        frame.to_csv(buf, index=False, float_format="%.6f")
    else:
        raise ConfigError(f"--out {out}: use a .csv or .parquet file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(out, buf.getvalue(), mode=0o600)  # customer-level scores: owner only


# --------------------------------------------------------------------------------------- the command
def score(*, model: str | Path, data: str | Path, contract: str | Path, out: str | Path,
          public_key: str | Path | None = None, thresholds: dict[str, float] | None = None,
          cutoff: str | None = None, key_fingerprint: str | None = None,
          personalised: str | Path | None = None) -> dict[str, Any]:
    """Verify, validate, score, write; return a small summary. Raises FedpropError subclasses on refusal.
    ``personalised``: a folder written by `fedprop personalise` from this very global model (checked by its
    SHA-256 and the contract hash); its model scores instead of the global one."""
    from federation.contract import build_features, load_contract
    from federation.validation import read_validated

    model = Path(model)
    if str(out) and Path(out).name.lower().rsplit(".", 1)[-1] not in ("csv", "parquet", "pq"):
        raise ConfigError(f"--out {out}: use a .csv or .parquet file name")
    th = thresholds or dict(DEFAULT_THRESHOLDS)
    key = pinned_public_key(model, public_key, key_fingerprint)
    sm = load_signed_model(model, key)
    c = load_contract(contract)
    if cutoff:
        if c.kind != "events":
            raise ConfigError(f"--cutoff applies to event logs; contract {c.name!r} is a customer table")
        when = pd.Timestamp.now().normalize() if cutoff == "today" else pd.Timestamp(cutoff)
        hash_contract = c
        c = c.with_events(cutoff=str(when.date()))
    else:
        hash_contract = c
    cards = load_cards(model, tuple(sm.heads), key)
    problems = check_contract_matches(model, sm, hash_contract, cards)
    if problems:
        raise ScoringRefused(f"refusing to score {data} with {model}:\n" + "\n".join(f"  - {p}" for p in problems))
    pm = None
    if personalised is not None:
        from clients.personal_store import PersonalisedModelError, load as load_personalised

        try:
            pm, _ = load_personalised(personalised, sm.model, global_sha256=sm.manifest["sha256"],
                                      contract_hash=hash_contract.contract_hash(), feature_names=sm.feature_names,
                                      heads=tuple(sm.heads))
        except PersonalisedModelError as exc:
            raise ScoringRefused(str(exc)) from None
    from federation.errors import DataValidationError

    try:
        v = read_validated(c, str(data), labels=False, min_customers=1)
    except DataValidationError as exc:
        if c.kind == "events" and any(p.code in ("too_few_customers", "no_rows") for p in exc.problems):
            raise ScoringRefused(  # the training-time advice (delta, DP noise) means nothing when scoring
                f"nobody to score in {data} at cutoff {c.events.cutoff}: no customer has an activity event in the "
                f"{c.events.lookback_days} days before it (the log may end earlier); score at a day the log covers "
                "(--cutoff YYYY-MM-DD). Nothing was written.") from None
        raise
    frame = v.frame
    if c.kind == "table" and "__label" not in frame:
        frame = frame.assign(__label=np.zeros(len(frame), np.float32))  # labels are not used for scoring
    fs = build_features(frame, c)
    if tuple(fs.feature_names) != sm.feature_names:
        raise ScoringRefused(f"features built from {data} do not match the model's ({len(fs.feature_names)} vs "
                             f"{len(sm.feature_names)}); the contract and the model disagree")
    scores = score_frame(sm, fs.X, fs.customer_ids, th, personalised=pm)
    # every customer id in the log counts (the validation report's population is only those active in the window)
    in_data = int(frame["__cid"].nunique()) if c.kind == "events" and "__cid" in frame else int(v.report.customers)
    path = write_scores(scores, out)
    possible = [g for g in SEGMENTS if ("churn" in sm.heads or "churn" not in g and g != "both")
                and ("propensity" in sm.heads or "propensity" not in g and g != "both")]  # a one-head model: 2
    counts = scores["segment"].value_counts().reindex(possible, fill_value=0)
    return {"out": str(path), "customers": len(scores), "heads": list(sm.heads), "thresholds": th,
            "segments": {k: int(n) for k, n in counts.items()}, "model_sha256": sm.manifest["sha256"],
            "key_fingerprint": sm.manifest["key_fingerprint"], "cutoff": c.events.cutoff if c.kind == "events" else None,
            "validation": v.report.summary(), "customers_in_data": in_data,
            "skipped": max(0, in_data - len(scores)), "rows_read": int(v.report.rows_read),
            "rows_used": int(v.report.rows_used),
            "models": ({h: d + (f" (out-of-fold ECE {pm.choices[h].ece:.3f} on your customers)"
                                if pm.choices[h].ece == pm.choices[h].ece else "")
                        for h, d in pm.describe().items()} if pm is not None else {h: "global" for h in sm.heads}),
            "warnings": calibration_warnings(tuple(h for h in sm.heads if pm is None or (pm.choices[h].kind == "global" and (
                pm.choices[h].platt_a, pm.choices[h].platt_b) == (1.0, 0.0))),
                                             cards) + personalised_warnings(pm)}


def personalised_warnings(pm) -> list[str]:
    """A personalised head's probabilities are not the global model's, so the card's calibration says nothing
    about them; blends and stacking are not calibrated by construction."""
    if pm is None:
        return []
    out = []
    for h, d in pm.describe().items():
        c = pm.choices[h]
        if c.kind == "global" and (c.platt_a, c.platt_b) == (1.0, 0.0):
            continue  # the global model as released: the model card's warning applies
        if c.ece == c.ece and c.ece <= ECE_WARN:
            continue  # calibrated on this partner's own customers (fedprop personalise measured it)
        what = (f"its out-of-fold ECE on your customers was {c.ece:.3f}" if c.ece == c.ece else
                "its calibration was not measured (too few positives to validate)")
        out.append(f"{h}: personalised ({d}): {what}; use the deciles and segments for ranking, and do not read "
                   f"{score_column(h)} as a rate")
    return out


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("score", help="score your customers with the signed global model, on this node")
    p.add_argument("--model", required=True, help="model_<heads>.pt (its .sig must sit next to it)")
    p.add_argument("--data", required=True, help="your customer data (CSV/Parquet/...) as the contract describes")
    p.add_argument("--contract", required=True, help="the federation's data contract YAML")
    p.add_argument("--out", required=True, help="scores file: .csv or .parquet (written atomically, mode 0600)")
    p.add_argument("--public-key", default=None,
                   help="the federation public key you pinned at onboarding (never the copy next to the model)")
    p.add_argument("--key-fingerprint", default=None,
                   help="pinned fingerprint sha256:<hex> of the federation key (fedprop prints it at release); "
                   "without --public-key, federation.pub next to the model is used only if it matches")
    p.add_argument("--thresholds", default=None, help="segment thresholds, e.g. churn=0.4,propensity=0.6 "
                   "(default: conf/scoring.yaml)")
    p.add_argument("--scoring-config", default=None, help="YAML with thresholds: {churn: P, propensity: P}")
    p.add_argument("--cutoff", default=None, help="event logs: score at this date (YYYY-MM-DD or 'today'); "
                   "default: the contract's cutoff")
    p.add_argument("--personalised", default=None, metavar="DIR",
                   help="score with your personalised model (written by `fedprop personalise` from this global "
                   "model) instead of the global one")
    p.set_defaults(func=_cmd)
    return p


def _cmd(args) -> int:
    from federation.signing import SignatureError

    try:
        th = load_thresholds(args.scoring_config, args.thresholds)
        result = score(model=args.model, data=args.data, contract=args.contract, out=args.out,
                       public_key=args.public_key, thresholds=th, cutoff=args.cutoff,
                       key_fingerprint=args.key_fingerprint, personalised=args.personalised)
    except (SignatureError, ScoringRefused) as exc:
        print(f"fedprop score: REFUSED: {exc}", file=sys.stderr)
        return 1
    except DataValidationError as exc:
        print(f"fedprop score: REFUSED: {args.data} does not satisfy the contract {args.contract}:\n{exc}\n"
              "Nothing was scored or written.", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"fedprop score: {exc}", file=sys.stderr)
        return 2
    except FedpropError as exc:  # e.g. SigningKeyError: missing/invalid public key
        print(f"fedprop score: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # unreadable input or unwritable output: one clear line, no traceback
        print(f"fedprop score: failed scoring {args.data} into {args.out}: {type(exc).__name__}: {exc}; "
              "nothing was written", file=sys.stderr)
        return 1
    seg = ", ".join(f"{k}: {n}" for k, n in result["segments"].items())
    print(f"scored {result['customers']} customers ({', '.join(result['heads'])}) -> {result['out']}\n"
          f"  segments: {seg}\n  thresholds: {result['thresholds']}; model sha256 {result['model_sha256'][:12]}, "
          f"key {result['key_fingerprint'][:19]}" + (f"; cutoff {result['cutoff']}" if result["cutoff"] else "")
          + "\n  models: " + ", ".join(f"{h}: {d}" for h, d in result["models"].items()))
    for w in result["warnings"]:
        print(f"  WARNING: {w}", file=sys.stderr)
    if result["skipped"] or result["rows_used"] < result["rows_read"]:
        why = ("customers with no activity event in the contract's lookback window before the cutoff have no "
               "features at that date" if result["cutoff"] else "rows the contract's validation set aside (see the "
               "notes below)")
        print(f"  skipped: {result['skipped']} of {result['customers_in_data']} customers, "
              f"{result['rows_read'] - result['rows_used']} of {result['rows_read']} rows not used ({why})\n"
              + "\n".join(f"  {line}" for line in result["validation"].splitlines()[1:]))
    return 0
