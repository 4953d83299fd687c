"""`fedprop simulate`: a Hydra-configured federation on Flower's simulation engine plus baselines.

    fedprop simulate partners=8 rounds=20 privacy.epsilon=3 model=mlp task=churn
    fedprop simulate -m privacy.epsilon=0.5,1,2,4,8      # a sweep (Hydra multirun)

Each run writes its own directory: config, per-round metrics (JSON/CSV), checkpoints, final models,
baselines and a summary (JSON + Markdown) that is also printed.
"""
from __future__ import annotations

import functools
import json
import logging
import secrets
import shutil
import os
import sys
import time
from pathlib import Path
from typing import Any

from federation.atomicio import atomic_write_text
from federation.config import FedpropConfig, from_dict
from federation.errors import ConfigError, FedpropError

log = logging.getLogger("fedprop")


def _quiet_flower(verbose: bool) -> None:
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def run_simulation(cfg: FedpropConfig, run_dir: Path) -> dict[str, Any]:
    """Run every federation of ``cfg`` on the simulation engine, then baselines; return the summary."""
    import flwr.simulation

    from clients.client_app import make_client_app
    from clients.node import load_partner
    from server.outputs import load_model
    from server.server_app import make_server_app
    from simulations.baselines import head_metrics, pooled_metrics, run_baselines
    from simulations.partners import cached_partner
    from simulations.partners import resolve_for_data
    from simulations.summary import build_summary, render_summary

    from simulations.privacy_reports import prepare_ledgers, render_privacy_section, write_privacy_reports

    cfg = prepare_ledgers(resolve_for_data(cfg))  # absolute ledger dir + policy, policy checked up front
    run_dir = Path(run_dir)
    cache_dir = run_dir / ".partner-cache"  # features built once per partner per run; deleted at the end
    partner_loader = functools.partial(cached_partner, cache_dir=str(cache_dir))
    try:
        return _run(cfg, run_dir, partner_loader)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def _run(cfg: FedpropConfig, run_dir: Path, partner_loader) -> dict[str, Any]:
    import flwr.simulation

    from clients.client_app import make_client_app
    from clients.node import load_partner
    from server.outputs import load_model
    from server.server_app import make_server_app
    from simulations.baselines import head_metrics, pooled_metrics, run_baselines
    from simulations.privacy_reports import render_privacy_section, write_privacy_reports
    from simulations.summary import build_summary, render_summary

    run_dir.mkdir(parents=True, exist_ok=True)
    _quiet_flower(cfg.verbose)
    # The partners' secret train/test split key for this run (clients/node.py:test_membership): fresh from the OS
    # CSPRNG, shared by the simulated nodes and the driver's baselines (same splits), never in the run config.
    split_key = secrets.token_bytes(32)
    t0 = time.perf_counter()
    print(f"fedprop: {cfg.partners} partners x {cfg.rounds} rounds, task={cfg.task}, model={cfg.model.kind}, "
          f"data={cfg.data.name}, DP target epsilon={cfg.privacy.epsilon if cfg.privacy.enabled else 'off'} "
          f"(delta={cfg.privacy.delta:g}, per partner, unit=customer) -> {run_dir}", flush=True)
    flwr.simulation.run_simulation(
        server_app=make_server_app(config=cfg, run_dir=run_dir),
        client_app=make_client_app(config=cfg, loader=partner_loader, split_key=split_key),
        num_supernodes=cfg.partners,
        backend_config={
            "client_resources": {"num_cpus": cfg.num_cpus_per_client, "num_gpus": 0.0},
            "init_args": {"logging_level": "WARNING" if not cfg.verbose else "INFO", "log_to_driver": cfg.verbose},
        },
        verbose_logging=cfg.verbose,
    )
    if not (run_dir / "FEDERATION_DONE").exists():
        raise FedpropError(f"the federation did not finish; see the log above and {run_dir}")
    t_fed = time.perf_counter() - t0
    print(f"fedprop: federation finished in {t_fed:.1f} s; computing baselines on the same splits ...", flush=True)

    from federation.models import build_model, federations

    rounds = json.loads((run_dir / "federated_rounds.json").read_text())
    results: dict[str, Any] = {}
    for heads in federations(cfg.task, cfg.model.heads):
        tag = "+".join(heads)
        parts = [load_partner(cfg, node_config={"partition-id": i, "num-partitions": cfg.partners},
                              loader=partner_loader, heads_key=",".join(heads), split_key=split_key)
                 for i in range(cfg.partners)]
        sd, meta = load_model(run_dir / f"model_{tag}.pt")
        model = build_model(cfg.model, n_features=len(meta["feature_names"]), n_outputs=len(heads))
        model.load_state_dict(sd)
        base = run_baselines(cfg, parts) if cfg.baselines.enabled else None
        results[tag] = {
            "heads": list(heads),
            "federated_pooled": pooled_metrics(model, parts),
            "federated_per_partner": {str(p.partition_id): head_metrics(model, p) for p in parts},
            "baselines": base,
            "rounds": rounds.get(tag, []),
            "partners": {str(p.partition_id): {"n_train": p.n_train, "n_test": p.n_test} for p in parts},
        }
    summary = build_summary(cfg, results, wall_time_s=time.perf_counter() - t0, federation_time_s=t_fed)
    summary["privacy_reports"] = write_privacy_reports(cfg, run_dir)  # <run_dir>/privacy/partner-<i>.*
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=float))
    text = render_summary(summary) + render_privacy_section(summary["privacy_reports"])
    atomic_write_text(run_dir / "summary.md", text)
    print(text, flush=True)
    from simulations.report import write_report

    paths = write_report(run_dir)  # report.html (figures embedded), report.md, report.json
    print(f"fedprop: report: {paths['report.html']} (and report.md, report.json)", flush=True)
    return summary


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="fedprop_schema", node=FedpropConfig)


def hydra_main(overrides: list[str]) -> int:
    """Run the Hydra app with ``overrides`` (the command line after ``fedprop simulate``)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    _register_schema()
    conf_dir = str(Path(__file__).resolve().parent.parent / "conf")
    status = {"rc": 0}

    @hydra.main(config_path=conf_dir, config_name="config", version_base="1.3")
    def _main(dcfg) -> None:
        try:
            cfg = from_dict(OmegaConf.to_container(dcfg, resolve=True))
        except ConfigError as exc:
            print(f"fedprop: {exc}", file=sys.stderr)
            status["rc"] = 2
            return
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            run_simulation(cfg, run_dir)
        except FedpropError as exc:
            print(f"fedprop: {exc}", file=sys.stderr)
            status["rc"] = 1

    argv = sys.argv
    sys.argv = ["fedprop simulate", *overrides]
    try:
        _main()
    finally:
        sys.argv = argv
    return status["rc"]
