"""A partner node's privacy ledger and budget policy, as plain functions (no Flower).

The ClientApp calls, in this order, for each federation (``heads``) of a run:

1. ``resolve_node_ledger(cfg, node_config)`` -- where this node's ledger, signing key and policy live;
2. ``preflight(...)`` once, at the node's first train message of the run: the planned spend of the WHOLE
   run (``rounds`` x ``PoissonSampledGaussian(q, sigma, steps)``) composed with what the ledger already
   holds in the policy's current period is checked against the policy (``policy.check_run``). A refused
   run is recorded as a ``refusal`` entry and raises ``BudgetExceededError`` / ``PolicyViolationError``
   whose message states the numbers; an allowed run is recorded as ``run_start``;
3. ``round_reservation(...)`` before every round's training: in ONE ledger transaction the round's
   mechanism is checked against the remaining budget (``policy.check_round``, re-reading the policy file, so a
   concurrent run in another federation or a tightened policy stops the partner mid-run) and its spend is
   reserved. Refusals are recorded. A reservation left open (process killed) counts as spent;
4. the node trains, then ``commit_round(...)`` BEFORE the update is handed back to Flower: the reservation
   becomes one ``dpsgd_round`` entry, committed with ``synchronous=FULL`` when it returns. If training or the
   commit raises, the reservation is released and the caller must not release the update.

What "before touching data" means here: the sampling rate q = batch_size / n_train needs the count of
training customers, so the node has loaded and split its table when ``preflight`` runs (the count is all
the check uses). No gradient has been computed, no model trained and nothing has left the node: a refused
run releases nothing but the refusal reason (which states q, and hence n_train, already reported to the
server as ``num-examples`` by every participating node).

Where things live:

* Simulation: ``<privacy.ledger_dir>/<data.name>/<partner>.sqlite`` (``privacy.ledger_dir`` defaults to
  ``<run_dir>/ledgers``: one set of ledgers per run; a shared folder simulates a partner's year), key
  ``<privacy.ledger_dir>-keys/<data.name>/<partner>.key`` (+ ``.pub``), never in the ledger's folder; policy
  ``privacy.policy``, else the default policy.
* Deployment node config (``flower-supernode --node-config``): ``ledger-path`` and ``node-key`` (Ed25519 private
  key PEM, outside the ledger's folder) are REQUIRED, ``budget-policy`` (policy YAML) defaults to fedprop's
  default policy; nothing in the coordinator's run config (``privacy.ledger_dir``, ``privacy.policy``) is read:
  the partner's ledger and policy are the partner's to set.

A simulation key is generated on first use (mode 0600, never overwritten); a deployment key must exist.
"""
from __future__ import annotations

import functools
import hashlib
from contextlib import contextmanager
from typing import Iterator
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from federation.config import FedpropConfig
from federation.errors import ConfigError, PrivacyError
from federation.privacy.events import PoissonSampledGaussian
from federation.privacy.ledger import Ledger, LedgerEntry, Reservation, generate_node_key, open_node_ledger
from federation.privacy.policy import BudgetCheck, BudgetPolicy, check_run, default_policy, load_policy

__all__ = [
    "NodeLedger",
    "resolve_node_ledger",
    "open_ledger",
    "load_node_policy",
    "round_event",
    "preflight",
    "round_reservation",
    "commit_round",
    "record_refusal",
    "update_hash",
    "opacus_round_epsilon",
    "NODE_CONFIG_KEYS",
]

NODE_CONFIG_KEYS = ("ledger-path", "node-key", "budget-policy", "partner")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class NodeLedger:
    """Where a partner node's ledger, signing key and budget policy live."""

    partner: str
    ledger_path: Path
    key_path: Path
    policy_path: Path | None  # None: the fedprop default policy (federation.privacy.policy.default_policy)
    key_explicit: bool = False  # given in the node config: must exist (a typo must not mint a new identity)

    @property
    def public_key_path(self) -> Path:
        return Path(str(self.key_path) + ".pub")


