"""`fedprop personalise`: a partner derives its own model from the federation's global model and its own
labelled customers, on its node; `fedprop score --personalised DIR` then scores with it.

    fedprop personalise --model model_churn+propensity.pt --public-key federation.pub \
        --data customers.csv --contract contracts/x.yaml --out personal/

1. The global model is verified exactly as `fedprop score` verifies it (pinned key, signed model cards, the
   contract the model was trained under).
2. The data are validated with labels (event logs: labels at the contract's cutoff, so the horizon after it must
   be in the file), through the same engine a training node uses.
3. Per head, ``clients.personalize.personalise`` chooses by 5-fold cross-validated AUC on these customers among
   the partner's own non-private model (best of tuned logistic regression and HistGradientBoosting), the global
   model, blends of the two, fine-tuning and stacking (local-only is a candidate, so it never picks a model
   that validates worse than the partner's own).
4. The result is written to ``--out`` (``clients.personal_store``: no pickle; mode 0600), with the SHA-256 of
   the global model it came from: `fedprop score` refuses it next to any other global model.

Privacy: nothing is sent anywhere and nothing is spent from the budget; the personalised model is NOT
differentially private (it is fitted on raw customer data) and must stay on the node like the data itself.
Exit codes: 0 written, 1 refused (signature, data), 2 unusable inputs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from federation.errors import ConfigError, DataValidationError, FedpropError

DEFAULT_SEED = 0  # model-selection folds and fine-tuning order; not privacy randomness (nothing is released)
MAX_SEED = 2**32 - 1  # HistGradientBoosting's random_state bound


def _labelled_features(contract, data: str):
    """The node's labelled FeatureSet, as a training node builds it."""
    from federation.contract import build_features
    from federation.validation import read_validated

    if contract.kind == "events":
        from federation.engine_duckdb import default_settings, read_event_features

        return read_event_features(contract, str(data), settings=default_settings()).features
    return build_features(read_validated(contract, str(data)).frame, contract)


def personalise_node(*, model: str | Path, data: str | Path, contract: str | Path, out: str | Path,
                     public_key: str | Path | None = None, key_fingerprint: str | None = None,
                     seed: int = DEFAULT_SEED, progress=None) -> dict[str, Any]:
    import torch

    from clients.personal_store import PersonalisedModelError, check_out_dir, save
    from clients.personalize import personalise
    from clients.score import ScoringRefused, check_contract_matches, load_cards, load_signed_model, pinned_public_key
    from federation.contract import load_contract

    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed {seed}: use an integer from 0 to {MAX_SEED} (scikit-learn's random_state range)")
    try:  # before minutes of work: a confused --out (a file, `.`, a home folder) is refused up front
        check_out_dir(out)
    except PersonalisedModelError as exc:
        raise ConfigError(str(exc)) from None
    model = Path(model)
    key = pinned_public_key(model, public_key, key_fingerprint)
    sm = load_signed_model(model, key)
    c = load_contract(contract)
    cards = load_cards(model, tuple(sm.heads), key)
    problems = check_contract_matches(model, sm, c, cards)
    if problems:
        raise ScoringRefused(f"refusing to personalise {model} on {data}:\n" + "\n".join(f"  - {p}" for p in problems))
    say = progress or (lambda msg: None)
    say(f"validating {data} and building labelled features")
    fs = _labelled_features(c, str(data))
    if tuple(fs.feature_names) != sm.feature_names:
        raise ScoringRefused(f"features built from {data} do not match the model's; the contract and the model disagree")
    heads = tuple(sm.heads)
    missing = [h for h in heads if h not in fs.y]
    # a head this data has no label for keeps the global model (a zero column makes personalise choose it)
    Y = np.stack([fs.y[h] if h in fs.y else np.zeros(len(fs), np.float32) for h in heads], axis=1).astype(np.float32)
    say(f"choosing a personalised model per head on {len(fs)} customers (5-fold cross-validation)")
    t0 = time.perf_counter()
    pm = personalise(sm.model, torch.from_numpy(np.ascontiguousarray(fs.X, dtype=np.float32)), torch.from_numpy(Y),
                     heads=heads, seed=seed)
    for h in missing:
        from clients.personalize import HeadChoice

        pm.choices[h] = HeadChoice("global")
    path = save(pm, out, global_sha256=sm.manifest["sha256"], key_fingerprint=sm.manifest["key_fingerprint"],
                contract_name=c.name, contract_hash=c.contract_hash(), feature_names=sm.feature_names,
                customers=len(fs), seed=seed)
    heads_out = {}
    for j, h in enumerate(heads):
        ch = pm.choices[h]
        pos = int(Y[:, j].sum())
        heads_out[h] = {"model": pm.describe()[h], "validation_auc": ch.validation_auc,
                        "local_validation_auc": ch.local_validation_auc, "ece": ch.ece,
                        "ece_uncalibrated": ch.ece_uncalibrated,
                        "why_global": ("no label for this head in the data" if h in missing else
                                       "too few positives or negatives to compare models by cross-validation"
                                       if ch.kind == "global" and ch.validation_auc != ch.validation_auc else "")}
        heads_out[h]["positives"], heads_out[h]["negatives"] = pos, len(fs) - pos
    return {"out": str(path), "customers": len(fs), "heads": heads_out, "seconds": time.perf_counter() - t0,
            "model_sha256": sm.manifest["sha256"]}


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("personalise", help="derive this partner's own model from the signed global model and "
                              "its labelled customers (stays on the node; `fedprop score --personalised DIR` uses it)")
    p.add_argument("--model", required=True, help="model_<heads>.pt (its .sig must sit next to it)")
    p.add_argument("--data", required=True, help="your labelled customer data, as the contract describes")
    p.add_argument("--contract", required=True, help="the federation's data contract YAML")
    p.add_argument("--out", required=True, help="a new folder for the personalised model, or one an earlier "
                   "`fedprop personalise` wrote (mode 0700); a folder holding other files is refused")
    p.add_argument("--public-key", default=None, help="the federation public key you pinned at onboarding")
    p.add_argument("--key-fingerprint", default=None, help="pinned fingerprint sha256:<hex> of the federation key")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help="cross-validation folds and fine-tuning order (model selection only; not privacy randomness)")
    p.set_defaults(func=_cmd)
    return p


