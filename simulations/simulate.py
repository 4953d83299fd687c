"""`fedprop simulate`: a Hydra-configured federation on Flower's simulation engine plus baselines.

    fedprop simulate partners=8 rounds=20 privacy.epsilon=3 model=mlp task=churn
    fedprop simulate -m privacy.epsilon=0.5,1,2,4,8      # a sweep (Hydra multirun)

Order of work: the config, the contract, the budget policy and EVERY partner's data are checked in the driver
first (simulations/preflight.py); any problem is printed as one report, the run folder is removed and the
command exits non-zero before Ray starts. Then the federation runs, then baselines. Each run writes its own
directory (unique even for runs started in the same second): config, per-round metrics (JSON/CSV),
checkpoints, final models, baselines and a summary (JSON + Markdown) that is also printed.

Partner feature caches live in a private temp folder (0700), encrypted with a per-run key held in memory only,
and are deleted at the end, on SIGTERM too; a run killed with -9 leaves only ciphertext, deleted by the next run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from federation.atomicio import atomic_write_text
from federation.config import FedpropConfig, from_dict
from federation.errors import ConfigError, FedpropError

log = logging.getLogger("fedprop")

# Dependency noise on a healthy run, removed by exact message (never a privacy warning: Opacus's and Flower's
# DP warnings pass untouched). fedprop calls run_simulation on purpose (flower-notes.md: it is the one API that
# lets a Hydra driver hand its typed config to the apps).
_NOISE = ("DEPRECATED FEATURE: The `run_simulation` function is deprecated",)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in _NOISE)


def _quiet_flower(verbose: bool) -> None:
    import flwr.simulation  # noqa: F401 - flwr sets its logger's level when imported: import first, then quiet it

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        flwr_log = logging.getLogger("flwr")
        if not any(isinstance(f, _DropNoise) for f in flwr_log.filters):
            flwr_log.addFilter(_DropNoise())
        # Ray's tip about a future default for num_gpus=0 (it changes nothing here: clients ask for no GPU)
        warnings.filterwarnings("ignore", message=r"Tip: In future versions of Ray", category=FutureWarning)


def _process_seconds() -> float:
    """Seconds since this process started (what the user waited), falling back to the driver's own clock."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - a clock, never a reason to fail
        return time.perf_counter() - _T_IMPORT


_T_IMPORT = time.perf_counter()


@contextlib.contextmanager
def _sigterm_exits(cleanup):
    """SIGTERM -> ``cleanup()`` at once (Ray's own fatal-signal handler may abort the process right after), then
    SystemExit in the main thread, so every ``finally`` (Ray shutdown) runs too."""
    def _exit(signum, frame):
        cleanup()
        print(f"fedprop: stopped by signal {signum}: partner caches deleted", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, _exit)
    except ValueError:  # not the main thread: nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        with contextlib.suppress(Exception):
            ray.shutdown()


def run_simulation(cfg: FedpropConfig, run_dir: Path) -> dict[str, Any]:
    """Check everything, run every federation of ``cfg`` on the simulation engine, then baselines; return the
    summary. Raises ConfigError / PreflightError (nothing started) or FedpropError (the federation failed)."""
    from simulations.partners import cached_partner, new_cache_dir, resolve_for_data
    from simulations.preflight import preflight
    from simulations.privacy_reports import prepare_ledgers

    _quiet_flower(cfg.verbose)
    cfg = prepare_ledgers(resolve_for_data(cfg), run_dir=Path(run_dir))  # absolute ledger dir + policy, checked up front
    # The partners' secret train/test split key for this run (clients/node.py:test_membership): fresh from the OS
    # CSPRNG, shared by the simulated nodes and the driver's baselines (same splits), never in the run config.
    split_key = secrets.token_bytes(32)
    cache_dir = new_cache_dir()
    loader = functools.partial(cached_partner, cache_dir=cache_dir, key=secrets.token_bytes(32))
    with _sigterm_exits(lambda: shutil.rmtree(cache_dir, ignore_errors=True)):
        try:
            t0 = time.perf_counter()
            partners = preflight(cfg, loader=loader, split_key=split_key)  # before Ray: one report or nothing
            names = ", ".join(f"{p.index} {p.name} ({p.n_train}/{p.n_test})" for p in partners)
            print(f"fedprop: {len(partners)} partners checked in {time.perf_counter() - t0:.1f} s "
                  f"(train/test customers): {names}", flush=True)
            return _run(cfg, Path(run_dir), loader, split_key, {p.index: p.name for p in partners})
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)
            _stop_ray()


def _trained_check(rounds: dict[str, list[dict[str, Any]]], cfg: FedpropConfig, run_dir: Path) -> None:
    from federation.models import federations

    for heads in federations(cfg.task, cfg.model.heads):
        tag = "+".join(heads)
        recs = rounds.get(tag, [])
        if not any("train" in p for r in recs for p in r.get("partners", {}).values()):
            refused = sum(len(r.get("refusals", [])) for r in recs)
            raise FedpropError(
                f"no partner trained in federation {tag} ({refused} refusal(s) over {len(recs)} round(s); see "
                f"{run_dir / 'federated_rounds.json'}): its model is the untrained initial one and is not a result. "
                "Raise privacy.epsilon or the budget policy's limits, or fix the partners' data")


