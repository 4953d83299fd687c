"""Everything a run writes into its directory, atomically: resolved config, the run's identity (``run.json``),
per-round metrics (JSON and CSV), a global-model checkpoint per round and the final model per federation; and
what a resumed run reads back (``check_resumable``, ``RunOutputs.resume_point``)."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import torch

from federation.atomicio import atomic_write_bytes, atomic_write_text
from federation.config import FedpropConfig, config_hash, to_dict
from server.run_id import ResumeError

RUN_FILE = "run.json"
DONE_FILE = "FEDERATION_DONE"


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def save_model(path: Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save({"state_dict": state_dict, "meta": meta}, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def load_model(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    return blob["state_dict"], blob["meta"]


class RunOutputs:
    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rounds: dict[str, list[dict[str, Any]]] = {}
        self.cfg: FedpropConfig | None = None

    def write_config(self, cfg: FedpropConfig) -> None:
        self.cfg = cfg
        atomic_write_text(self.dir / "config.json", json.dumps({"config": to_dict(cfg), "config_hash": config_hash(cfg)}, indent=2))

    def write_run(self, *, run_id: str, run_config: dict[str, Any], flower_run_id: int | None = None) -> None:
        """``run.json``: the fedprop run id partners key their ledgers by, and the run config as the ServerApp received
        it (what ``fedprop server resume`` submits again). A resume appends its Flower run id to ``flower_runs``."""
        path = self.dir / RUN_FILE
        old = json.loads(path.read_text()) if path.exists() else {}
        runs = [*(old.get("flower_runs", []) if old.get("fedprop_run_id") == run_id else []),
                *([int(flower_run_id)] if flower_run_id is not None else [])]
        atomic_write_text(path, json.dumps({"fedprop_run_id": run_id, "config_hash": config_hash(self.cfg) if self.cfg
                                            else old.get("config_hash"), "run_config": run_config,
                                            "flower_runs": runs}, indent=2, sort_keys=True))

    def load_rounds(self) -> None:
        """A resumed run appends to the rounds already recorded (``federated_rounds.json``)."""
        path = self.dir / "federated_rounds.json"
        if path.exists():
            try:
                self.rounds = {str(k): list(v) for k, v in json.loads(path.read_text()).items()}
            except (ValueError, AttributeError) as exc:
                raise ResumeError(f"{path} is not readable JSON ({exc}); restore it from a backup or start a new run "
                                  "(`fedprop server submit`)") from None

    def resume_point(self, tag: str, cfg: FedpropConfig) -> tuple[int, dict[str, torch.Tensor] | None]:
        """``last_checkpoint`` of federation ``tag``; a checkpoint whose round record was lost in the crash (the
        checkpoint is written first) gets a record that says so (counted as not aggregated: fail closed)."""
        rnd, state = last_checkpoint(self.dir, tag, cfg, recorded=[int(r["round"]) for r in self.rounds.get(tag, [])])
        if rnd and rnd not in [int(r["round"]) for r in self.rounds.get(tag, [])]:
            self.record_round(tag, {"round": rnd, "partners": {}, "refusals": [], "recovered_from_checkpoint": (
                "the server stopped after this round's checkpoint and before its record: who trained and the "
                "round's evaluation are not known here (see the partners' ledgers)")})
        return rnd, state

    def record_round(self, tag: str, rec: dict[str, Any]) -> None:
        self.rounds.setdefault(tag, []).append(_clean(rec))
        atomic_write_text(self.dir / "federated_rounds.json", json.dumps(self.rounds, indent=1))
        rows = []
        for t, recs in self.rounds.items():
            for r in recs:
                row = {"federation": t, "round": r["round"], "partners_trained": len(r["partners"]) - sum(
                    1 for p in r["partners"].values() if "train" not in p), "refusals": len(r["refusals"])}
                row.update({k: v for k, v in r.get("evaluate", {}).items()})
                eps = [p["train"]["epsilon"] for p in r["partners"].values() if "train" in p and "epsilon" in p["train"]]
                row["max_epsilon"] = max(eps) if eps else None
                rows.append(row)
        keys = list(dict.fromkeys(k for row in rows for k in row))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.dir / "federated_rounds.csv", buf.getvalue())

    def save_checkpoint(self, tag: str, server_round: int, state_dict: dict[str, torch.Tensor]) -> None:
        meta = {"round": server_round, "heads": tag, **({"config_hash": config_hash(self.cfg)} if self.cfg else {})}
        save_model(self.dir / "checkpoints" / f"{tag}_round{server_round:03d}.pt", state_dict, meta)

    def save_final(self, tag: str, state_dict: dict[str, torch.Tensor], *, heads: tuple[str, ...], feature_names: tuple[str, ...]) -> None:
        assert self.cfg is not None
        meta = {
            "heads": list(heads),
            "feature_names": list(feature_names),
            "model": to_dict(self.cfg)["model"],
            "rounds": self.cfg.rounds,
            "config_hash": config_hash(self.cfg),
        }
        save_model(self.dir / f"model_{tag}.pt", state_dict, meta)

    def finish(self) -> None:
        atomic_write_text(self.dir / DONE_FILE, "ok\n")

    def federation_finished(self, tag: str) -> bool:
        """Whether federation ``tag`` already ended: its model released, or its release refused."""
        return (self.dir / f"model_{tag}.pt").exists() or (self.dir / f"RELEASE_REFUSED_{tag}.json").exists()


def last_checkpoint(run_dir: Path, tag: str, cfg: FedpropConfig, *,
                    recorded: list[int]) -> tuple[int, dict[str, torch.Tensor] | None]:
    """The last complete round of federation ``tag`` in ``run_dir`` and its global model (0, None: none yet).

    Complete = its checkpoint exists and loads. A round in ``recorded`` (federated_rounds.json) without its
    checkpoint, a corrupt checkpoint, or one written under another config or federation is one ResumeError
    naming the file and what to do."""
    found = sorted(Path(run_dir).glob(f"checkpoints/{tag}_round*.pt"))
    if not found:
        if recorded:
            raise ResumeError(f"{run_dir}/federated_rounds.json records round(s) {recorded} of {tag} but "
                              f"{run_dir}/checkpoints/ has no {tag}_roundNNN.pt: there is no model to resume from; "
                              "start a new run (`fedprop server submit`)")
        return 0, None
    path = found[-1]
    try:
        state, meta = load_model(path)
        rnd = int(meta["round"])
    except Exception as exc:  # noqa: BLE001 -- torch raises many kinds for a truncated or foreign file
        raise ResumeError(f"checkpoint {path} cannot be read ({type(exc).__name__}); delete it to resume from the "
                          "round before, or start a new run (`fedprop server submit`)") from None
    if meta.get("heads") != tag or path.name != f"{tag}_round{rnd:03d}.pt":
        raise ResumeError(f"checkpoint {path} is round {rnd} of federation {meta.get('heads')!r}, not {path.name}: "
                          "the run directory was changed by hand; restore it or start a new run")
    if meta.get("config_hash", config_hash(cfg)) != config_hash(cfg):
        raise ResumeError(f"checkpoint {path} was written under another config (hash {str(meta['config_hash'])[:12]}, "
                          f"this run {config_hash(cfg)[:12]}): resume with the run's own config (run.json)")
    if rnd > cfg.rounds:
        raise ResumeError(f"checkpoint {path} is round {rnd} but the config has rounds={cfg.rounds}")
    later = [r for r in recorded if r > rnd]
    if later:
        raise ResumeError(f"{run_dir}/federated_rounds.json records round(s) {later} of {tag} after the last "
                          f"checkpoint {path}: the checkpoint of round {later[0]} is missing; restore it or start a "
                          "new run")
    return rnd, state


def check_resumable(run_dir: str | Path) -> dict[str, Any]:
    """``run.json`` of a run that can be resumed (started, not finished); else one ResumeError naming the file."""
    run_dir = Path(run_dir)
    if (run_dir / DONE_FILE).exists():
        raise ResumeError(f"{run_dir / DONE_FILE} exists: this run finished, there is nothing to resume; its model and "
                          "report are in that folder (start a new run with `fedprop server submit`)")
    path = run_dir / RUN_FILE
    if not path.exists():
        raise ResumeError(f"{path} not found: {run_dir} is not the run directory of a started fedprop run (the "
                          "ServerApp writes run.json when a run starts; pass the folder given as fedprop-run-dir)")
    try:
        run = json.loads(path.read_text())
        run_id, run_config = str(run["fedprop_run_id"]), dict(run["run_config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ResumeError(f"{path} is not a fedprop run file ({type(exc).__name__}: {exc}); restore it or start a new "
                          "run") from None
    cfg_path = run_dir / "config.json"
    saved = json.loads(cfg_path.read_text()).get("config_hash") if cfg_path.exists() else None
    if saved is None or saved != run.get("config_hash"):
        raise ResumeError(f"{cfg_path} (config hash {str(saved)[:12]}) does not match {path} (config hash "
                          f"{str(run.get('config_hash'))[:12]}): the run directory belongs to another run or config; "
                          "restore it or start a new run")
    return {**run, "fedprop_run_id": run_id, "run_config": run_config}


def progress_line(tag: str, rec: dict[str, Any], *, rounds: int, heads: tuple[str, ...]) -> str:
    ev = rec.get("evaluate", {})
    parts = [f"[{tag}] round {rec['round']:>3}/{rounds}"]
    for h in heads:
        auc = ev.get(f"{h}.auc_roc")
        if auc is not None:
            hw = ev.get(f"{h}.auc_roc_half_width")
            shown = f"{h} AUC {auc:.3f}" + (f" +-{hw:.3f}" if isinstance(hw, (int, float)) and hw == hw else "")
            meaningful = ev.get(f"{h}.auc_roc_meaningful")  # 0/1 in Flower's metric records
            if meaningful is not None and not bool(meaningful):  # the summary says the same of this DP release
                shown += " (not meaningful at this noise)"
            parts.append(shown)
    trained = [p for p in rec["partners"].values() if "train" in p]
    eps = [p["train"]["epsilon"] for p in trained if "epsilon" in p["train"]]
    parts.append(f"partners trained {len(trained)}")
    if eps:
        parts.append(f"epsilon max {max(eps):.2f}")
    if rec["refusals"]:
        parts.append(f"refused {len(rec['refusals'])}")
    return " | ".join(parts)