def _cmd(args) -> int:
    from clients.personal_store import PersonalisedModelError
    from clients.score import ScoringRefused
    from federation.signing import SignatureError

    def progress(msg: str) -> None:
        print(f"fedprop personalise: {msg} ...", file=sys.stderr, flush=True)

    try:
        r = personalise_node(model=args.model, data=args.data, contract=args.contract, out=args.out,
                             public_key=args.public_key, key_fingerprint=args.key_fingerprint, seed=args.seed,
                             progress=progress)
    except (SignatureError, ScoringRefused) as exc:
        print(f"fedprop personalise: REFUSED: {exc}", file=sys.stderr)
        return 1
    except DataValidationError as exc:
        print(f"fedprop personalise: REFUSED: {args.data} does not satisfy the contract {args.contract}:\n{exc}\n"
              "Nothing was written.", file=sys.stderr)
        return 1
    except PersonalisedModelError as exc:
        print(f"fedprop personalise: {exc}", file=sys.stderr)
        return 1
    except FedpropError as exc:  # ConfigError, SigningKeyError
        print(f"fedprop personalise: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"fedprop personalise: failed ({type(exc).__name__}: {exc}) reading {args.data} or writing {args.out}; "
              f"{args.out} was left as it was", file=sys.stderr)
        return 1
    print(f"personalised model for {r['customers']} customers -> {r['out']} ({r['seconds']:.0f} s; from global model "
          f"sha256 {r['model_sha256'][:12]})")
    for h, e in r["heads"].items():
        auc = ("" if e["validation_auc"] != e["validation_auc"] else
               f": cross-validated AUC {e['validation_auc']:.3f} (your local-only model {e['local_validation_auc']:.3f})")
        if e["ece"] == e["ece"]:
            auc += (f"; out-of-fold ECE {e['ece']:.3f}" + (f" (before calibration {e['ece_uncalibrated']:.3f})"
                                                           if e["ece"] != e["ece_uncalibrated"] else ""))
        print(f"  {h}: {e['model']}{auc}; {e['positives']} positives, {e['negatives']} negatives"
              + (f" ({e['why_global']})" if e["why_global"] else ""))
    print("  NOT a DP release: it is fitted on your raw customers; keep it on this node. "
          "Score with: fedprop score ... --personalised " + str(Path(r["out"]).parent))
    return 0
