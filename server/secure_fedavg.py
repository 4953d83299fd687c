"""FedAvg / FedProx rounds in which the server sees only the SUM of the partners' updates (SecAgg / SecAgg+
over the Message API, ``federation.secagg.flower.secure_sum``), optionally with partner-level DP from noise
shares the partners add themselves (``federation.secure_fedavg``; docs/secure-aggregation.md).

Each round: sample partners; one ``secure_sum`` (four message rounds; the global model and round config ride
on the masked-input message, where each partner runs its ordinary train handler); new global =
global + sum(w_i delta_i) / sum(w_i); record the release in the federation ledger (central DP only); then the
usual ``evaluate`` messages, pooled from histograms exactly as in the plain strategy
(``server.strategy.aggregate_eval_metrics``). A partner that refuses (privacy budget) or fails is a dropout;
with fewer than the threshold t of survivors the round is aborted (no aggregate exists) and the model is kept.
A partner whose reply is malformed or inconsistent is excluded (a dropout with a public reason code), and an
unmasked sum that fails the range checks (``federation.secure_fedavg.aggregate_step``) rejects the round:
nothing from it is applied or released. :class:`SecureFedAvgResult` says how many rounds aggregated; with
``rounds_aggregated == 0`` the final model is the untrained initial one and must not be released.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from federation import metrics as M
from federation.config import FedpropConfig, config_hash, evaluation_rounds
from federation.errors import FedpropError
from federation.privacy.accountants import get_accountant
from federation.privacy.events import Gaussian
from federation.secagg.flower import RECORD_KEY, secure_sum
from federation.secagg.primitives import Entropy, RoundAbortedError
from federation.secure_fedavg import aggregate_step, min_partner_weight, plan_round
from server.strategy import HIST, aggregate_eval_metrics, ledger_head, partition_id, screen_evaluation, set_aside

__all__ = ["ACTION", "LEDGER_FILE", "SecureFedAvgResult", "run_secure_fedavg"]

log = logging.getLogger(__name__)

ACTION = "secagg"  # clients/secure_update.py registers query.secagg
LEDGER_FILE = "federation_ledger.sqlite"


@dataclass(frozen=True)
class SecureFedAvgResult:
    """The outcome of a secure FedAvg run. ``rounds_aggregated`` counts rounds whose checked aggregate was
    applied; 0 means nothing trained (``arrays`` is the initial model): the caller must release nothing."""

    arrays: ArrayRecord
    last_eval: list[dict[str, Any]]
    rounds_aggregated: int
    rounds_aborted: dict[int, str] = field(default_factory=dict)  # round -> why (public text, no values)


class _ErrorTap:
    """A Grid proxy that remembers error replies (refusals, failures) per SecAgg stage; delegates the rest."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.errors: list[dict[str, Any]] = []

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        stage = str(messages[0].content[RECORD_KEY]["stage"]) if messages else ""
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            if r.has_error():
                self.errors.append({"node": r.metadata.src_node_id, "stage": stage, "code": r.error.code,
                                    "reason": r.error.reason})
        return replies


def _wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise FedpropError(f"only {len(nodes)} of {minimum} partner nodes connected within {timeout:.0f} s")
        time.sleep(0.2)


def _sample(nodes: Sequence[int], fraction: float, rng: random.Random, minimum: int) -> list[int]:
    k = min(len(nodes), max(minimum, math.ceil(fraction * len(nodes) - 1e-9)))
    return sorted(rng.sample(list(nodes), k))


def _flatten(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k].numpy(), dtype=np.float64).ravel() for k in arrays.keys()])


def _apply(arrays: ArrayRecord, step: np.ndarray) -> ArrayRecord:
    out, i = {}, 0
    for k in arrays.keys():
        a = arrays[k].numpy()
        out[k] = torch.from_numpy((a.astype(np.float64) + step[i:i + a.size].reshape(a.shape)).astype(a.dtype))
        i += a.size
    if i != step.size:
        raise FedpropError(f"aggregate has {step.size} values, the model {i}")
    return ArrayRecord(out)


