"""Releasing a final global model: sign it with the server's Ed25519 key and write its model cards.

For every final model ``model_<tag>.pt`` in a run directory the server

* signs it (``model_<tag>.pt.sig``, :mod:`federation.signing`) with the key in ``release.key_dir``
  (``server.key``, mode 0600, in a 0700 directory; created on first use and kept across runs), and copies
  the public key into the run directory as ``federation.pub``: the file partners verify models against;
* writes one model card per head, ``model_card_<head>.json`` / ``.md`` (head names are unique within a run),
  each signed too: task, feature names and data-contract hash, rounds, number of partners (a count only),
  the metrics pooled from partners' evaluation histograms of the last round (incl. gains/lift and the
  reliability curve), and the privacy guarantee each partner's customers received for this model (the
  partner's final cumulative epsilon from its last training reply, delta, accountant, unit customer).

The data-contract hash is the hash of the contract the model was trained under (with the run's cutoff and
horizon for event logs); for the synthetic default it is ``conf/contracts/synthetic_events.yaml``, which
describes exactly the synthetic features, so ``fedprop score`` can check a partner's contract against it.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from federation.atomicio import atomic_write_bytes
from federation.config import FedpropConfig, config_hash
from federation.contract import DataContract, load_contract
from federation.errors import FedpropError
from federation.modelcard import PrivacyGuarantee, build_model_card, write_model_card
from federation.signing import SigningKeyError, generate_keypair, public_key_fingerprint, sign_file

PRIVATE_KEY = "server.key"
PUBLIC_KEY = "server.pub"
RUN_PUBLIC_KEY = "federation.pub"
SYNTHETIC_CONTRACT = "contracts/synthetic_events.yaml"



def ensure_server_key(key_dir: str | Path) -> tuple[Path, Path]:
    """The server's signing key pair in ``key_dir`` (created on first use); returns (private, public)."""
    d = Path(key_dir)
    priv, pub = d / PRIVATE_KEY, d / PUBLIC_KEY
    if priv.exists() != pub.exists():
        raise SigningKeyError(
            f"the server key directory {d} holds only one of {PRIVATE_KEY}/{PUBLIC_KEY}; restore the missing "
            "file (partners verify models against the public key) or remove both to start a new key")
    if not priv.exists():
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        try:
            generate_keypair(priv, pub)
        except SigningKeyError:  # another process created it in between: use theirs
            if not (priv.exists() and pub.exists()):
                raise
    return priv, pub


def training_contract(cfg: FedpropConfig) -> DataContract:
    """The data contract the model was trained under (event logs: with the run's cutoff and horizon)."""
    d = cfg.data
    c = load_contract(SYNTHETIC_CONTRACT if d.kind == "synthetic" else d.contract)
    if c.kind == "events" and d.kind == "synthetic":  # the generator's dates (the contract's are its defaults)
        from simulations.synthetic import synthetic_dates

        cut, hor = synthetic_dates(d)
        c = c.with_events(cutoff=cut, horizon_days=hor)
    elif c.kind == "events":
        c = c.with_events(cutoff=str(d.cutoff) if d.cutoff else c.events.cutoff,
                          horizon_days=int(d.horizon_days) or c.events.horizon_days)
    return c


def privacy_guarantees(cfg: FedpropConfig, rounds: Sequence[Mapping[str, Any]]) -> list[PrivacyGuarantee]:
    """Per partner that trained with DP: its cumulative epsilon after its last training round."""
    if not cfg.privacy.enabled:
        return []
    last: dict[str, tuple[float, float]] = {}
    for rec in rounds:
        for pid, p in rec.get("partners", {}).items():
            tr = p.get("train") or {}
            if tr.get("epsilon") is not None:
                eps = tr.get("epsilon-with-evaluation", tr["epsilon"])  # the model is evaluated after training
                last[pid] = (float(eps), float(tr.get("delta", cfg.privacy.delta)))
            elif tr.get("in-secure-sum") and pid not in last:
                # secure aggregation: the server never sees a partner's own figure; each node enforced its target
                last[pid] = (float(cfg.privacy.epsilon), float(cfg.privacy.delta))
    named = {k: v for k, v in last.items() if not k.startswith("node-")}
    if named and len(last) > cfg.partners:  # secure rounds before the evaluated one know partners only by node id
        last = named
    return [PrivacyGuarantee(partner=f"partner-{pid}" if pid.isdigit() else pid, epsilon=eps,
                             delta=delta, accountant=cfg.privacy.accountant, unit="customer")
            for pid, (eps, delta) in sorted(last.items(), key=lambda kv: kv[0]) if eps > 0]


def evaluation_mechanism(cfg: FedpropConfig) -> dict[str, Any] | None:
    """What the model card says about the evaluation release (None: exact histograms of a non-private run)."""
    if not (cfg.privacy.enabled and cfg.evaluation.enabled):
        return None
    return {"kind": "discrete_gaussian", "release": "evaluation_counts", "unit": "customer", "bins": cfg.evaluation.bins,
            "epsilon": float(cfg.privacy.epsilon), "delta": float(cfg.privacy.delta),
            "epsilon_share": float(cfg.evaluation.epsilon_share), "scope": "training and evaluation composed"}


def release_model(
    run_dir: str | Path,
    cfg: FedpropConfig,
    *,
    tag: str,
    heads: Sequence[str],
    feature_names: Sequence[str],
    rounds: Sequence[Mapping[str, Any]],
    pooled: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """Sign ``run_dir/model_<tag>.pt``, write and sign its model cards; return what was released."""
    run_dir = Path(run_dir)
    model = run_dir / f"model_{tag}.pt"
    if not model.is_file():
        raise FedpropError(f"cannot release {model}: the final model was not saved")
    priv, pub = ensure_server_key(cfg.release.key_dir)
    sig = sign_file(model, priv)
    atomic_write_bytes(run_dir / RUN_PUBLIC_KEY, pub.read_bytes())
    contract = training_contract(cfg)
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    privacy = privacy_guarantees(cfg, rounds)
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    cards = []
    for j, head in enumerate(heads):
        card = build_model_card(
            task=head, model_kind=cfg.model.kind, feature_names=list(feature_names),
            contract_hash=contract.contract_hash(), rounds=cfg.rounds, num_partners=cfg.partners,
            metrics=dict(pooled.get(head, {})), privacy=privacy, model_file=model.name, model_sha256=sha,
            created_at=now, evaluation_mechanism=evaluation_mechanism(cfg),
            reproducible_noise=cfg.privacy.enabled and cfg.privacy.noise == "reproducible",
        )
        card["data_contract"]["name"] = contract.name
        if contract.kind == "events":
            card["data_contract"]["cutoff"] = contract.events.cutoff
            card["data_contract"]["horizon_days"] = contract.events.horizon_days
        card["model"].update({"heads": list(heads), "output": j, "config_hash": config_hash(cfg),
                              "signature": sig.name, "key_fingerprint": public_key_fingerprint(pub)})
        json_path, md_path = write_model_card(card, run_dir, stem=f"model_card_{head}")
        sign_file(json_path, priv)
        cards.append(json_path.name)
    return {"model": model.name, "signature": sig.name, "public_key": RUN_PUBLIC_KEY, "cards": cards}

