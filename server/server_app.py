"""Flower ServerApp (Message API): a thin adapter from Grid/Context to the strategy and run outputs.

For each federation (one two-head model, or one per task) it builds the initial model from the declared
feature layout (no partner data), runs the wrapped strategy, checkpoints the global model every round and
writes per-round metrics and the final model into the run directory.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from federation.config import FedpropConfig, config_hash, evaluation_rounds, from_run_config
from federation.featurespec import feature_names
from federation.models import build_model, federations
from server.outputs import RunOutputs, progress_line
from server.release import release_model
from server.secure_fedavg import run_secure_fedavg
from server.strategy import RecordingStrategy, build_strategy, pooled_summaries


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
        out.record_round(tag, rec)
        print(progress_line(tag, rec, rounds=cfg.rounds, heads=heads), flush=True)

    if cfg.secagg.enabled:  # the server sees only sums of updates: server/secure_fedavg.py
        final, last_eval = run_secure_fedavg(
            grid, cfg, heads=heads, initial=ArrayRecord(model.state_dict()), run_dir=out.dir,
            run_id=run_id or config_hash(cfg)[:16], on_round=on_round,
            checkpoint=lambda rnd, arrays: out.save_checkpoint(tag, rnd, arrays.to_torch_state_dict()),
        )
        out.save_final(tag, final.to_torch_state_dict(), heads=heads, feature_names=names)
        release_model(out.dir, cfg, tag=tag, heads=heads, feature_names=names, rounds=out.rounds.get(tag, []), pooled=pooled_summaries(last_eval))
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
    )
    # No round aggregated anything (e.g. every partner refused): the released model is the initial one.
    final = result.arrays if len(result.arrays) else ArrayRecord(model.state_dict())
    out.save_final(tag, final.to_torch_state_dict(), heads=heads, feature_names=names)
    release_model(out.dir, cfg, tag=tag, heads=heads, feature_names=names, rounds=out.rounds.get(tag, []), pooled=strategy.pooled)


def make_server_app(*, config: FedpropConfig | None = None, run_dir: str | Path | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config or from_run_config(context.run_config)
        out = RunOutputs(Path(run_dir or context.run_config.get("fedprop-run-dir", "") or f"runs/flwr-{context.run_id}"))
        out.write_config(cfg)
        for heads in federations(cfg.task, cfg.model.heads):
            run_federation(grid, cfg, heads=heads, out=out, run_id=str(context.run_id))
        out.finish()

    return app


app = make_server_app()
