"""The run summary: per task, federated-DP vs centralized vs local-only vs personalised, the federation's value to
each partner, and each partner's epsilon.

Like is compared with like. Pooled AUCs score every partner's held-out customers together: the global models
(federated-DP, centralized) score them all; the one-model-per-partner references (local-only, personalised)
score each partner's customers with that partner's own model. Per-partner AUCs are on each partner's own
held-out customers and are averaged only with other per-partner AUCs.

Federation value, per partner and head: the partner's local-only non-private reference, the final federated-DP
global model, its personalised model (derived at the node from the global model and its own data; never
released) and the centralized non-private reference (best of tuned logistic regression and HistGradientBoosting
on everyone's pooled training data). The gain from federating is ``federated_dp - local_only`` and, for the
model a partner would actually use, ``personalised - local_only``.

A partner's test set is small (often tens of positives, AUC standard error ~0.05), so each gain also carries
DeLong's paired test (:mod:`federation.auc_compare`; both models score the same test customers): ``*_half_width``
is the 95% half-width of the gain, ``*_significant`` whether its interval excludes 0. Present when the baselines
carry ``local_only["paired_auc"]`` (``simulations.baselines.run_baselines`` with the global model).
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


GAIN_TEST = "95% paired DeLong"
EQUAL_AUC = 0.02  # explain_gains: a non-significant gain whose 95% interval lies inside +-0.02 AUC is "the same AUC"
_PAIRED = (("gain_auc", "federated_dp_vs_local_only"), ("personalised_gain_auc", "personalised_vs_local_only"))


def _paired_fields(row: dict[str, Any], paired: dict[str, Any] | None) -> None:
    """``<gain>_half_width / _ci / _significant / _direction`` from a paired comparison of the same models (None
    when there is none, or when it is not of the models the row's AUCs come from)."""
    for key, name in _PAIRED:
        c = (paired or {}).get(name)
        ok = (c is not None and row[key] is not None and c.get("diff") is not None
              and not math.isnan(c["diff"]) and abs(c["diff"] - row[key]) < 1e-9
              and c.get("half_width") is not None and not math.isnan(c["half_width"]))
        row[f"{key}_half_width"] = float(c["half_width"]) if ok else None
        row[f"{key}_ci"] = [float(c["ci_low"]), float(c["ci_high"])] if ok else None
        row[f"{key}_significant"] = bool(c["significant"]) if ok else None
        row[f"{key}_direction"] = int(c["direction"]) if ok else None


def partner_value(head: str, pid: str, *, federated: dict | None, local: dict | None, central: dict | None,
                  n_test: int, personalised: dict | None = None, paired: dict | None = None) -> dict[str, Any]:
    """One partner's row of the federation-value table for ``head`` (None where a model is missing).

    ``paired``: ``{"federated_dp_vs_local_only" / "personalised_vs_local_only": PairedAUC.as_dict()}`` for
    ``head`` on this partner's test customers (``simulations.baselines.paired_vs``)."""
    row: dict[str, Any] = {"n_test": n_test}
    for name, m in (("local_only", local), ("federated_dp", federated), ("centralized", central),
                    ("personalised", personalised)):
        row[f"{name}_auc"] = _get(m, head, "auc_roc")
        row[f"{name}_top_decile_lift"] = _get(m, head, "top_decile_lift")
    row["test_positives"] = None if _get(local or federated, head, "base_rate") is None else round(
        _get(local or federated, head, "base_rate") * n_test)
    row["gain_auc"] = _diff(row["federated_dp_auc"], row["local_only_auc"])
    row["personalised_gain_auc"] = _diff(row["personalised_auc"], row["local_only_auc"])
    row["gain_top_decile_lift"] = _diff(row["federated_dp_top_decile_lift"], row["local_only_top_decile_lift"])
    row["gap_to_centralized_auc"] = _diff(row["centralized_auc"], row["federated_dp_auc"])
    _paired_fields(row, paired)
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
                row["centralized_model"] = (base["centralized"].get("model") or {}).get(head)
                local = base["local_only"]["per_partner"]
                # per-partner mean (compare with the other per-partner means below, never with a pooled AUC)
                row["local_only_auc_mean"] = _mean([_get(local.get(pid), head, "auc_roc") for pid in r["partners"]])
                row["local_only_top_decile_lift_mean"] = _mean(
                    [_get(local.get(pid), head, "top_decile_lift") for pid in r["partners"]])
                for name in ("local_only", "personalised"):  # pooled: each partner's own model on its customers
                    pooled_m = (base.get(name) or {}).get("pooled")
                    row[f"{name}_auc_pooled"] = _get(pooled_m, head, "auc_roc")
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
                    personalised=(base.get("personalised") or {}).get("per_partner", {}).get(pid) if base else None,
                    paired=(((base["local_only"].get("paired_auc") or {}).get(pid) or {}).get(head)) if base else None,
                    n_test=info["n_test"])
                row["per_partner"][pid]["n_train"] = info["n_train"]
            pp = row["per_partner"].values()
            gains = [v["gain_auc"] for v in pp]
            row["partners_gaining_auc"] = sum(1 for g in gains if g is not None and g > 0)
            row["mean_gain_auc"] = _mean(gains)
            pgains = [v["personalised_gain_auc"] for v in pp]
            row["partners_gaining_auc_personalised"] = sum(1 for g in pgains if g is not None and g > 0)
            row["mean_gain_auc_personalised"] = _mean(pgains)
            for key, suffix in (("gain_auc", ""), ("personalised_gain_auc", "_personalised")):
                tested = [v[f"{key}_direction"] for v in pp if v.get(f"{key}_direction") is not None]
                row[f"partners_gaining_auc_significantly{suffix}"] = sum(d > 0 for d in tested) if tested else None
                row[f"partners_losing_auc_significantly{suffix}"] = sum(d < 0 for d in tested) if tested else None
            if any(v.get("gain_auc_half_width") is not None for v in pp):
                row["gain_auc_test"] = GAIN_TEST
            for name in ("federated_dp", "centralized", "personalised"):
                row[f"{name}_auc_partner_mean"] = _mean([v[f"{name}_auc"] for v in pp])
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


