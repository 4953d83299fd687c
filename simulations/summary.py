"""The run summary: per task, federated-DP vs centralized vs local-only, the federation's value to each
partner, and each partner's epsilon.

Federation value, per partner and head, all on that partner's own held-out customers (the same split the
federation evaluated): the partner's local-only non-private model, the final federated-DP global model and
the centralized non-private model trained on everyone's pooled training data (the upper bound). The gain
from federating is ``federated_dp - local_only`` (AUC points and top-decile lift).
"""
from __future__ import annotations

import math
from typing import Any

from federation.config import FedpropConfig, to_dict

CURVE_KEYS = ("gains", "reliability")


def _mean(xs: list[float | None]) -> float:
    ys = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(ys) / len(ys) if ys else float("nan")


def _get(m: dict[str, Any] | None, head: str, key: str) -> float | None:
    if not m or head not in m:
        return None
    v = m[head].get(key)
    return None if v is None else float(v)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or math.isnan(a) or math.isnan(b) else a - b


def _curves(m: dict[str, Any] | None) -> dict[str, Any] | None:
    return {k: m[k] for k in CURVE_KEYS if k in m} if m else None


def partner_value(head: str, pid: str, *, federated: dict | None, local: dict | None, central: dict | None,
                  n_test: int) -> dict[str, Any]:
    """One partner's row of the federation-value table for ``head`` (None where a model is missing)."""
    row: dict[str, Any] = {"n_test": n_test}
    for name, m in (("local_only", local), ("federated_dp", federated), ("centralized", central)):
        row[f"{name}_auc"] = _get(m, head, "auc_roc")
        row[f"{name}_top_decile_lift"] = _get(m, head, "top_decile_lift")
    row["gain_auc"] = _diff(row["federated_dp_auc"], row["local_only_auc"])
    row["gain_top_decile_lift"] = _diff(row["federated_dp_top_decile_lift"], row["local_only_top_decile_lift"])
    row["gap_to_centralized_auc"] = _diff(row["centralized_auc"], row["federated_dp_auc"])
    return row


def build_summary(cfg: FedpropConfig, results: dict[str, Any], *, wall_time_s: float, federation_time_s: float) -> dict[str, Any]:
    """``results[tag]``: heads, federated_pooled, federated_per_partner (optional), baselines, rounds, partners."""
    tasks: dict[str, Any] = {}
    partners: dict[str, Any] = {}
    for tag, r in results.items():
        last = r["rounds"][-1] if r["rounds"] else {"partners": {}, "evaluate": {}}
        for pid, info in r["partners"].items():
            p = partners.setdefault(pid, {"n_train": info["n_train"], "n_test": info["n_test"], "epsilon": {}})
            eps = [(lambda t: t.get("epsilon-with-evaluation", t.get("epsilon")))(rr["partners"].get(pid, {}).get("train", {}))
                   for rr in r["rounds"]]
            eps = [e for e in eps if e is not None]
            p["epsilon"][tag] = eps[-1] if eps else None
            p["refused_rounds"] = p.get("refused_rounds", 0) + sum(
                1 for rr in r["rounds"] for ref in rr["refusals"] if f"partner {pid}:" in (ref.get("reason") or ""))
        base = r.get("baselines")
        fed_pp = r.get("federated_per_partner") or {}
        for head in r["heads"]:
            pooled = r["federated_pooled"][head]
            row: dict[str, Any] = {
                "federation": tag,
                "federated_dp_auc": pooled["auc_roc"],
                "federated_dp_top_decile_lift": pooled["top_decile_lift"],
                "federated_eval_auc_from_histograms": last["evaluate"].get(f"{head}.auc_roc"),
                # the DP evaluation release's 95% noise half-width (None for exact, non-private histograms)
                "federated_eval_auc_half_width": last["evaluate"].get(f"{head}.auc_roc_half_width"),
                "federated_eval_auc_meaningful": bool(last["evaluate"].get(f"{head}.auc_roc_meaningful", 1)),
                "base_rate": pooled["base_rate"],
                "per_partner": {},
                "curves": {"federated_dp": _curves(pooled)},
            }
            if base:
                cpool = base["centralized"]["pooled"][head]
                row["centralized_auc"] = cpool["auc_roc"]
                row["centralized_top_decile_lift"] = cpool["top_decile_lift"]
                row["curves"]["centralized"] = _curves(cpool)
                local = base["local_only"]["per_partner"]
                row["local_only_auc_mean"] = _mean([_get(local.get(pid), head, "auc_roc") for pid in r["partners"]])
                row["local_only_top_decile_lift_mean"] = _mean(
                    [_get(local.get(pid), head, "top_decile_lift") for pid in r["partners"]])
            for pid, info in r["partners"].items():
                federated = fed_pp.get(pid)
                if federated is None:  # fall back on the partner's own evaluation reply of the last round
                    ev = (last["partners"].get(pid, {}).get("evaluate") or {})
                    federated = {head: {"auc_roc": ev.get(f"{head}.auc"),
                                        "top_decile_lift": ev.get(f"{head}.top-decile-lift")}}
                row["per_partner"][pid] = partner_value(
                    head, pid, federated=federated,
                    local=base["local_only"]["per_partner"].get(pid) if base else None,
                    central=base["centralized"]["per_partner"].get(pid) if base else None,
                    n_test=info["n_test"])
            gains = [v["gain_auc"] for v in row["per_partner"].values()]
            row["partners_gaining_auc"] = sum(1 for g in gains if g is not None and g > 0)
            row["mean_gain_auc"] = _mean(gains)
            tasks[head] = row
    rounds_with_training = {
        tag: sum(1 for rr in r["rounds"] if any("train" in p for p in rr["partners"].values())) for tag, r in results.items()
    }
    return {
        "rounds_with_training": rounds_with_training,
        "config": to_dict(cfg),
        "tasks": tasks,
        "partners": partners,
        "privacy": {
            "enabled": cfg.privacy.enabled,
            "target_epsilon": cfg.privacy.epsilon,
            "delta": cfg.privacy.delta,
            "unit": "one customer (add/remove one customer's row)",
            "accountant": (f"{cfg.privacy.accountant}: every DP-SGD round (Poisson-subsampled Gaussian) and every evaluation "
                           f"release (discrete Gaussian, {cfg.evaluation.epsilon_share:.0%} of the budget) composed"),
            "noise": cfg.privacy.noise,
        },
        "wall_time_s": wall_time_s,
        "federation_time_s": federation_time_s,
    }