def partner_name(node_config: Mapping[str, Any]) -> str:
    """The partner's name: node config ``partner`` (set at onboarding), else ``partner-<partition-id>``."""
    name = str(node_config.get("partner") or f"partner-{int(node_config.get('partition-id', 0))}")
    if not _NAME.match(name):
        raise ConfigError(f"node config partner={name!r}: use 1-64 letters, digits, '_', '.', '-' (it names files)")
    return name


def resolve_node_ledger(cfg: FedpropConfig, node_config: Mapping[str, Any], *, deployment: bool = False) -> NodeLedger:
    """Where this node's ledger, key and policy live.

    Deployment (``deployment=True``: the run config comes from the coordinator): ONLY the node config counts.
    ``ledger-path`` and ``node-key`` are required (a missing one is a refusal at the first message, not a fresh
    ledger somewhere), the key must not sit in the ledger's folder, and ``budget-policy`` defaults to fedprop's
    default policy (never to the run config's ``privacy.policy``).

    Simulation (the data team's own typed config): ``<privacy.ledger_dir>/<data.name>/<partner>.sqlite``, the key
    in the sibling folder ``<privacy.ledger_dir>-keys/<data.name>/<partner>.key``, policy ``privacy.policy`` (else
    the default policy)."""
    partner = partner_name(node_config)
    if deployment:
        missing = [k for k in ("ledger-path", "node-key") if not node_config.get(k)]
        if missing:
            raise ConfigError(
                f"node config {' and '.join(missing)} not set: in a deployment the partner's ledger and its signing key "
                "are named in the node's own --node-config, never by the coordinator's run config; e.g. "
                "ledger-path='/var/lib/fedprop/ledger.sqlite' node-key='/etc/fedprop/keys/ledger.key' "
                "(create the key with `fedprop certs ledger-key`)")
        ledger_path, key_path = Path(str(node_config["ledger-path"])), Path(str(node_config["node-key"]))
        folder = ledger_path.resolve().parent
        if key_path.resolve().parent == folder or folder in key_path.resolve().parents:  # also a subfolder of it
            raise ConfigError(
                f"node config node-key={str(key_path)!r} lies in the ledger's folder (or below it): keep the ledger's signing key in "
                "the node's key directory (0700), so that whoever can write the ledger's folder cannot re-sign it")
        policy = str(node_config.get("budget-policy") or "")
        return NodeLedger(partner, ledger_path, key_path, Path(policy) if policy else None, True)
    if not cfg.privacy.ledger_dir and not node_config.get("ledger-path"):
        raise ConfigError("privacy.ledger_dir is empty: a simulation sets it to <run_dir>/ledgers (prepare_ledgers)")
    base = Path(cfg.privacy.ledger_dir)
    # One ledger per (dataset, partner): partner-0 of telco_churn is not partner-0 of bank_marketing.
    ledger_path = Path(str(node_config["ledger-path"])) if node_config.get("ledger-path") else (
        base / cfg.data.name / f"{partner}.sqlite")
    explicit = bool(node_config.get("node-key"))
    key_path = (Path(str(node_config["node-key"])) if explicit
                else base.parent / f"{base.name}-keys" / cfg.data.name / f"{partner}.key")
    policy = str(node_config.get("budget-policy") or cfg.privacy.policy or "")
    return NodeLedger(partner, ledger_path, key_path, Path(policy) if policy else None, explicit)


def _ensure_key(node: NodeLedger) -> None:
    if node.key_path.exists():
        return
    if node.key_explicit:
        raise ConfigError(
            f"node config node-key={str(node.key_path)!r} does not exist; create it with `fedprop certs ledger-key` "
            "or leave node-key unset to generate one next to the ledger"
        )
    node.key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        generate_node_key(node.key_path)
    except PrivacyError:
        if not node.key_path.exists():  # lost a creation race: the other process's key is used
            raise


