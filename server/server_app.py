"""Flower ServerApp (Message API): a thin adapter from Grid/Context to the strategy and run outputs.

For each federation (one two-head model, or one per task) it builds the initial model from the declared
feature layout (no partner data), runs the wrapped strategy, checkpoints the global model every round and
writes per-round metrics and the final model into the run directory.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from federation.atomicio import atomic_write_text
from federation.errors import FedpropError
from federation.config import FedpropConfig, config_hash, evaluation_rounds, from_run_config
from federation.featurespec import feature_names
from federation.models import build_model, federations
from server.outputs import RunOutputs, progress_line
from server.release import release_model
from server.secure_fedavg import run_secure_fedavg
from server.strategy import RecordingStrategy, build_strategy, pooled_summaries


class ReleaseRefused(FedpropError):
    """Too few rounds aggregated anything: the federation's model is not a result and is not released."""


def aggregated_rounds(rounds: list[dict]) -> int:
    """Rounds in which at least one partner's update was aggregated (plain or securely summed)."""
    return sum(1 for r in rounds if any("train" in p for p in r.get("partners", {}).values()))


def _release_or_refuse(out: RunOutputs, cfg: FedpropConfig, *, tag: str, heads, names, final: ArrayRecord, pooled) -> None:
    """Release nothing from nothing: fewer than ``release.min_rounds`` aggregated rounds -> no model file, no
    signature, no model card; ``RELEASE_REFUSED_<tag>.json`` says why and the run exits non-zero."""
    done = aggregated_rounds(out.rounds.get(tag, []))
    if done < cfg.release.min_rounds:
        reason = (f"federation {tag}: {done} of {cfg.rounds} round(s) aggregated any partner's update (release.min_rounds="
                  f"{cfg.release.min_rounds}); the model is not a result, so nothing was saved, signed or released. "
                  "See the refusals and errors in federated_rounds.json.")
        atomic_write_text(out.dir / f"RELEASE_REFUSED_{tag}.json", json.dumps({"tag": tag, "aggregated_rounds": done,
                                                                              "reason": reason}, indent=2))
        print(f"fedprop: {reason}", flush=True)
        raise ReleaseRefused(reason)
    out.save_final(tag, final.to_torch_state_dict(), heads=heads, feature_names=names)
    release_model(out.dir, cfg, tag=tag, heads=heads, feature_names=names, rounds=out.rounds.get(tag, []), pooled=pooled)


WITNESS_FILE = "federation_ledger.sqlite"


def witness(out: RunOutputs, cfg: FedpropConfig, *, run_id: str, rec: dict) -> None:
    """The server's witness: each partner's ledger head (id, seq, entry hash) as it replied this round, appended to
    the run's federation ledger (signed with the server's key from ``release.key_dir``). ``fedprop budget verify
    <partner ledger> --against <run>/federation_ledger.sqlite`` later detects a partner ledger rolled back,
    truncated or replaced after the run."""
    heads = {}
    for p in rec.get("partners", {}).values():
        led = p.get("ledger")
        if led and led.get("ledger-partner"):
            heads[led["ledger-partner"]] = {"seq": int(led["entry-seq"]), "entry_hash": led["entry-hash"],
                                            "ledger_id": led.get("ledger-id")}
    if not heads:
        return
    from federation.privacy.ledger import generate_node_key
    from server.federation_ledger import open_federation_ledger, record_partner_heads

    key = Path(cfg.release.key_dir) / "federation-ledger.key"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        generate_node_key(key)
    with open_federation_ledger(out.dir / WITNESS_FILE, key_path=key) as ledger:
        record_partner_heads(ledger, run_id=run_id, round=int(rec["round"]), heads=heads)


def run_federation(grid: Grid, cfg: FedpropConfig, *, heads: tuple[str, ...], out: RunOutputs, run_id: str = "") -> None:
    torch.manual_seed(cfg.seed)
    names = feature_names(cfg.data)
    model = build_model(cfg.model, n_features=len(names), n_outputs=len(heads))
    tag = "+".join(heads)
    num_partners = cfg.partners

    clock = [time.perf_counter()]

    def on_round(rec: dict) -> None:
        now = time.perf_counter()
        rec.setdefault("wall_s", now - clock[0])  # train + evaluate, as the server saw it
        clock[0] = now
        witness(out, cfg, run_id=run_id or config_hash(cfg)[:16], rec=rec)
        out.record_round(tag, rec)
        print(progress_line(tag, rec, rounds=cfg.rounds, heads=heads), flush=True)

    if cfg.secagg.enabled:  # the server sees only sums of updates: server/secure_fedavg.py
        secure = run_secure_fedavg(
            grid, cfg, heads=heads, initial=ArrayRecord(model.state_dict()), run_dir=out.dir,
            run_id=run_id or config_hash(cfg)[:16], on_round=on_round,
            checkpoint=lambda rnd, arrays: out.save_checkpoint(tag, rnd, arrays.to_torch_state_dict()),
        )  # secure.rounds_aggregated == 0: nothing trained (the no-release exit is wired here)
        final, last_eval = secure.arrays, secure.last_eval
        _release_or_refuse(out, cfg, tag=tag, heads=heads, names=names, final=final,
                           pooled=pooled_summaries(last_eval) if last_eval else {})
        return
    strategy = RecordingStrategy(build_strategy(cfg, heads=heads, num_partners=num_partners), on_round=on_round,
                                 evaluate_rounds=evaluation_rounds(cfg))

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:
            out.save_checkpoint(tag, server_round, arrays.to_torch_state_dict())
        return None

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=cfg.rounds,
        train_config=ConfigRecord({"heads": ",".join(heads)}),
        evaluate_config=ConfigRecord({"heads": ",".join(heads)}),
        evaluate_fn=checkpoint,
        timeout=cfg.strategy.round_timeout,  # replies later than this: that partner misses the round
    )
    final = result.arrays if len(result.arrays) else ArrayRecord(model.state_dict())
    _release_or_refuse(out, cfg, tag=tag, heads=heads, names=names, final=final, pooled=strategy.pooled)


def make_server_app(*, config: FedpropConfig | None = None, run_dir: str | Path | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config or from_run_config(context.run_config)
        out = RunOutputs(Path(run_dir or context.run_config.get("fedprop-run-dir", "") or f"runs/flwr-{context.run_id}"))
        out.write_config(cfg)
        refused: list[str] = []
        for heads in federations(cfg.task, cfg.model.heads):
            try:
                run_federation(grid, cfg, heads=heads, out=out, run_id=str(context.run_id))
            except ReleaseRefused as exc:
                refused.append(str(exc))
        out.finish()
        if refused and config is None:  # deployment: the run fails (non-zero) when a federation released nothing
            raise ReleaseRefused("; ".join(refused))

    return app


app = make_server_app()
