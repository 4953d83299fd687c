"""Flower ServerApp (Message API): a thin adapter from Grid/Context to the strategy and run outputs.

For each federation (one two-head model, or one per task) it builds the initial model from the declared
feature layout (no partner data), runs the wrapped strategy, checkpoints the global model every round and
writes per-round metrics and the final model into the run directory.

Run identity and resume: partners key their ledgers by the fedprop run id (run config ``fedprop-run-id``, drawn
from the OS CSPRNG at submit or here when absent), sent in every train/evaluate config as ``fedprop-run-id``;
never by Flower's run id, which a resumed run does not keep. ``fedprop-resume=true`` continues the run in
``fedprop-run-dir`` from its last checkpoint at round k+1 (``server.outputs.RunOutputs.resume_point``); a
partner that recorded round k+1 before the crash refuses it (no second spend) and is a dropout there.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from federation import metrics as M
from federation.atomicio import atomic_write_text
from federation.errors import FedpropError
from federation.config import FedpropConfig, config_hash, evaluation_rounds, from_run_config
from federation.featurespec import feature_names
from federation.models import build_model, federations
from server.outputs import RunOutputs, check_resumable, progress_line
from server.run_id import RESUME_KEY, RUN_ID_KEY, ResumeError, run_identity
from server.release import release_model
from server.secure_fedavg import run_secure_fedavg
from server.strategy import RecordingStrategy, build_strategy, pooled_summaries


class ReleaseRefused(FedpropError):
    """Too few rounds aggregated anything, or the final model is not finite: the federation's model is not a
    result and is not released."""


def aggregated_rounds(rounds: list[dict]) -> int:
    """Rounds in which at least one partner's update was aggregated (plain or securely summed)."""
    return sum(1 for r in rounds if any("train" in p for p in r.get("partners", {}).values()))


def _release_or_refuse(out: RunOutputs, cfg: FedpropConfig, *, tag: str, heads, names, final: ArrayRecord, pooled) -> None:
    """Release nothing from nothing: fewer than ``release.min_rounds`` aggregated rounds, or a final model with NaN
    or infinite parameters (a diverged run) -> no model file, no signature, no model card;
    ``RELEASE_REFUSED_<tag>.json`` says why and the run exits non-zero."""
    done = aggregated_rounds(out.rounds.get(tag, []))
    state = final.to_torch_state_dict()
    bad = sorted(k for k, v in state.items() if not bool(torch.isfinite(v).all()))
    reason = None
    if done < cfg.release.min_rounds:
        reason = (f"federation {tag}: {done} of {cfg.rounds} round(s) aggregated any partner's update (release.min_rounds="
                  f"{cfg.release.min_rounds}); the model is not a result, so nothing was saved, signed or released. "
                  "See the refusals and errors in federated_rounds.json.")
    elif bad:
        reason = (f"federation {tag}: the final model's parameter(s) {', '.join(bad)} hold NaN or infinite values "
                  "(training diverged); nothing was saved, signed or released. Lower train.lr or set "
                  "privacy.max_grad_norm / rounds explicitly, and see federated_rounds.json.")
    if reason is not None:
        atomic_write_text(out.dir / f"RELEASE_REFUSED_{tag}.json", json.dumps({"tag": tag, "aggregated_rounds": done,
                                                                              "reason": reason}, indent=2))
        print(f"fedprop: {reason}", flush=True)
        raise ReleaseRefused(reason)
    out.save_final(tag, state, heads=heads, feature_names=names)
    release_model(out.dir, cfg, tag=tag, heads=heads, feature_names=names, rounds=out.rounds.get(tag, []), pooled=pooled)


WITNESS_FILE = "federation_ledger.sqlite"