def open_ledger(node: NodeLedger) -> Ledger:
    """Open for appending, failing closed (``open_node_ledger``): a node whose key already has a ledger identity
    refuses a missing ledger (deleted, unmounted, mistyped ``ledger-path``) instead of starting at zero; the
    explicit reset is ``fedprop budget init --reason``. Creates the simulation key on first use."""
    node.ledger_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _ensure_key(node)
    return open_node_ledger(node.ledger_path, key_path=node.key_path)


def load_node_policy(node: NodeLedger) -> BudgetPolicy:
    """The node's policy file, else fedprop's default policy (a lifetime and a monthly cap). "Record only" is
    never a default: it is a policy file with ``record_only: true``."""
    return default_policy() if node.policy_path is None else load_policy(node.policy_path)


def round_event(*, sampling_rate: float, noise_multiplier: float, steps: int) -> PoissonSampledGaussian:
    """One DP-SGD round at this partner, as the mechanism record the ledger stores."""
    return PoissonSampledGaussian(sampling_rate=sampling_rate, noise_multiplier=noise_multiplier, steps=steps)


def _spent(ledger: Ledger, node: NodeLedger, policy: BudgetPolicy) -> list:
    return ledger.events(partner=node.partner, layer="customer", period=policy.period)


def _lifetime(ledger: Ledger, node: NodeLedger) -> list:
    """Every customer-level release this ledger ever recorded (the policy's lifetime cap)."""
    return ledger.events(partner=node.partner, layer="customer")


def record_refusal(
    node: NodeLedger, *, run_id: str, round: int | None, reason: str, extra: Mapping[str, Any] | None = None
) -> LedgerEntry:
    with open_ledger(node) as ledger:
        return ledger.append(
            kind="refusal", partner=node.partner, run_id=run_id, round=round,
            extra={"scope": "run" if round is None else "round", "reason": reason, **(extra or {})},
        )


def preflight(
    node: NodeLedger,
    *,
    run_id: str,
    sampling_rate: float,
    noise_multiplier: float,
    steps_per_round: int,
    rounds: int,
    delta: float,
    clipping_norm: float,
    config_hash: str,
    extra: Mapping[str, Any] | None = None,
    planned_extra: list | None = None,
) -> BudgetCheck | None:
    """Check the whole run's planned spend against the policy and the ledger; record run_start or refusal.

    ``planned_extra``: further mechanisms the run will release (e.g. its evaluation releases), checked too.

    Returns the policy check (None without a policy). Raises BudgetExceededError / PolicyViolationError
    (after recording a ``refusal`` entry) when the run is refused."""
    event = round_event(sampling_rate=sampling_rate, noise_multiplier=noise_multiplier, steps=steps_per_round)
    policy = load_node_policy(node)
    plan = {
        "planned_rounds": rounds, "sampling_rate": sampling_rate, "noise_multiplier": noise_multiplier,
        "steps_per_round": steps_per_round, "delta": delta, "clipping_norm": clipping_norm,
        "config_hash": config_hash, **(extra or {}),
    }
    with open_ledger(node) as ledger:
        check = None
        if policy is not None:
            try:
                check = check_run(
                    policy, spent_events=_spent(ledger, node, policy), planned_events=[event] * rounds + list(planned_extra or []),
                    planned_rounds=rounds, lifetime_events=_lifetime(ledger, node),
                )
            except PrivacyError as exc:
                ledger.append(
                    kind="refusal", partner=node.partner, run_id=run_id, round=None,
                    extra={"scope": "run", "reason": str(exc), **plan},
                )
                raise
            plan.update({
                "policy": str(node.policy_path) if node.policy_path else "fedprop default policy",
                "policy_spent_epsilon": check.spent_epsilon,
                "policy_planned_epsilon": check.planned_epsilon, "policy_total_epsilon": check.total_epsilon,
                "policy_max_epsilon": check.max_epsilon, "policy_accountant": check.accountant,
            })
        ledger.append(kind="run_start", partner=node.partner, run_id=run_id, round=None, extra=plan)
    return check