def _record_release(run_dir: Path, cfg: FedpropConfig, *, run_id: str, server_round: int, survivors: int,
                    threshold: int, update_hash: str) -> None:
    """One ``server_dp_round`` entry per released noisy aggregate, committed before the model is used."""
    extra = {"scheme": "distributed-gaussian-secagg", "threshold": threshold, "survivors": survivors,
             "noise_std_per_share": cfg.central_dp.noise_multiplier * cfg.central_dp.clipping_norm / math.sqrt(threshold),
             "trust": "at least `threshold` summed partners added their noise share"}
    from server.federation_ledger import open_federation_ledger, record_server_release, server_ledger_key

    # the run's one federation ledger, signed by the server's key in release.key_dir: the same ledger and key as the
    # partner heads witness (server/server_app.py), which appends to it in the same round
    with open_federation_ledger(run_dir / LEDGER_FILE, key_path=server_ledger_key(cfg.release.key_dir)) as ledger:
        record_server_release(
            ledger, run_id=run_id, round=server_round, noise_multiplier=cfg.central_dp.noise_multiplier,
            clipping_norm=cfg.central_dp.clipping_norm, num_sampled=survivors, delta=cfg.central_dp.delta,
            update_hash=update_hash, config_hash=config_hash(cfg), extra=extra,
        )