def _gain(v: dict[str, Any], key: str) -> str:
    """``+0.012 +-0.041`` (the gain and its 95% paired half-width; ``*`` when significant), or just the gain."""
    text = _f(v.get(key), signed=True)
    hw = v.get(f"{key}_half_width")
    if hw is None or v.get(key) is None:
        return text
    return f"{text} +-{_f(hw)}" + ("*" if v.get(f"{key}_significant") else "")


def render_value_table(s: dict[str, Any]) -> list[str]:
    """Markdown lines: per task and partner, local-only / fed-DP / personalised / centralized AUC and lift."""
    lines = ["| task | partner | train / test customers (test positives) | local-only AUC | fed-DP AUC | personalised AUC "
             "| centralized AUC | gain AUC fed-DP | gain AUC personalised "
             "| local-only lift@10% | fed-DP lift@10% | centralized lift@10% | gain lift |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    names = s.get("partner_names") or {}
    tested = False
    for task, r in s["tasks"].items():
        for pid, v in sorted(r.get("per_partner", {}).items(), key=lambda kv: int(kv[0])):
            pos = "" if v.get("test_positives") is None else f" ({v['test_positives']})"
            name = names.get(pid)
            who = f"{pid} ({name})" if name and name != f"partner-{pid}" else pid  # a natural split's own names
            tested = tested or any(v.get(f"{k}_half_width") is not None for k, _ in _PAIRED)
            lines.append(
                f"| {task} | {who} | {v.get('n_train', '-')} / {v['n_test']}{pos} | {_f(v['local_only_auc'])} | "
                f"{_f(v['federated_dp_auc'])} | {_f(v.get('personalised_auc'))} | "
                f"{_f(v['centralized_auc'])} | {_gain(v, 'gain_auc')} | "
                f"{_gain(v, 'personalised_gain_auc')} | "
                f"{_f(v['local_only_top_decile_lift'], 2)} | {_f(v['federated_dp_top_decile_lift'], 2)} | "
                f"{_f(v['centralized_top_decile_lift'], 2)} | {_f(v['gain_top_decile_lift'], 2, signed=True)} |")
    if tested:
        lines += ["", "AUC gains are over the partner's local-only model, +- the 95% half-width of DeLong's paired test "
                  "on the partner's own test customers (both models score the same customers); * = significant at 95% "
                  "(the interval excludes 0). A gain within its interval is noise at this test-set size."]
    return lines


def _size(v: dict[str, Any]) -> str:
    pos = v.get("test_positives")
    return f"{v.get('n_train', '?')} train customers" + ("" if pos is None else f", {pos} test positives")


def explain_gains(task: str, r: dict[str, Any]) -> str:
    """Which partners gain AUC over their local-only model, whether that gain is more than the noise of the
    partner's small test set (DeLong's paired test, when the summary has it), and a reason a data scientist can
    check: gains go to partners with few training customers or few positives, whose own model is noisy; large
    partners lose little."""
    pp = sorted(r["per_partner"].items(), key=lambda kv: int(kv[0]))
    n = len(pp)

    def signif(suffix: str, how: str) -> str:  # "1 significantly, 95% paired DeLong; 1 significantly worse; "
        up, down = (r.get(f"partners_{w}_auc_significantly{suffix}") for w in ("gaining", "losing"))
        if up is None:
            return ""
        return f"{up} significantly{how}; " + (f"{down} significantly worse; " if down else "")

    text = (f"{task}: {r.get('partners_gaining_auc', 0)} of {n} partners gain AUC with the federated-DP model "
            f"({signif('', ', ' + GAIN_TEST)}mean gain {_f(r.get('mean_gain_auc'), signed=True)})")
    if any(v.get("personalised_auc") is not None for _, v in pp):
        text += (f"; {r.get('partners_gaining_auc_personalised', 0)} of {n} with their personalised model "
                 f"({signif('_personalised', '')}mean gain {_f(r.get('mean_gain_auc_personalised'), signed=True)})")
    text += "."
    best = [(pid, v) for pid, v in pp if v.get("personalised_gain_auc") is not None or v.get("gain_auc") is not None]
    if not best:
        return text
    keys = [k for k, _ in _PAIRED]
    label = {"gain_auc": "fed-DP", "personalised_gain_auc": "personalised"}

    def best_key(v: dict[str, Any]) -> str | None:
        g = [(v[k], k) for k in keys if v.get(k) is not None]
        return max(g)[1] if g else None

    if not any(v.get(f"{k}_half_width") is not None for _, v in best for k in keys):  # no paired test: gains only
        def gain(v: dict[str, Any]) -> float:
            k = best_key(v)
            return v[k] if k else float("nan")

        gainers = [f"{pid} ({_size(v)}, {_f(gain(v), signed=True)})" for pid, v in best if gain(v) > 0]
        others = [f"{pid} ({_size(v)}, {_f(gain(v), signed=True)})" for pid, v in best if not gain(v) > 0]
        if gainers:
            text += " Gaining (best of fed-DP and personalised): " + "; ".join(gainers) + "."
        if others:
            text += (" Not gaining: " + "; ".join(others) + " -- a partner whose own data already nearly match the "
                     "centralized reference has little to gain, and DP noise costs it more than it adds.")
        return text

    def entry(v: dict[str, Any]) -> str:
        return f"{_size(v)}; " + ", ".join(f"{label[k]} {_gain(v, k)}" for k in keys if v.get(k) is not None)

    up, down, equal, unclear = [], [], [], []
    for pid, v in best:
        dirs = [v.get(f"{k}_direction") for k in keys if v.get(k) is not None]
        if 1 in dirs:  # significantly better than local-only with at least one of the two models
            up.append(f"{pid} ({entry(v)})")
        elif -1 in dirs:
            down.append(f"{pid} ({entry(v)})")
        elif all(v.get(f"{k}_half_width") is not None and abs(v[k]) + v[f"{k}_half_width"] < EQUAL_AUC
                 for k in keys if v.get(k) is not None):  # a narrow interval around ~0: no difference that matters
            equal.append(f"{pid} ({entry(v)})")
        else:
            unclear.append(f"{pid} ({entry(v)})")
    if up:
        text += " Gaining significantly (95%): " + "; ".join(up) + "."
    if down:
        text += (" Significantly worse than local-only (*), and no significant gain: " + "; ".join(down)
                 + " -- a partner whose own data already nearly match the centralized reference has little to gain, "
                 "and DP noise costs it more than it adds.")
    if unclear:
        text += (" Test set too small to tell (every difference from local-only is within its 95% interval): "
                 + "; ".join(unclear) + ". Read these gains and losses as noise; only more test customers "
                 "(positives) would tell them apart.")
    if equal:
        text += (f" Same AUC as local-only (95% intervals inside +-{EQUAL_AUC:g}): " + "; ".join(equal) + ".")
    return text


def render_summary(s: dict[str, Any]) -> str:
    lines = ["", "## fedprop summary", "",
             "Pooled AUC (every partner's held-out customers together; local-only and personalised: each partner's "
             "own model on its own customers). Centralized, local-only and personalised are NON-PRIVATE references "
             "(never released); only the federated-DP model carries the DP guarantee.", "",
             "| task | federated-DP | centralized (reference model) | local-only | personalised | fed-DP top-decile lift "
             "| base rate |", "|---|---|---|---|---|---|---|"]
    for task, r in s["tasks"].items():
        cm = f" ({r['centralized_model']})" if r.get("centralized_model") else ""
        lines.append(f"| {task} | {_f(r['federated_dp_auc'])} | {_f(r.get('centralized_auc'))}{cm} | "
                     f"{_f(r.get('local_only_auc_pooled'))} | {_f(r.get('personalised_auc_pooled'))} | "
                     f"{_f(r['federated_dp_top_decile_lift'], 2)} | {_f(r['base_rate'])} |")
    lines += ["", "Per-partner AUC, mean over partners (each on its own held-out customers):", "",
              "| task | federated-DP | centralized | local-only | personalised |", "|---|---|---|---|---|"]
    for task, r in s["tasks"].items():
        lines.append(f"| {task} | {_f(r.get('federated_dp_auc_partner_mean'))} | {_f(r.get('centralized_auc_partner_mean'))} "
                     f"| {_f(r.get('local_only_auc_mean'))} | {_f(r.get('personalised_auc_partner_mean'))} |")
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
            lines.append("\n" + explain_gains(task, r))
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
