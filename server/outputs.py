"""Everything a run writes into its directory, atomically: resolved config, per-round metrics (JSON and
CSV), a global-model checkpoint per round and the final model per federation."""
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
        save_model(self.dir / "checkpoints" / f"{tag}_round{server_round:03d}.pt", state_dict, {"round": server_round, "heads": tag})

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
        atomic_write_text(self.dir / "FEDERATION_DONE", "ok\n")


def progress_line(tag: str, rec: dict[str, Any], *, rounds: int, heads: tuple[str, ...]) -> str:
    ev = rec.get("evaluate", {})
    parts = [f"[{tag}] round {rec['round']:>3}/{rounds}"]
    for h in heads:
        auc = ev.get(f"{h}.auc_roc")
        if auc is not None:
            parts.append(f"{h} AUC {auc:.3f}")
    trained = [p for p in rec["partners"].values() if "train" in p]
    eps = [p["train"]["epsilon"] for p in trained if "epsilon" in p["train"]]
    parts.append(f"partners trained {len(trained)}")
    if eps:
        parts.append(f"epsilon max {max(eps):.2f}")
    if rec["refusals"]:
        parts.append(f"refused {len(rec['refusals'])}")
    return " | ".join(parts)