def _run(cfg: FedpropConfig, run_dir: Path, partner_loader, split_key: bytes, names: dict[int, str]) -> dict[str, Any]:
    import flwr.simulation

    from clients.client_app import make_client_app
    from clients.node import load_partner
    from server.outputs import load_model
    from server.server_app import make_server_app
    from simulations.baselines import head_metrics, pooled_metrics, run_baselines
    from simulations.privacy_reports import render_privacy_section, write_privacy_reports
    from simulations.summary import build_summary, render_summary

    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"fedprop: {cfg.partners} partners x {cfg.rounds} rounds, task={cfg.task}, model={cfg.model.kind}, "
          f"data={cfg.data.name}, DP target epsilon={cfg.privacy.epsilon if cfg.privacy.enabled else 'off'} "
          f"(delta={cfg.privacy.delta:g}, per partner, unit=customer"
          f"{f', clip C={cfg.privacy.max_grad_norm:g}' if cfg.privacy.enabled else ''}) -> {run_dir}", flush=True)
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
    _stop_ray()  # the federation is over: free the workers before baselines
    if not (run_dir / "FEDERATION_DONE").exists():
        raise FedpropError(f"the federation did not finish; see the log above and {run_dir}")
    t_fed = time.perf_counter() - t0
    rounds = json.loads((run_dir / "federated_rounds.json").read_text())
    try:
        _trained_check(rounds, cfg, run_dir)
    except FedpropError:  # nothing trained: no model, but compliance still gets each partner's verified report
        write_privacy_reports(cfg, run_dir)
        raise
    print(f"fedprop: federation finished in {t_fed:.1f} s"
          + ("; baselines on the same splits:" if cfg.baselines.enabled else " (baselines disabled)"), flush=True)

    from federation.models import build_model, federations

    results: dict[str, Any] = {}
    for heads in federations(cfg.task, cfg.model.heads):
        tag = "+".join(heads)
        parts = [load_partner(cfg, node_config={"partition-id": i, "num-partitions": cfg.partners},
                              loader=partner_loader, heads_key=",".join(heads), split_key=split_key)
                 for i in range(cfg.partners)]
        sd, meta = load_model(run_dir / f"model_{tag}.pt")
        model = build_model(cfg.model, n_features=len(meta["feature_names"]), n_outputs=len(heads))
        model.load_state_dict(sd)
        base = (run_baselines(cfg, parts, progress=_progress(tag), global_model=model)  # + personalised, per node
                if cfg.baselines.enabled else None)
        results[tag] = {
            "heads": list(heads),
            "federated_pooled": pooled_metrics(model, parts),
            "federated_per_partner": {str(p.partition_id): head_metrics(model, p) for p in parts},
            "baselines": base,
            "rounds": rounds.get(tag, []),
            "partners": {str(p.partition_id): {"n_train": p.n_train, "n_test": p.n_test, "name": names.get(
                p.partition_id, f"partner-{p.partition_id}")} for p in parts},
        }
    summary = build_summary(cfg, results, wall_time_s=_process_seconds(), federation_time_s=t_fed)
    summary["partner_names"] = {str(k): v for k, v in names.items()}
    summary["privacy_reports"] = write_privacy_reports(cfg, run_dir)  # <run_dir>/privacy/partner-<i>.*
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=float))
    text = render_summary(summary) + render_privacy_section(summary["privacy_reports"])
    if any(v != f"partner-{k}" for k, v in names.items()):
        text += "\nPartners: " + ", ".join(f"{k} = {v}" for k, v in sorted(names.items())) + "\n"
    atomic_write_text(run_dir / "summary.md", text)
    print(text, flush=True)
    from simulations.report import write_report

    paths = write_report(run_dir)  # report.html (figures embedded), report.md, report.json
    print(f"fedprop: report: {paths['report.html']} (and report.md, report.json); "
          f"done in {_process_seconds():.0f} s wall (from start-up)", flush=True)
    return summary


def _progress(tag: str):
    """Baseline progress: one line per model, with elapsed seconds (they take tens of seconds on real data)."""
    t0 = time.perf_counter()

    def report(done: int, total: int, what: str) -> None:
        print(f"fedprop:   [{tag}] baseline {done}/{total} {what} ({time.perf_counter() - t0:.0f} s)", flush=True)

    return report


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="fedprop_schema", node=FedpropConfig)