def witness(out: RunOutputs, cfg: FedpropConfig, *, run_id: str, rec: dict) -> None:
    """The server's witness: each partner's ledger head (id, seq, entry hash) as it replied this round, appended to
    the run's federation ledger (signed with the server's key from ``release.key_dir``). ``fedprop budget verify
    <partner ledger> --against <run>/federation_ledger.sqlite`` later detects a partner ledger rolled back,
    truncated or replaced after the run. Every head is kept with the node that sent it and the node's signature; two
    nodes claiming one name are both kept (``conflicts``), and verification counts only heads the partner's own
    ledger key signed, so a hostile node can neither frame a partner nor hide its genuine head."""
    latest: dict[tuple, dict] = {}  # (name, node, ledger id) -> that node's latest head this round
    for p in rec.get("partners", {}).values():
        # the train reply's head and, later in the same ledger, the evaluation reply's head (after the evaluation
        # releases, which would otherwise never be witnessed): a node's later head implies its earlier one
        for led in (p.get("ledger"), p.get("evaluation-ledger")):
            if not (led and led.get("ledger-partner")):
                continue
            head = {"seq": int(led["entry-seq"]), "entry_hash": led["entry-hash"], "ledger_id": led.get("ledger-id"),
                    "signature": led.get("head-signature"), "node": led.get("node")}
            key = (led["ledger-partner"], head["node"], head["ledger_id"])
            if key not in latest or head["seq"] > latest[key]["seq"]:
                latest[key] = head
    heads: dict[str, dict] = {}
    conflicts: list[dict] = []  # a name claimed by a second node this round: kept (only the signed head counts)
    for (name, _, _), head in latest.items():
        if name in heads:
            conflicts.append({"partner": name, **head})
        else:
            heads[name] = head
    if not heads:
        return
    from server.federation_ledger import open_federation_ledger, record_partner_heads, server_ledger_key

    with open_federation_ledger(out.dir / WITNESS_FILE, key_path=server_ledger_key(cfg.release.key_dir)) as ledger:
        record_partner_heads(ledger, run_id=run_id, round=int(rec["round"]), heads=heads, conflicts=conflicts)


RECORDED_REFUSAL = "already released and recorded"  # clients/client_app.py: a round this partner already spent


def _note_recorded_dropouts(rec: dict, tag: str) -> None:
    """A partner that refused a round it had recorded before a crash: say so (its spend is lost but counted)."""
    for r in rec.get("refusals", []):
        if RECORDED_REFUSAL in str(r.get("reason", "")):
            r["recorded-before-crash"] = True
            print(f"fedprop: [{tag}] round {rec['round']}: node {r.get('node')} had already recorded this round in its "
                  "ledger before the interruption and refuses to spend it twice; it is a dropout for this round (its "
                  "privacy spend for it is counted, its update was lost)", flush=True)


def run_federation(grid: Grid, cfg: FedpropConfig, *, heads: tuple[str, ...], out: RunOutputs, run_id: str = "",
                   resume: bool = False) -> None:
    """Run (or with ``resume``, continue from its last checkpoint) the federation of ``heads``; release its model."""
    torch.manual_seed(cfg.seed)
    names = feature_names(cfg.data)
    model = build_model(cfg.model, n_features=len(names), n_outputs=len(heads))
    tag = "+".join(heads)
    num_partners = cfg.partners
    run_id = run_id or config_hash(cfg)[:16]
    start = 0
    if resume:
        if out.federation_finished(tag):
            print(f"fedprop: [{tag}] already finished before the interruption; nothing to resume", flush=True)
            return
        start, state = out.resume_point(tag, cfg)
        if state is not None:
            model.load_state_dict(state)
        print(f"fedprop: [{tag}] resuming run {run_id} after round {start} of {cfg.rounds}", flush=True)
    round_config = {"heads": ",".join(heads), RUN_ID_KEY: run_id}

    clock = [time.perf_counter()]

    def on_round(rec: dict) -> None:
        now = time.perf_counter()
        rec.setdefault("wall_s", now - clock[0])  # train + evaluate, as the server saw it
        clock[0] = now
        _note_recorded_dropouts(rec, tag)
        witness(out, cfg, run_id=run_id, rec=rec)
        out.record_round(tag, rec)
        print(progress_line(tag, rec, rounds=cfg.rounds, heads=heads), flush=True)

    if cfg.secagg.enabled:  # the server sees only sums of updates: server/secure_fedavg.py
        secure = run_secure_fedavg(
            grid, cfg, heads=heads, initial=ArrayRecord(model.state_dict()), run_dir=out.dir,
            run_id=run_id, on_round=on_round, start_round=start + 1, previous=out.rounds.get(tag, []),
            checkpoint=lambda rnd, arrays: out.save_checkpoint(tag, rnd, arrays.to_torch_state_dict()),
        )  # secure.rounds_aggregated == 0: nothing trained (the no-release exit is wired here)
        final, last_eval = secure.arrays, secure.last_eval
        _release_or_refuse(out, cfg, tag=tag, heads=heads, names=names, final=final,
                           pooled=pooled_summaries(last_eval) if last_eval else {})
        return
    # The checkpoint of round k is written right after its aggregation, before its evaluation and record: a
    # crash in between leaves a checkpoint without a record (resume_point says so), never the reverse.
    strategy = RecordingStrategy(build_strategy(cfg, heads=heads, num_partners=num_partners), on_round=on_round,
                                 evaluate_rounds=evaluation_rounds(cfg), round_offset=start,
                                 eval_edges=tuple(M.logit_edges(cfg.evaluation.bins)),
                                 on_aggregate=lambda rnd, arrays: out.save_checkpoint(tag, rnd, arrays.to_torch_state_dict()))

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=cfg.rounds - start,
        train_config=ConfigRecord(round_config),
        evaluate_config=ConfigRecord(round_config),
        timeout=cfg.strategy.round_timeout,  # replies later than this: that partner misses the round
    )
    final = result.arrays if len(result.arrays) else ArrayRecord(model.state_dict())  # model = the checkpoint
    _release_or_refuse(out, cfg, tag=tag, heads=heads, names=names, final=final, pooled=strategy.pooled)


