"""`fedprop report RUN_DIR`: a self-contained HTML report (figures embedded), Markdown and JSON for a run or
for a Hydra sweep directory (numbered run subdirectories, e.g. ``runs/multirun/<ts>``).

A run's report reads only what the run wrote: ``config.json``, ``federated_rounds.json``, ``summary.json``
(simulation: baselines and federation value per partner) and ``model_card_<head>.json`` (deployment runs
have cards but no summary), plus the privacy budget reports under ``privacy/`` when they exist.

Figures (matplotlib, Agg backend, PNG as base64 ``data:`` URIs): pooled AUC per head per round, per-partner
bars (local-only vs federated-DP vs centralized), cumulative gains and lift per decile, reliability diagram;
for a sweep, the privacy-utility curve (AUC vs epsilon) with the centralized non-private and local-only mean
levels as horizontal reference lines. ``report.html``, ``report.md`` and ``report.json`` are written
atomically into the run (or sweep) directory.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

from federation.atomicio import atomic_write_text
from federation.errors import FedpropError

REPORT_FILES = ("report.html", "report.md", "report.json")
COLORS = {"local_only": "#9e9e9e", "federated_dp": "#1f77b4", "centralized": "#2ca02c"}
LABELS = {"local_only": "local-only (non-private)", "federated_dp": "federated (DP)", "centralized": "centralized (non-private)"}


class ReportError(FedpropError):
    """The directory is not a fedprop run or sweep, or its files cannot be read."""


# ------------------------------------------------------------------------------------------- loading
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path} is not valid JSON ({exc}); was the run interrupted while writing it?") from None


def is_run_dir(d: Path) -> bool:
    return (d / "config.json").is_file() or (d / "federated_rounds.json").is_file()


def sweep_runs(d: Path) -> list[Path]:
    """Numbered run subdirectories of a Hydra multirun directory, in job order."""
    subs = [p for p in d.iterdir() if p.is_dir() and p.name.isdigit() and is_run_dir(p)]
    return sorted(subs, key=lambda p: int(p.name))


def load_run(d: Path) -> dict[str, Any]:
    d = Path(d)
    if not is_run_dir(d):
        raise ReportError(f"{d} is not a fedprop run directory (no config.json / federated_rounds.json)")
    cfg = _read_json(d / "config.json") or {}
    cards = {}
    for p in sorted(d.glob("model_card_*.json")):
        card = _read_json(p)
        if isinstance(card, dict) and "task" in card:
            cards[card["task"]] = card
    privacy_dir = d / "privacy"
    privacy_files = sorted(str(p.relative_to(d)) for p in privacy_dir.glob("*") if p.is_file()) if privacy_dir.is_dir() else []
    return {
        "dir": str(d),
        "config": cfg.get("config", {}) if isinstance(cfg, dict) else {},
        "config_hash": cfg.get("config_hash") if isinstance(cfg, dict) else None,
        "rounds": _read_json(d / "federated_rounds.json") or {},
        "summary": _read_json(d / "summary.json"),
        "cards": cards,
        "privacy_files": privacy_files,
        "finished": (d / "FEDERATION_DONE").exists(),
    }


# ----------------------------------------------------------------------------------------- data views
def _num(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def heads_of(run: dict[str, Any]) -> list[str]:
    if run["summary"]:
        return list(run["summary"].get("tasks", {}))
    heads = [h for tag in run["rounds"] for h in tag.split("+")]
    return list(dict.fromkeys(heads + list(run["cards"])))


def round_curves(run: dict[str, Any]) -> dict[str, dict[str, list]]:
    """head -> {"round": [...], "auc": [...], "epsilon_max": [...]} from the per-round records."""
    out: dict[str, dict[str, list]] = {}
    for tag, recs in run["rounds"].items():
        for head in tag.split("+"):
            c = out.setdefault(head, {"round": [], "auc": [], "top_decile_lift": [], "epsilon_max": []})
            for r in recs:
                ev = r.get("evaluate") or {}
                eps = [_num((p.get("train") or {}).get("epsilon")) for p in r.get("partners", {}).values()]
                eps = [e for e in eps if e is not None]
                c["round"].append(r["round"])
                c["auc"].append(_num(ev.get(f"{head}.auc_roc")))
                c["top_decile_lift"].append(_num(ev.get(f"{head}.top_decile_lift")))
                c["epsilon_max"].append(max(eps) if eps else None)
    return out


def pooled_curves(run: dict[str, Any], head: str) -> dict[str, Any]:
    """model name -> {gains, reliability}: summary curves (simulation) or the model card's metrics."""
    s = run["summary"]
    if s and head in s.get("tasks", {}) and s["tasks"][head].get("curves"):
        return {k: v for k, v in s["tasks"][head]["curves"].items() if v}
    card = run["cards"].get(head)
    if card and card.get("metrics", {}).get("gains"):
        return {"federated_dp": {"gains": card["metrics"]["gains"], "reliability": card["metrics"].get("reliability")}}
    return {}