def _unique_dir(base: Path) -> Path:
    """``base/<timestamp>``, or ``<timestamp>_2``, ``_3``... : created atomically, so two simulations started in
    the same second never share a folder."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    base.mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        path = base / (stamp if k == 1 else f"{stamp}_{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"could not create a run folder under {base} (1000 runs this second?)")


def _remove_if_unused(path: Path) -> None:
    """Remove a run folder this process created when the run wrote nothing of its own (only Hydra's files),
    and ``runs/`` (``runs/multirun/``) when that leaves them empty."""
    if path.is_dir():
        ours = [p for p in path.rglob("*") if p.is_file() and ".hydra" not in p.parts and p.name != "multirun.yaml"]
        if ours:
            return
        shutil.rmtree(path, ignore_errors=True)
    for parent in (path.parent, path.parent.parent):
        if parent.name in ("runs", "multirun"):
            with contextlib.suppress(OSError):
                parent.rmdir()  # only when empty


def unknown_override_keys(overrides: list[str], conf_dir: Path) -> list[str]:
    """One message per ``key=value`` override whose key is not in the typed schema (``FedpropConfig``) or whose
    config-group choice (``data=``, ``model=``) has no YAML, with the close matches and the keys or choices that
    exist. Hydra's own message for these names the key but suggests ``+key=`` (which the schema refuses anyway)."""
    import difflib
    import typing

    from federation.config import FedpropConfig

    custom_dirs = any(o in ("-cd", "--config-dir") or o.startswith(("--config-dir=", "-cd=")) for o in overrides)
    out = []
    for o in overrides:
        if o.startswith(("-", "+", "~", "hydra.", "hydra/")) or "=" not in o:
            continue
        key, value = o.split("=", 1)
        parts = key.split(".")
        if len(parts) == 1 and parts[0] in ("data", "model"):
            choices = sorted(p.stem for p in (conf_dir / parts[0]).glob("*.yaml"))
            bad = [v for v in value.split(",") if v and v not in choices]
            if bad and not custom_dirs:  # --config-dir adds search paths with more choices
                out.append(f"{parts[0]}={bad[0]}: no such {parts[0]} config; choose one of {', '.join(choices)} "
                           f"(or put {parts[0]}/{bad[0]}.yaml in a folder given with --config-dir)")
            continue
        node: Any = FedpropConfig
        for i, part in enumerate(parts):
            if not dataclasses.is_dataclass(node):
                break  # a dict- or list-typed value: its keys are free
            hints = typing.get_type_hints(node)
            if part not in hints:
                where = ".".join(parts[:i]) or "the top level"
                close = difflib.get_close_matches(part, list(hints), n=1)
                out.append(f"unknown config key {key!r}: {where} has no {part!r}"
                           + (f" (did you mean {'.'.join([*parts[:i], close[0]])!r}?)" if close else "")
                           + f"; keys there: {', '.join(hints)}")
                break
            node = hints[part]
    return out


def hydra_main(overrides: list[str]) -> int:
    """Run the Hydra app with ``overrides`` (the command line after ``fedprop simulate``)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from simulations.preflight import PreflightError

    _register_schema()
    conf_dir = str(Path(__file__).resolve().parent.parent / "conf")
    bad_keys = unknown_override_keys(overrides, Path(conf_dir))
    if bad_keys:
        print("fedprop: nothing ran:\n" + "\n".join(f"  - {m}" for m in bad_keys), file=sys.stderr, flush=True)
        return 2
    status = {"rc": 0, "jobs": 0, "failed": 0}
    multirun = any(a in ("-m", "--multirun") for a in overrides)
    made: Path | None = None
    if not any(o.split("=")[0].lstrip("+~") in ("hydra.run.dir", "hydra.sweep.dir") for o in overrides):
        made = _unique_dir(Path("runs/multirun") if multirun else Path("runs"))
        overrides = [*overrides, f"hydra.{'sweep' if multirun else 'run'}.dir={made}"]
    # Hydra's logging config prints every INFO record of any library as "[HYDRA] ..." (alembic's plugin setup,
    # Flower's deprecation): keep Hydra's own lines, raise the floor for everything else.
    logging.getLogger("alembic").setLevel(logging.WARNING)

    @hydra.main(config_path=conf_dir, config_name="config", version_base="1.3")
    def _main(dcfg) -> None:
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("hydra").setLevel(logging.INFO)
        status["jobs"] += 1
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            cfg = from_dict(OmegaConf.to_container(dcfg, resolve=True))
            run_simulation(cfg, run_dir)
        except (ConfigError, PreflightError) as exc:  # refused before anything ran: leave nothing behind
            print(f"fedprop: {exc}", file=sys.stderr, flush=True)
            status["rc"], status["failed"] = 2, status["failed"] + 1
            shutil.rmtree(run_dir, ignore_errors=True)
        except FedpropError as exc:
            print(f"fedprop: {exc}", file=sys.stderr, flush=True)
            status["rc"] = max(status["rc"], 1)
            status["failed"] += 1

    argv = sys.argv
    sys.argv = ["fedprop simulate", *overrides]
    try:
        _main()
    except SystemExit as exc:  # Hydra's own errors (a bad override) exit here after printing one message
        status["rc"] = status["rc"] or (exc.code if isinstance(exc.code, int) and exc.code else 2)
    finally:
        sys.argv = argv
        if made is not None:
            _remove_if_unused(made)
    if multirun and made is not None and made.is_dir() and status["jobs"]:
        print(f"fedprop: sweep finished: {status['jobs'] - status['failed']} of {status['jobs']} run(s) in {made}. "
              f"Build its report (privacy-utility curve) with:\n  fedprop report {made}", flush=True)
    return status["rc"]