def open_run(run_dir: str | Path, cfg: FedpropConfig, run_config: dict, *,
             flower_run_id: int) -> tuple[RunOutputs, str, bool]:
    """The run's outputs, its fedprop run id and whether it resumes (``fedprop-resume``): a new run writes its
    config; a resume checks that ``run_dir`` holds this run (run.json: id and config hash) and reads its rounds."""
    out = RunOutputs(Path(run_dir))
    run_id, resume = run_identity(run_config)
    if resume:
        run = check_resumable(out.dir)
        if run["fedprop_run_id"] != run_id:
            raise ResumeError(f"{out.dir}/run.json is run {run['fedprop_run_id']}, not {run_id}: resume it with "
                              "`fedprop server resume RUN_DIR`, which takes the id from run.json")
        if run["config_hash"] != config_hash(cfg):
            raise ResumeError(f"{out.dir}/run.json was written under config hash {str(run['config_hash'])[:12]}, this "
                              f"run's config is {config_hash(cfg)[:12]}: resume with the run's own run config (run.json)")
        out.cfg = cfg
        out.load_rounds()
    else:
        out.write_config(cfg)
    out.write_run(run_id=run_id, run_config={k: v for k, v in run_config.items() if k != RESUME_KEY},
                  flower_run_id=flower_run_id)
    dp = (f"epsilon {cfg.privacy.epsilon:g}, clip C={cfg.privacy.max_grad_norm:g}" if cfg.privacy.enabled
          else "privacy disabled")
    print(f"fedprop: run {run_id} (Flower run {flower_run_id}){' resumed' if resume else ''}: {cfg.rounds} rounds, "
          f"{dp}; outputs in {out.dir}", flush=True)
    return out, run_id, resume


def make_server_app(*, config: FedpropConfig | None = None, run_dir: str | Path | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config or from_run_config(context.run_config)
        out, run_id, resume = open_run(
            run_dir or context.run_config.get("fedprop-run-dir", "") or f"runs/flwr-{context.run_id}", cfg,
            dict(context.run_config), flower_run_id=int(context.run_id))
        refused: list[str] = []
        for heads in federations(cfg.task, cfg.model.heads):
            try:
                run_federation(grid, cfg, heads=heads, out=out, run_id=run_id, resume=resume)
            except ReleaseRefused as exc:
                refused.append(str(exc))
        out.finish()
        if refused and config is None:  # deployment: the run fails (non-zero) when a federation released nothing
            raise ReleaseRefused("; ".join(refused))

    return app


app = make_server_app()
