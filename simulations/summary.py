"""The run summary: per task, federated-DP vs centralized vs local-only, and each partner's epsilon."""
from __future__ import annotations

import math
from typing import Any

from federation.config import FedpropConfig, to_dict


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def build_summary(cfg: FedpropConfig, results: dict[str, Any], *, wall_time_s: float, federation_time_s: float) -> dict[str, Any]:
    tasks: dict[str, Any] = {}
    partners: dict[str, Any] = {}
    for tag, r in results.items():
        last = r["rounds"][-1] if r["rounds"] else {"partners": {}, "evaluate": {}}
        for pid, info in r["partners"].items():
            p = partners.setdefault(pid, {"n_train": info["n_train"], "n_test": info["n_test"], "epsilon": {}})
            eps = [rr["partners"].get(pid, {}).get("train", {}).get("epsilon") for rr in r["rounds"]]
            eps = [e for e in eps if e is not None]
            p["epsilon"][tag] = eps[-1] if eps else None
            p["refused_rounds"] = p.get("refused_rounds", 0) + sum(
                1 for rr in r["rounds"] for ref in rr["refusals"] if f"partner {pid}:" in (ref.get("reason") or ""))
        for head in r["heads"]:
            base = r["baselines"]
            row: dict[str, Any] = {
                "federated_dp_auc": r["federated_pooled"][head]["auc_roc"],
                "federated_dp_top_decile_lift": r["federated_pooled"][head]["top_decile_lift"],
                "federated_eval_auc_from_histograms": last["evaluate"].get(f"{head}.auc_roc"),
                "base_rate": r["federated_pooled"][head]["base_rate"],
                "per_partner": {},
            }
            if base:
                row["centralized_auc"] = base["centralized"]["pooled"][head]["auc_roc"]
                row["centralized_top_decile_lift"] = base["centralized"]["pooled"][head]["top_decile_lift"]
                local = {pid: m[head]["auc_roc"] for pid, m in base["local_only"]["per_partner"].items()}
                row["local_only_auc_mean"] = _mean(list(local.values()))
                for pid in r["partners"]:
                    row["per_partner"][pid] = {
                        "federated_dp_auc": (last["partners"].get(pid, {}).get("evaluate", {}) or {}).get(f"{head}.auc"),
                        "local_only_auc": local.get(pid),
                        "centralized_auc": base["centralized"]["per_partner"][pid][head]["auc_roc"],
                    }
            tasks[head] = row
    return {
        "config": to_dict(cfg),
        "tasks": tasks,
        "partners": partners,
        "privacy": {
            "enabled": cfg.privacy.enabled,
            "target_epsilon": cfg.privacy.epsilon,
            "delta": cfg.privacy.delta,
            "unit": "one customer (add/remove one customer's row)",
            "accountant": "Opacus RDP, Poisson-subsampled Gaussian, composed over all rounds",
        },
        "wall_time_s": wall_time_s,
        "federation_time_s": federation_time_s,
    }


def _f(x: Any, nd: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def render_summary(s: dict[str, Any]) -> str:
    lines = ["", "## fedprop summary", "",
             "| task | federated-DP AUC | centralized AUC | local-only AUC (mean) | fed-DP top-decile lift | base rate |",
             "|---|---|---|---|---|---|"]
    for task, r in s["tasks"].items():
        lines.append(f"| {task} | {_f(r['federated_dp_auc'])} | {_f(r.get('centralized_auc'))} | "
                     f"{_f(r.get('local_only_auc_mean'))} | {_f(r['federated_dp_top_decile_lift'], 2)} | {_f(r['base_rate'])} |")
    pv = s["privacy"]
    lines += ["", f"Privacy: {'DP-SGD, target epsilon ' + _f(pv['target_epsilon'], 2) + ', delta ' + format(pv['delta'], 'g') if pv['enabled'] else 'OFF (non-private run)'}; "
              f"unit: {pv['unit']}; accountant: {pv['accountant']}.", "",
              "| partner | train customers | test customers | final epsilon | refused rounds |", "|---|---|---|---|---|"]
    for pid, p in sorted(s["partners"].items(), key=lambda kv: int(kv[0])):
        eps = ", ".join(f"{_f(v, 3)}" for v in p["epsilon"].values())
        lines.append(f"| {pid} | {p['n_train']} | {p['n_test']} | {eps} | {p.get('refused_rounds', 0)} |")
    lines += ["", f"Wall time {s['wall_time_s']:.1f} s (federation {s['federation_time_s']:.1f} s).", ""]
    return "\n".join(lines)