@contextmanager
def round_reservation(
    node: NodeLedger, *, run_id: str, round: int, sampling_rate: float, noise_multiplier: float, steps: int,
    delta: float, clipping_norm: float, config_hash: str, heads: str,
) -> Iterator[Reservation]:
    """Check the round against the policy AND reserve its spend in one ledger transaction (no interleaving of
    runs on this ledger can exceed the policy), BEFORE training. The caller trains, then ``commit``s the
    reservation with the update's hash before the update leaves; if it does not (an error), the reservation is
    released here. A process killed in between leaves the reservation open, and open reservations count as
    spent (fail closed). Raises the policy's error (recorded as a refusal) when the round does not fit."""
    event = round_event(sampling_rate=sampling_rate, noise_multiplier=noise_multiplier, steps=steps)
    policy = load_node_policy(node)
    ledger = open_ledger(node)
    try:
        res = ledger.reserve(policy=policy, commits_as="dpsgd_round", partner=node.partner, run_id=run_id, round=round,
                             delta=delta, mechanism=event, clipping_norm=clipping_norm, config_hash=config_hash,
                             extra={"heads": heads})
        try:
            yield res
        finally:
            if res.closed_by() is None:
                res.release("the round did not complete at this node; nothing was released")
    finally:
        ledger.close()


def commit_round(res: Reservation, *, update_hash: str, extra: Mapping[str, Any] | None = None) -> LedgerEntry:
    """The round's ``dpsgd_round`` entry (the reserved mechanism), durable before the update is handed to Flower."""
    q, sigma, steps = res.entry.mechanism["sampling_rate"], res.entry.mechanism["noise_multiplier"], res.entry.mechanism["steps"]
    return res.commit(update_hash=update_hash, reported_accountant="rdp", extra=dict(extra or {}),
                      reported_epsilon=opacus_round_epsilon(sampling_rate=q, noise_multiplier=sigma, steps=steps,
                                                            delta=res.entry.delta))


@functools.lru_cache(maxsize=256)  # the same mechanism every round: compute its epsilon once per process
def opacus_round_epsilon(*, sampling_rate: float, noise_multiplier: float, steps: int, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(float(noise_multiplier), float(sampling_rate), int(steps))]
    return float(acc.get_epsilon(delta=delta))


def _run_entries(node: NodeLedger, run_id: str) -> list[LedgerEntry]:
    if not node.ledger_path.exists():
        return []
    with open_ledger(node) as ledger:
        return [e for e in ledger.entries() if e.run_id == run_id and e.partner == node.partner]


def round_recorded(node: NodeLedger, *, run_id: str, round: int, heads: str) -> bool:
    """Whether this node already released (and recorded) ``round`` of ``run_id`` for federation ``heads``: rounds
    are keyed by (run, round, heads) so that a resumed or repeated request never spends twice."""
    return any(e.kind == "dpsgd_round" and e.round == round and (e.extra or {}).get("heads") == heads
               for e in _run_entries(node, run_id))