def headline(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """head -> pooled numbers for tables and JSON."""
    out: dict[str, dict[str, Any]] = {}
    s = run["summary"]
    for head in heads_of(run):
        row: dict[str, Any] = {}
        if s and head in s.get("tasks", {}):
            t = s["tasks"][head]
            for k in ("federated_dp_auc", "federated_dp_top_decile_lift", "centralized_auc", "centralized_top_decile_lift",
                      "local_only_auc_mean", "local_only_top_decile_lift_mean", "base_rate", "mean_gain_auc",
                      "partners_gaining_auc", "local_only_auc_pooled", "personalised_auc_pooled"):
                row[k] = t.get(k)
            row["dp_evaluation_auc"] = t.get("federated_eval_auc_from_histograms")
            row["dp_evaluation_auc_half_width"] = t.get("federated_eval_auc_half_width")
            row["dp_evaluation_auc_meaningful"] = t.get("federated_eval_auc_meaningful", True)
        card = run["cards"].get(head)
        if card:
            m = card.get("metrics", {})
            row.setdefault("federated_dp_auc", m.get("auc_roc"))
            row.setdefault("federated_dp_top_decile_lift", m.get("top_decile_lift"))
            row.setdefault("base_rate", m.get("base_rate"))
            if m.get("dp_release"):  # deployment: the card's metrics are the DP evaluation
                row.setdefault("dp_evaluation_auc", m.get("auc_roc"))
                row.setdefault("dp_evaluation_auc_half_width", m.get("auc_roc_half_width"))
                row.setdefault("dp_evaluation_auc_meaningful", m.get("auc_roc_meaningful", True))
            for k in ("pr_auc", "log_loss", "brier", "ece"):
                row[f"histogram_{k}"] = m.get(k)
        out[head] = row
    return out


def per_partner(run: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    s = run["summary"]
    return {h: t.get("per_partner", {}) for h, t in (s or {}).get("tasks", {}).items()}


def privacy_rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Per partner: final epsilon per federation (from the summary, else the last training replies)."""
    s = run["summary"]
    if s and s.get("partners"):
        return [{"partner": pid, "n_train": p.get("n_train"), "n_test": p.get("n_test"), "epsilon": p.get("epsilon", {}),
                 "refused_rounds": p.get("refused_rounds", 0)}
                for pid, p in sorted(s["partners"].items(), key=lambda kv: int(kv[0]))]
    last: dict[str, dict[str, Any]] = {}
    for tag, recs in run["rounds"].items():
        for r in recs:
            for pid, p in r.get("partners", {}).items():
                e = _num((p.get("train") or {}).get("epsilon"))
                if e is not None:
                    last.setdefault(pid, {"partner": pid, "epsilon": {}})["epsilon"][tag] = e
    return [last[k] for k in sorted(last, key=int)]


def sweep_points(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """head -> one point per run: target epsilon, achieved max epsilon, fed-DP / centralized / local AUC."""
    out: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        pv = run["config"].get("privacy", {})
        eps_target = _num(pv.get("epsilon")) if pv.get("enabled", True) else None
        achieved = [e for r in privacy_rows(run) for e in (_num(v) for v in r["epsilon"].values()) if e is not None]
        for head, row in headline(run).items():
            out.setdefault(head, []).append({
                "run": Path(run["dir"]).name, "target_epsilon": eps_target,
                "achieved_epsilon_max": max(achieved) if achieved else None,
                "federated_dp_auc": _num(row.get("federated_dp_auc")),
                "federated_dp_top_decile_lift": _num(row.get("federated_dp_top_decile_lift")),
                "centralized_auc": _num(row.get("centralized_auc")),
                "local_only_auc_mean": _num(row.get("local_only_auc_mean")),
                "local_only_auc_pooled": _num(row.get("local_only_auc_pooled")),
            })
    for pts in out.values():
        pts.sort(key=lambda p: (p["target_epsilon"] is None, p["target_epsilon"] or 0.0))
    return out


# -------------------------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def fig_round_curves(curves: dict[str, dict[str, list]]) -> str | None:
    if not any(any(a is not None for a in c["auc"]) for c in curves.values()):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for head, c in curves.items():
        pts = [(r, a) for r, a in zip(c["round"], c["auc"]) if a is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{head} pooled AUC")
    ax.set_xlabel("round")
    ax.set_ylabel("AUC-ROC (pooled from partners' histograms)")
    ax.grid(alpha=0.3)
    eps = [(r, e) for c in curves.values() for r, e in zip(c["round"], c["epsilon_max"]) if e is not None]
    if eps:
        ax2 = ax.twinx()
        ax2.plot(*zip(*sorted(set(eps))), color="#d62728", linestyle="--", alpha=0.6, label="max partner epsilon")
        ax2.set_ylabel("cumulative epsilon (max over partners)", color="#d62728")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
    else:
        ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Metric curves per round")
    return _png(fig)


def fig_partner_bars(head: str, rows: dict[str, dict[str, Any]], metric: str = "auc") -> str | None:
    if not rows:
        return None
    import numpy as np

    plt = _plt()
    pids = sorted(rows, key=int)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(pids) + 2), 3.6))
    x = np.arange(len(pids))
    w = 0.27
    for i, name in enumerate(("local_only", "federated_dp", "centralized")):
        vals = [_num(rows[p].get(f"{name}_{metric}")) for p in pids]
        ax.bar(x + (i - 1) * w, [v if v is not None else 0.0 for v in vals], w, label=LABELS[name], color=COLORS[name])
    ax.set_xticks(x, [f"partner {p}" for p in pids], fontsize=8)
    if metric == "auc":
        ax.set_ylim(0.5, 1.0)
        ax.set_ylabel("AUC-ROC on the partner's test customers")
    else:
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel("top-decile lift")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{head}: per-partner {'AUC' if metric == 'auc' else 'top-decile lift'}")
    return _png(fig)


def fig_lift(head: str, curves: dict[str, Any]) -> str | None:
    models = {k: v for k, v in curves.items() if v and v.get("gains")}
    if not models:
        return None
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, c in models.items():
        g = c["gains"]
        frac = [0.0] + list(g["fraction"])
        a1.plot(frac, [0.0] + [_num(v) or 0.0 for v in g["cumulative_gains"]], marker="o", label=LABELS.get(name, name),
                color=COLORS.get(name))
        a2.plot([f * 100 for f in g["fraction"]], [_num(v) for v in g["cumulative_lift"]], marker="o",
                label=LABELS.get(name, name), color=COLORS.get(name))
    a1.plot([0, 1], [0, 1], color="black", linestyle=":", label="random")
    a1.set_xlabel("share of customers contacted (ranked by score)")
    a1.set_ylabel("cumulative gains (share of positives)")
    a1.set_title(f"{head}: cumulative gains")
    a2.axhline(1.0, color="black", linestyle=":")
    a2.set_xlabel("top % of customers")
    a2.set_ylabel("cumulative lift")
    a2.set_title(f"{head}: lift per decile")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    return _png(fig)


def fig_reliability(head: str, curves: dict[str, Any]) -> str | None:
    models = {k: v for k, v in curves.items() if v and v.get("reliability")}
    if not models:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="black", linestyle=":", label="perfectly calibrated")
    for name, c in models.items():
        r = c["reliability"]
        pts = [(_num(p), _num(o)) for p, o, n in zip(r["mean_predicted"], r["observed_rate"], r["count"]) if n]
        pts = [(p, o) for p, o in pts if p is not None and o is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=LABELS.get(name, name), color=COLORS.get(name))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability (per bin)")
    ax.set_ylabel("observed rate")
    ax.set_title(f"{head}: reliability diagram")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def fig_privacy_utility(head: str, points: list[dict[str, Any]]) -> str | None:
    pts = [(p["target_epsilon"], p["federated_dp_auc"]) for p in points
           if p["target_epsilon"] is not None and p["federated_dp_auc"] is not None]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    xs, ys = zip(*pts)
    ax.plot(xs, ys, marker="o", color=COLORS["federated_dp"], label="federated (DP)")
    for key, name, style in (("centralized_auc", "centralized", "--"), ("local_only_auc_pooled", "local_only", ":")):
        vals = [p[key] for p in points if p.get(key) is not None]
        if vals:
            level = sum(vals) / len(vals)
            label = "centralized non-private" if name == "centralized" else "local-only, pooled (non-private)"
            ax.axhline(level, color=COLORS[name], linestyle=style, label=f"{label} ({level:.3f})")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(list(xs), [f"{x:g}" for x in xs])
    ax.set_xlabel("target epsilon per partner (delta fixed, unit: customer)")
    ax.set_ylabel("pooled test AUC-ROC")
    ax.set_title(f"{head}: privacy-utility curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


# ------------------------------------------------------------------------------------------- building
def _f(x: Any, nd: int = 3, signed: bool = False) -> str:
    v = _num(x)
    if v is None:
        return "-"
    return f"{v:+.{nd}f}" if signed else f"{v:.{nd}f}"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _value_rows(pp: dict[str, dict[str, dict[str, Any]]]) -> list[list[str]]:
    rows = []
    for head, parts in pp.items():
        for pid, v in sorted(parts.items(), key=lambda kv: int(kv[0])):
            rows.append([head, pid, str(v.get("n_test", "-")), _f(v.get("local_only_auc")), _f(v.get("federated_dp_auc")),
                         _f(v.get("centralized_auc")), _f(v.get("gain_auc"), signed=True),
                         _f(v.get("local_only_top_decile_lift"), 2), _f(v.get("federated_dp_top_decile_lift"), 2),
                         _f(v.get("centralized_top_decile_lift"), 2), _f(v.get("gain_top_decile_lift"), 2, signed=True)])
    return rows


VALUE_HEADER = ["task", "partner", "test customers", "local-only AUC", "fed-DP AUC", "centralized AUC", "gain AUC",
                "local-only lift@10%", "fed-DP lift@10%", "centralized lift@10%", "gain lift"]
# every AUC column is pooled (every partner's test customers together; local-only and personalised: each partner's
# own model on its own customers), so the columns compare like with like (a per-partner mean stood here before)
HEADLINE_HEADER = ["task", "fed-DP AUC", "centralized AUC", "local-only AUC", "personalised AUC", "fed-DP lift@10%",
                   "centralized lift@10%", "base rate", "DP federated evaluation AUC (95% noise interval)"]


def _dp_eval_cell(r: dict[str, Any]) -> str:
    est, hw = r.get("dp_evaluation_auc"), r.get("dp_evaluation_auc_half_width")
    if est is None:
        return "-"
    if hw is None:
        return f"{_f(est)} (exact, non-private)"
    if not r.get("dp_evaluation_auc_meaningful", True):
        return f"not meaningful at this noise (+-{_f(hw)})"
    return f"{_f(est)} +- {_f(hw)}"


def _headline_rows(hl: dict[str, dict[str, Any]]) -> list[list[str]]:
    return [[h, _f(r.get("federated_dp_auc")), _f(r.get("centralized_auc")), _f(r.get("local_only_auc_pooled")),
             _f(r.get("personalised_auc_pooled")), _f(r.get("federated_dp_top_decile_lift"), 2), _f(r.get("centralized_top_decile_lift"), 2),
             _f(r.get("base_rate")), _dp_eval_cell(r)] for h, r in hl.items()]


def _accountant_text(run: dict[str, Any]) -> str:
    """The accountant the run's epsilons come from, as the run's summary states it (else from its config): the
    config's ``privacy.accountant`` (``rdp``, ``tight``, ...), never a fixed name."""
    said = ((run.get("summary") or {}).get("privacy") or {}).get("accountant")
    if said:
        return str(said)
    cfg = run["config"]
    name = (cfg.get("privacy") or {}).get("accountant", "?")
    share = (cfg.get("evaluation") or {}).get("epsilon_share")
    evals = (f" and every evaluation release (discrete Gaussian, {float(share):.0%} of the budget)" if share else "")
    return f"{name}: every DP-SGD round (Poisson-subsampled Gaussian){evals} composed"


def _privacy_text(run: dict[str, Any]) -> tuple[list[list[str]], str]:
    pv = run["config"].get("privacy", {})
    rows = [[r["partner"], str(r.get("n_train", "-")), ", ".join(f"{k}: {_f(v)}" for k, v in r["epsilon"].items()) or "-",
             str(r.get("refused_rounds", 0))] for r in privacy_rows(run)]
    if pv and not pv.get("enabled", True):
        text = "This run trained WITHOUT differential privacy: no privacy guarantee is claimed."
    else:
        text = (f"DP-SGD at every partner, target epsilon {pv.get('epsilon', '?')} per partner over the whole run, "
                f"delta {pv.get('delta', '?')}, privacy unit: one customer, accountant: {_accountant_text(run)}.")
    return rows, text


def build_run_report(run: dict[str, Any]) -> dict[str, Any]:
    """Everything the three outputs show for one run: data (JSON-ready) and figures (base64 PNG)."""
    curves = round_curves(run)
    pp = per_partner(run)
    figures: list[dict[str, str]] = []

    def add(title: str, png: str | None, caption: str) -> None:
        if png:
            figures.append({"title": title, "png": png, "caption": caption})

    add("Metric curves per round", fig_round_curves(curves),
        "Pooled test AUC per head after each round, combined from partners' score histograms (no prediction left a "
        "node); dashed: the largest cumulative epsilon any partner has spent.")
    for head in heads_of(run):
        rows = pp.get(head, {})
        add(f"{head}: per-partner AUC", fig_partner_bars(head, rows, "auc"),
            "Each partner's own held-out customers: its local-only model, the federated DP model, and a centralized "
            "non-private model trained on everyone's pooled data (upper bound).")
        add(f"{head}: per-partner top-decile lift", fig_partner_bars(head, rows, "top_decile_lift"),
            "Lift in the top 10% of customers ranked by score (1.0 = random).")
        pc = pooled_curves(run, head)
        add(f"{head}: lift chart", fig_lift(head, pc),
            "Cumulative gains and cumulative lift per decile on all partners' test customers.")
        add(f"{head}: reliability diagram", fig_reliability(head, pc),
            "Does a score of 0.3 mean 30%? Observed rate per bin of predicted probability.")
    privacy_table, privacy_text = _privacy_text(run)
    privacy_reports = (run["summary"] or {}).get("privacy_reports") or {}
    return {
        "kind": "run",
        "dir": run["dir"],
        "finished": run["finished"],
        "config_hash": run["config_hash"],
        "config": run["config"],
        "headline": headline(run),
        "federation_value": pp,
        "rounds": curves,
        "privacy": {"statement": privacy_text, "partners": privacy_rows(run), "ledger_reports": privacy_reports,
                    "report_files": run["privacy_files"], "table": privacy_table},
        "model_cards": sorted(f"model_card_{h}.md" for h in run["cards"]),
        "figures": figures,
    }


def build_sweep_report(d: Path, runs: list[dict[str, Any]]) -> dict[str, Any]:
    points = sweep_points(runs)
    figures = []
    for head, pts in points.items():
        png = fig_privacy_utility(head, pts)
        if png:
            figures.append({"title": f"{head}: privacy-utility curve", "png": png,
                            "caption": "Pooled federated-DP AUC per target epsilon; horizontal lines: centralized "
                                       "non-private model and the mean of partners' local-only models."})
    return {"kind": "sweep", "dir": str(d), "runs": [build_run_report(r) for r in runs], "points": points,
            "figures": figures}


# ------------------------------------------------------------------------------------------ rendering
CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}figure{margin:1.2em 0}
figcaption{font-size:.85em;color:#555;max-width:800px}img.fig{max-width:100%;border:1px solid #eee}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.8em}.note{color:#555;font-size:.9em}"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _html_figures(figures: list[dict[str, str]]) -> str:
    return "".join(
        f'<figure><img class="fig" alt="{html.escape(f["title"])}" src="data:image/png;base64,{f["png"]}">'
        f'<figcaption><b>{html.escape(f["title"])}.</b> {html.escape(f["caption"])}</figcaption></figure>'
        for f in figures)


def _html_run(rep: dict[str, Any], *, level: int = 2, link_base: str = "") -> str:
    h = f"h{level}"
    parts = [f"<{h}>Results</{h}>", _html_table(HEADLINE_HEADER, _headline_rows(rep["headline"]))]
    if any(rep["federation_value"].values()):
        parts += [f"<{h}>Federation value per partner</{h}>",
                  '<p class="note">All on each partner\'s own held-out customers. Gain = federated-DP minus local-only.</p>',
                  _html_table(VALUE_HEADER, _value_rows(rep["federation_value"]))]
    parts += [f"<{h}>Figures</{h}>", _html_figures(rep["figures"])]
    pv = rep["privacy"]
    parts += [f"<{h}>Privacy</{h}>", f"<p>{html.escape(pv['statement'])}</p>",
              _html_table(["partner", "train customers", "final epsilon", "refused rounds"], pv["table"])]
    ledger = pv.get("ledger_reports") or {}
    if ledger.get("partners"):
        rows = []
        for pid, p in sorted(ledger["partners"].items(), key=lambda kv: int(kv[0])):
            if p.get("missing"):
                rows.append([pid, "-", "-", "-", "no ledger"])
                continue
            rows.append([pid, str(p.get("rounds_released_this_run", "-")), _f(p.get("period_epsilon")),
                         _f(p.get("remaining_epsilon")),
                         "-" if p.get("compliant") is None else ("compliant" if p["compliant"] else "NOT COMPLIANT")])
        parts += ["<p>Privacy budget from each partner's verified ledger (cumulative over the policy period):</p>",
                  _html_table(["partner", "rounds released (this run)", "epsilon in period", "remaining", "policy"], rows)]
    if pv["report_files"]:
        links = "".join(f'<li><a href="{html.escape(link_base + f)}">{html.escape(f)}</a></li>' for f in pv["report_files"]
                        if f.endswith((".html", ".md")))
        parts.append(f"<p>Ledger reports:</p><ul>{links}</ul>")
    if rep["model_cards"]:
        links = "".join(f'<li><a href="{html.escape(link_base + f)}">{html.escape(f)}</a></li>' for f in rep["model_cards"])
        parts.append(f"<p>Model cards (signed JSON next to them):</p><ul>{links}</ul>")
    parts += [f"<{h}>Configuration</{h}>",
              f"<p class=\"note\">config hash {html.escape(str(rep['config_hash']))}</p>",
              f"<pre>{html.escape(json.dumps(rep['config'], indent=2, sort_keys=True))}</pre>"]
    return "\n".join(parts)


def render_html(rep: dict[str, Any]) -> str:
    if rep["kind"] == "sweep":
        title = f"fedprop sweep report: {Path(rep['dir']).name}"
        rows = [[head, p["run"], _f(p["target_epsilon"], 2), _f(p["achieved_epsilon_max"]), _f(p["federated_dp_auc"]),
                 _f(p["federated_dp_top_decile_lift"], 2), _f(p["centralized_auc"]), _f(p.get("local_only_auc_pooled"))]
                for head, pts in rep["points"].items() for p in pts]
        body = [f"<h1>{html.escape(title)}</h1>", f"<p class=\"note\">{html.escape(rep['dir'])}: {len(rep['runs'])} runs</p>",
                "<h2>Privacy-utility</h2>", _html_figures(rep["figures"]),
                _html_table(["task", "run", "target epsilon", "achieved max epsilon", "fed-DP AUC", "fed-DP lift@10%",
                             "centralized AUC", "local-only AUC (pooled)"], rows)]
        for r in rep["runs"]:
            name = Path(r["dir"]).name
            body += [f"<h2 id=\"run-{html.escape(name)}\">Run {html.escape(name)}</h2>", _html_run(r, level=3, link_base=f"{name}/")]
    else:
        title = f"fedprop run report: {Path(rep['dir']).name}"
        body = [f"<h1>{html.escape(title)}</h1>", f"<p class=\"note\">{html.escape(rep['dir'])}"
                f"{'' if rep['finished'] else ' (the federation did NOT finish)'}</p>", _html_run(rep)]
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _md_run(rep: dict[str, Any], level: int = 2) -> list[str]:
    h = "#" * level
    lines = [f"{h} Results", ""] + _md_table(HEADLINE_HEADER, _headline_rows(rep["headline"]))
    if any(rep["federation_value"].values()):
        lines += ["", f"{h} Federation value per partner", "",
                  "Each partner's own held-out customers; gain = federated-DP minus local-only.", ""]
        lines += _md_table(VALUE_HEADER, _value_rows(rep["federation_value"]))
    pv = rep["privacy"]
    lines += ["", f"{h} Privacy", "", pv["statement"], ""]
    lines += _md_table(["partner", "train customers", "final epsilon", "refused rounds"], pv["table"])
    if pv["report_files"]:
        lines += ["", "Ledger reports: " + ", ".join(f"`{f}`" for f in pv["report_files"] if f.endswith(".md"))]
    return lines


def render_markdown(rep: dict[str, Any]) -> str:
    if rep["kind"] == "sweep":
        lines = [f"# fedprop sweep report: {Path(rep['dir']).name}", "", "## Privacy-utility", ""]
        lines += _md_table(["task", "run", "target epsilon", "achieved max epsilon", "fed-DP AUC", "fed-DP lift@10%",
                            "centralized AUC", "local-only AUC (pooled)"],
                           [[head, p["run"], _f(p["target_epsilon"], 2), _f(p["achieved_epsilon_max"]),
                             _f(p["federated_dp_auc"]), _f(p["federated_dp_top_decile_lift"], 2), _f(p["centralized_auc"]),
                             _f(p.get("local_only_auc_pooled"))] for head, pts in rep["points"].items() for p in pts])
        for r in rep["runs"]:
            lines += ["", f"## Run {Path(r['dir']).name}", ""] + _md_run(r, level=3)
    else:
        lines = [f"# fedprop run report: {Path(rep['dir']).name}", ""] + _md_run(rep)
    lines += ["", "Figures: see `report.html` in the same directory.", ""]
    return "\n".join(lines)


def _json_view(rep: dict[str, Any]) -> dict[str, Any]:
    """JSON for machines: everything but the PNG payloads (figure titles are kept)."""
    def strip(r: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in r.items() if k not in ("figures", "runs")}
        out["figures"] = [f["title"] for f in r["figures"]]
        if "runs" in r:
            out["runs"] = [strip(x) for x in r["runs"]]
        return out

    def clean(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    return clean(strip(rep))


def write_report(directory: str | Path) -> dict[str, Path]:
    """Build the report of a run or sweep directory; write report.html/.md/.json atomically into it."""
    d = Path(directory)
    if not d.is_dir():
        raise ReportError(f"{d} is not a directory")
    if is_run_dir(d):
        rep = build_run_report(load_run(d))
    else:
        subs = sweep_runs(d)
        if not subs:
            raise ReportError(f"{d} is neither a fedprop run directory (config.json, federated_rounds.json) nor a "
                              "sweep directory with numbered run subdirectories (runs/multirun/<timestamp>)")
        rep = build_sweep_report(d, [load_run(s) for s in subs])
    texts = {"report.html": render_html(rep), "report.md": render_markdown(rep),
             "report.json": json.dumps(_json_view(rep), indent=2, allow_nan=False) + "\n"}
    return {name: atomic_write_text(d / name, text) for name, text in texts.items()}


# ------------------------------------------------------------------------------------------------ CLI
def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report", help="write report.html/.md/.json for a run or a sweep (multirun) directory")
    p.add_argument("run_dir", help="a run directory (runs/<timestamp>) or a sweep directory (runs/multirun/<timestamp>)")
    p.set_defaults(func=_cmd)
    return p


def _cmd(args) -> int:
    try:
        paths = write_report(args.run_dir)
    except FedpropError as exc:
        print(f"fedprop report: {exc}", file=sys.stderr)
        return 1
    for p in paths.values():
        print(p)
    return 0