def run_secure_fedavg(
    grid: Grid,
    cfg: FedpropConfig,
    *,
    heads: tuple[str, ...],
    initial: ArrayRecord,
    run_dir: Path,
    run_id: str,
    on_round: Callable[[dict[str, Any]], None],
    checkpoint: Callable[[int, ArrayRecord], None],
    entropy: Entropy = os.urandom,
    start_round: int = 1,
    previous: Sequence[dict[str, Any]] = (),
) -> SecureFedAvgResult:
    """Run secure rounds ``start_round``..``cfg.rounds``; return the final global model, the partners' last
    evaluation metric records (aggregates and histograms, as in the plain strategy) and how many rounds aggregated.

    A resumed run passes ``start_round=k+1``, ``initial`` = round k's checkpoint and ``previous`` = the rounds
    recorded before the interruption (they count towards ``rounds_aggregated`` and the partner-level epsilon)."""
    arrays = initial
    num_params = int(_flatten(initial).size)
    rng = random.Random(cfg.seed)
    aggregate_eval = aggregate_eval_metrics(heads)
    eval_edges = tuple(M.logit_edges(cfg.evaluation.bins))  # the federation's public score bins
    config_base = {"heads": ",".join(heads), "fedprop-run-id": run_id}  # partners key their ledgers by it
    if cfg.strategy.name == "fedprox":
        config_base["proximal-mu"] = float(cfg.strategy.proximal_mu)
    released = sum(1 for r in previous if "partner_epsilon" in r.get("secagg", {}))
    aggregated = sum(1 for r in previous if "survivors" in r.get("secagg", {}))
    aborted: dict[int, str] = {int(r["round"]): str(r["secagg"]["aborted"]) for r in previous
                               if "aborted" in r.get("secagg", {})}
    last_eval: list[dict[str, Any]] = []
    for rnd in range(start_round, cfg.rounds + 1):
        t0 = time.perf_counter()
        nodes = _wait_for_nodes(grid, cfg.partners, cfg.secagg.timeout)
        train_nodes = _sample(nodes, cfg.strategy.fraction_train, rng, minimum=2)
        plan = plan_round(cfg, num_params=num_params, participants=len(train_nodes))
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd, **config_base})})
        tap = _ErrorTap(grid)
        info: dict[str, Any] = {"participants": len(train_nodes), "threshold": plan.threshold,
                                "degree": plan.degree or 0, "modulus_bits": cfg.secagg.modulus_bits}
        survivors: tuple[int, ...] = ()
        try:
            result = secure_sum(
                tap, node_ids=train_nodes, vector_length=plan.vector_length, threshold=plan.threshold,  # type: ignore[arg-type]
                quantization=plan.quantization, degree=plan.degree, timeout=cfg.secagg.timeout,
                extra_content=content, action=ACTION, entropy=entropy,
            )
            info["excluded"] = {str(u): why for u, why in sorted(result.excluded.items())}
            step, weight = aggregate_step(result.total, value_range_=plan.quantization.clip,
                                          survivors=len(result.survivors), min_weight=min_partner_weight(cfg),
                                          error_bound=result.error_bound)
        except RoundAbortedError as exc:
            info["aborted"] = str(exc)
            aborted[rnd] = str(exc)
            log.warning("round %d: secure aggregation aborted (%s); the global model is unchanged", rnd, exc)
        else:
            survivors = result.survivors
            aggregated += 1
            info.update(survivors=len(survivors), dropped=len(result.dropped), weight_sum=weight,
                        error_bound=result.error_bound / weight)
            if cfg.central_dp.enabled:
                _record_release(run_dir, cfg, run_id=run_id, server_round=rnd, survivors=len(survivors),
                                threshold=plan.threshold,
                                update_hash=hashlib.sha256(step.astype("<f8").tobytes()).hexdigest())
                released += 1
                info["partner_epsilon"] = get_accountant("rdp").epsilon(
                    [Gaussian(noise_multiplier=cfg.central_dp.noise_multiplier, count=released)],
                    delta=cfg.central_dp.delta)
            arrays = _apply(arrays, step)
        info["secure_sum_s"] = time.perf_counter() - t0
        checkpoint(rnd, arrays)

        # Evaluation is a DP release with a planned count at each partner: only the scheduled rounds ask for it.
        eval_nodes = _sample(nodes, cfg.strategy.fraction_evaluate, rng, minimum=0) if rnd in evaluation_rounds(cfg) else []
        eval_cfg = ConfigRecord({"server-round": rnd, **config_base})
        msgs = [Message(RecordDict({"arrays": arrays, "config": eval_cfg}), dst_node_id=n, message_type="evaluate")
                for n in eval_nodes]
        replies = [r for r in grid.send_and_receive(msgs, timeout=cfg.secagg.timeout) if not r.has_error()] if msgs else []
        rec: dict[str, Any] = {"round": rnd, "partners": {}, "refusals": tap.errors, "secagg": info}
        node_pid: dict[int, str] = {}
        flats = []
        for r in sorted(replies, key=lambda m: partition_id(next(iter(m.content.metric_records.values()), {}))):
            m = dict(next(iter(r.content.metric_records.values()), {}))
            pid = str(partition_id(m))
            why = screen_evaluation(m, eval_edges)
            if why is not None:  # a hostile or broken release is set aside, never fails the round
                set_aside(rec.setdefault("evaluate_refusals", []), node=r.metadata.src_node_id, partner=pid, why=why,
                          stage="evaluation", server_round=rnd)
                continue
            node_pid[r.metadata.src_node_id] = pid
            flats.append((r.metadata.src_node_id, m, r.content))
        claimed = [v for v in node_pid.values()]
        # two nodes claiming one partner id: both records kept, under the id and the node (never one overwriting)
        node_pid = {u: v if claimed.count(v) == 1 else f"{v} (node {u})" for u, v in node_pid.items()}
        for v in sorted({v for v in claimed if claimed.count(v) > 1}):
            print(f"fedprop: WARNING: round {rnd}: several nodes reply as partner {v!r}; each is recorded under its "
                  "node id, and only heads signed by the partner's own ledger key count as its witness", flush=True)
        for u, m, c in flats:
            p = rec["partners"].setdefault(node_pid[u], {})
            p["evaluate"] = {k: v for k, v in m.items() if HIST not in k}
            led = c["ledger"] if "ledger" in c.config_records else None
            if led is not None and {"entry-seq", "entry-hash", "ledger-partner"} <= set(led):
                p["evaluation-ledger"] = ledger_head(led, u)  # the head after its evaluation releases: witnessed
        flats = [c for _, _, c in flats]
        witnesses = result.witnesses if survivors else {}
        for u in survivors:  # the server knows WHO was summed, never what each sent
            p = rec["partners"].setdefault(node_pid.get(u, f"node-{u}"), {})
            p["train"] = {"in-secure-sum": 1}
            led = witnesses.get(u)
            if led and {"entry-seq", "entry-hash", "ledger-partner"} <= set(led):  # its ledger head: the witness
                p["ledger"] = ledger_head(led, u)
        rec["evaluate"] = dict(aggregate_eval(flats, "num-examples")) if flats else {}
        last_eval = [dict(next(iter(c.metric_records.values()))) for c in flats]
        info["round_s"] = time.perf_counter() - t0
        on_round(rec)
    if not aggregated:
        log.error("no secure round aggregated (%d aborted): the model is the untrained initial one; release nothing",
                  len(aborted))
    return SecureFedAvgResult(arrays=arrays, last_eval=last_eval, rounds_aggregated=aggregated, rounds_aborted=aborted)