def restore_run_state(node: NodeLedger, *, run_id: str, heads: str):
    """A restarted node's privacy state for ``run_id`` rebuilt from its ledger (None if the run never started
    here): the plan recorded in ``run_start`` plus the rounds and evaluation releases recorded since."""
    from clients.privacy_state import PrivacyState

    entries = _run_entries(node, run_id)
    starts = [e for e in entries if e.kind == "run_start" and (e.extra or {}).get("heads") == heads]
    if not starts:
        return None
    plan = starts[-1].extra
    heads_set = set(heads.split(","))
    rounds = [e for e in entries if e.kind == "dpsgd_round" and (e.extra or {}).get("heads") == heads]
    evals = [e for e in entries if e.kind == "evaluation_release" and (e.extra or {}).get("head") in heads_set]
    step = (float(plan["noise_multiplier"]), float(plan["sampling_rate"]), int(plan["steps_per_round"]))
    return PrivacyState(
        target_epsilon=float(plan["target_epsilon"]), delta=float(plan["delta"]), noise_multiplier=step[0],
        sample_rate=step[1], steps_per_round=step[2], planned_rounds=int(plan["planned_rounds"]),
        max_grad_norm=float(plan["clipping_norm"]), history=[step] * len(rounds), rounds_done=len(rounds),
        accountant=str(plan.get("accountant", "rdp")), eval_sigma=float(plan.get("evaluation_sigma", 1.0)),
        eval_planned=int(plan.get("evaluation_releases", 0)), eval_done=len(evals),
        eval_share=float(plan.get("evaluation_share", 0.0)),
    )


def update_hash(state: Mapping[str, Any]) -> str:
    """SHA-256 of a model update as released: for each tensor, in the mapping's order, its name, dtype,
    shape and C-order bytes (torch tensors are read on CPU). Recomputable by the server from the
    received ``ArrayRecord`` (``arrays.to_torch_state_dict()`` or ``to_numpy_ndarrays`` with keys)."""
    h = hashlib.sha256(b"fedprop-update-v1\x00")
    for name, value in state.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        arr = np.ascontiguousarray(np.asarray(value))
        h.update(name.encode() + b"\x00" + str(arr.dtype).encode() + b"\x00" + repr(arr.shape).encode() + b"\x00")
        h.update(arr.tobytes())
    return h.hexdigest()


def ledger_files(node: NodeLedger) -> dict[str, str]:
    """Paths compliance needs (ledger + public key) as strings, e.g. for a summary."""
    return {"ledger": os.fspath(node.ledger_path), "public_key": os.fspath(node.public_key_path)}


def record_evaluation(
    node: NodeLedger, *, run_id: str, round: int, mechanisms: list[Mapping[str, Any]], delta: float, config_hash: str
) -> dict[str, Any] | None:
    """Check the policy, then append one ``evaluation_release`` per noisy histogram BEFORE it is sent.

    Returns the ledger head after the last of them, signed by the node's ledger key, as the evaluation reply's
    ``ledger`` record (``entry-seq``, ``entry-hash``, ``ledger-id``, ``ledger-partner``, ``head-signature``; None
    without mechanisms: nothing was recorded or released): the
    server witnesses it like a train reply's head, so an owner who restores a copy of the ledger taken before the
    evaluation (dropping releases that did leave) fails ``verify --against``.

    Raises PrivacyError (after recording a refusal) when the release would exceed the remaining budget."""
    from federation.privacy.events import event_from_dict

    events = [event_from_dict(dict(m["ledger_event"])) for m in mechanisms]
    policy = load_node_policy(node)
    with open_ledger(node) as ledger:  # reserve every head's release (checked atomically), then commit them all
        reserved: list[Reservation] = []
        try:
            for ev, m in zip(events, mechanisms):
                extra = {k: v for k, v in m.items() if k != "ledger_event" and isinstance(v, (int, float, str))}
                reserved.append(ledger.reserve(policy=policy, commits_as="evaluation_release", partner=node.partner,
                                               run_id=run_id, round=round, delta=delta, mechanism=ev,
                                               config_hash=config_hash, extra=extra))
        except Exception:
            for res in reserved:
                res.release("evaluation refused or failed before release; nothing was sent")
            raise
        last = None
        for res in reserved:
            last = res.commit()
        if last is None:  # no mechanism: nothing was released, no head to witness
            return None
        return {"entry-seq": last.seq, "entry-hash": last.entry_hash, "ledger-id": ledger.ledger_id,
                "ledger-partner": node.partner, "head-signature": ledger.sign_head(last.seq, last.entry_hash)}