def _f(x: Any, nd: int = 3, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}"


def render_value_table(s: dict[str, Any]) -> list[str]:
    """Markdown lines: per task and partner, local-only / fed-DP / centralized AUC and top-decile lift."""
    lines = ["| task | partner | test customers | local-only AUC | fed-DP AUC | centralized AUC | gain AUC "
             "| local-only lift@10% | fed-DP lift@10% | centralized lift@10% | gain lift |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, r in s["tasks"].items():
        for pid, v in sorted(r.get("per_partner", {}).items(), key=lambda kv: int(kv[0])):
            lines.append(
                f"| {task} | {pid} | {v['n_test']} | {_f(v['local_only_auc'])} | {_f(v['federated_dp_auc'])} | "
                f"{_f(v['centralized_auc'])} | {_f(v['gain_auc'], signed=True)} | "
                f"{_f(v['local_only_top_decile_lift'], 2)} | {_f(v['federated_dp_top_decile_lift'], 2)} | "
                f"{_f(v['centralized_top_decile_lift'], 2)} | {_f(v['gain_top_decile_lift'], 2, signed=True)} |")
    return lines


def render_summary(s: dict[str, Any]) -> str:
    lines = ["", "## fedprop summary", "",
             "| task | federated-DP AUC | centralized AUC | local-only AUC (mean) | fed-DP top-decile lift | base rate |",
             "|---|---|---|---|---|---|"]
    for task, r in s["tasks"].items():
        lines.append(f"| {task} | {_f(r['federated_dp_auc'])} | {_f(r.get('centralized_auc'))} | "
                     f"{_f(r.get('local_only_auc_mean'))} | {_f(r['federated_dp_top_decile_lift'], 2)} | {_f(r['base_rate'])} |")
    lines += ["", "Federated evaluation (what a deployment sees: partners' DP releases of held-out counts, summed; "
              "the table above is the simulation's exact evaluation of the same model):"]
    for task, r in s["tasks"].items():
        est, hw = r.get("federated_eval_auc_from_histograms"), r.get("federated_eval_auc_half_width")
        if est is None:
            lines.append(f"- {task}: not evaluated")
        elif hw is None:
            lines.append(f"- {task}: AUC {_f(est)} (exact histograms, non-private run)")
        elif not r.get("federated_eval_auc_meaningful", True):
            lines.append(f"- {task}: AUC not meaningful at this noise level (95% noise interval +-{_f(hw)} > +-0.05); "
                         "more test customers or a larger evaluation.epsilon_share would narrow it")
        else:
            lines.append(f"- {task}: AUC {_f(est)} +- {_f(hw)} (95% noise interval)")
    untrained = [t for t, n in s.get("rounds_with_training", {}).items() if n == 0]
    if untrained:
        lines += ["", f"**WARNING: no partner trained in any round of {', '.join(untrained)}: the federated model is "
                      "the untrained initial model. See the refusals/errors in federated_rounds.json.**"]
    lines += ["", "### Federation value per partner (each partner's own held-out customers)", ""]
    lines += render_value_table(s)
    for task, r in s["tasks"].items():
        if r.get("per_partner"):
            lines.append(f"\n{task}: {r.get('partners_gaining_auc', 0)} of {len(r['per_partner'])} partners gain AUC "
                         f"by federating (mean gain {_f(r.get('mean_gain_auc'), signed=True)}).")
    pv = s["privacy"]
    if pv.get("noise") == "reproducible" and pv["enabled"]:
        lines[1:1] = ["", "**WARNING: privacy.noise=reproducible: the DP noise of this run is derived from its seed. It "
                      "gives NO privacy guarantee against anyone who knows the seed. Tests and research only.**"]
    lines += ["", f"Privacy: {'DP-SGD, target epsilon ' + _f(pv['target_epsilon'], 2) + ', delta ' + format(pv['delta'], 'g') if pv['enabled'] else 'OFF (non-private run)'}; "
              f"unit: {pv['unit']}; accountant: {pv['accountant']}.", "",
              "| partner | train customers | test customers | final epsilon | refused rounds |", "|---|---|---|---|---|"]
    for pid, p in sorted(s["partners"].items(), key=lambda kv: int(kv[0])):
        eps = ", ".join(f"{_f(v, 3)}" for v in p["epsilon"].values())
        lines.append(f"| {pid} | {p['n_train']} | {p['n_test']} | {eps} | {p.get('refused_rounds', 0)} |")
    lines += ["", f"Wall time {s['wall_time_s']:.1f} s (federation {s['federation_time_s']:.1f} s).", ""]
    return "\n".join(lines)
