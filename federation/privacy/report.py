"""The compliance report, generated from verified ledger entries (PRINCIPLES.md 10).

``build_report`` returns one JSON-able dict (fixed shape, ``report_version`` 1); ``render_markdown``,
``render_json`` and ``render_html`` render it; ``write_report`` writes atomically. The statement text
(``statement`` key) is pinned by tests: change it only on purpose.

Every epsilon here is recomputed from the recorded mechanisms; the enforced figure is the maximum over the
policy's allowed accountants (all registered accountants when no policy is given).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from federation.errors import PrivacyError
from federation.privacy.accountants import (
    DP_RDP_ORDERS,
    available_accountants,
    get_accountant,
    prv_bounds,
    rdp_epsilon_on_orders,
)
from federation.privacy.ledger import LedgerEntry, VerificationResult, spending_entries
from federation.privacy.policy import DEFAULT_ACCOUNTANTS, BudgetPolicy, Period
from federation.privacy.prv import PrvDomainTooLarge

__all__ = ["build_report", "render_markdown", "render_json", "render_html", "write_report", "AGREEMENT_TOLERANCE"]

REPORT_VERSION = 1
#: The two RDP implementations (fedprop's and dp-accounting's, on the same orders) "differ" beyond this.
AGREEMENT_TOLERANCE = 0.01
#: accountants cheap enough to evaluate at every row of the report
_CHEAP = frozenset({"rdp", "dp_rdp"})


def _agreement(label: str, events: list, eps: dict[str, float], delta: float) -> dict[str, Any]:
    """Real disagreements only: dp_pld outside PRV's [lower, upper] (its stated error), or the two RDP
    implementations apart by > AGREEMENT_TOLERANCE on the same orders. RDP above the tight accountants is
    expected (a looser bound) and reported as ``rdp_looser_by``, not as a disagreement."""
    if not events:
        return {"scope": label, "epsilon": eps, "differs": False, "tight_consistent": True, "rdp_consistent": True,
                "prv_interval": [0.0, 0.0], "rdp_looser_by": 0.0, "problems": []}
    pld = eps.get("dp_pld", get_accountant("dp_pld").epsilon(events, delta=delta))
    try:
        lower, _, upper = prv_bounds(events, delta=delta)
    except PrvDomainTooLarge:  # nothing to cross-check dp_pld with: say so, do not pretend agreement
        lower, upper = math.nan, math.nan
    tight_ok = math.isnan(lower) or lower - 1e-9 <= pld <= upper + 1e-9
    ours = rdp_epsilon_on_orders(events, delta=delta, orders=DP_RDP_ORDERS, warn=False)
    theirs = eps.get("dp_rdp", get_accountant("dp_rdp").epsilon(events, delta=delta))
    rdp_ok = max(ours, theirs) == 0 or abs(ours - theirs) / max(ours, theirs) <= AGREEMENT_TOLERANCE
    problems = []
    if not tight_ok:
        problems.append(f"dp_pld {pld:.4f} outside prv's error interval [{lower:.4f}, {upper:.4f}]")
    if not rdp_ok:
        problems.append(f"rdp {ours:.4f} vs dp_rdp {theirs:.4f} on the same orders: > {AGREEMENT_TOLERANCE:.0%} apart")
    tight = eps.get("tight") or pld
    return {
        "scope": label, "epsilon": eps, "differs": bool(problems), "tight_consistent": tight_ok,
        "rdp_consistent": rdp_ok, "prv_interval": None if math.isnan(lower) else [lower, upper],
        "rdp_looser_by": (eps.get("rdp", ours) - tight) / tight if tight > 0 else 0.0, "problems": problems,
    }


def _compose(accountant: str, events: list, delta: float, cache: dict) -> float | None:
    """Epsilon by one accountant (None: PRV cannot grid a history this long; tight then uses RDP in its place)."""
    key = (accountant, delta, tuple(sorted((e.composition_key(), e.count) for e in events)))
    if key not in cache:
        try:
            cache[key] = get_accountant(accountant).epsilon(events, delta=delta)
        except PrvDomainTooLarge:
            cache[key] = None
    return cache[key]


def _fmt_eps(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _layer_summary(entries: list[LedgerEntry], accountants: Sequence[str], delta: float, cache: dict) -> dict:
    events = [e.event for e in entries]
    return {
        "releases": len(entries),
        "epsilon": {a: _compose(a, events, delta, cache) for a in accountants},
    }


def build_report(
    entries: Sequence[LedgerEntry],
    *,
    policy: BudgetPolicy | None = None,
    verification: VerificationResult | None = None,
    partner: str | None = None,
    at: datetime | None = None,
    delta: float | None = None,
) -> dict[str, Any]:
    """Build the report for one partner's customer-level releases (+ any partner-level server entries).

    ``at`` picks the current period (default: now, UTC). ``delta`` defaults to the policy's, else to the
    largest delta recorded."""
    at = datetime.now(timezone.utc) if at is None else at.astimezone(timezone.utc)
    entries = list(entries)
    customer = [e for e in spending_entries(entries) if e.layer == "customer"]
    partners = sorted({e.partner for e in entries if e.layer != "partner" and e.kind != "partner_heads"})
    if partner is None:
        if len(partners) > 1:
            raise PrivacyError(f"entries cover several partners {partners}; pass partner= to pick one.")
        partner = partners[0] if partners else "(none)"
    customer = [e for e in customer if e.partner == partner]
    server = [e for e in entries if e.layer == "partner"]
    refusals = [e for e in entries if e.kind == "refusal" and e.partner == partner]
    accountants = available_accountants()  # all shown (cross-checks); the policy's are enforced
    enforced = tuple(policy.allowed_accountants) if policy else DEFAULT_ACCOUNTANTS
    if delta is None:
        deltas = [e.delta for e in customer + server if e.delta is not None]
        delta = policy.delta if policy else (max(deltas) if deltas else 1e-5)
    period = policy.period if policy else Period("all-time")
    cache: dict = {}

    # Cumulative epsilon in the period containing each release, composed INCREMENTALLY: a running multiset
    # of mechanisms (composition key -> count) enters each release and drops those leaving the window, so a
    # row costs O(distinct mechanisms). The cheap RDP accountants are evaluated at every row; the tight ones
    # (PLD, PRV: one numerical composition each) at every row where the window is about to lose releases
    # (and at the last row): the peak spend of every window is there, since composing more never lowers
    # epsilon. The other rows show them as None.
    rounds = []
    window: dict[tuple, list] = {}  # key -> [event, count]
    lo = 0
    starts = [period.window(e.when)[0] for e in customer]
    for i, e in enumerate(customer):
        while starts[i] is not None and customer[lo].when < starts[i]:
            old = customer[lo].event
            slot = window[old.composition_key()]
            slot[1] -= old.count
            if slot[1] == 0:
                del window[old.composition_key()]
            lo += 1
        ev = e.event
        slot = window.setdefault(ev.composition_key(), [ev, 0])
        slot[1] += ev.count
        nxt = i + 1
        checkpoint = nxt == len(customer) or (starts[nxt] is not None and customer[lo].when < starts[nxt])
        in_window = [template.with_count(count) for template, count in window.values()]
        cum = {
            a: _compose(a, in_window, delta, cache) if (a in _CHEAP or checkpoint) else None for a in accountants
        }
        alone = {a: _compose(a, [ev], delta, cache) for a in accountants}
        rounds.append({
            "seq": e.seq, "run_id": e.run_id, "round": e.round, "kind": e.kind, "timestamp": e.timestamp,
            "mechanism": ev.describe(), "clipping_norm": e.clipping_norm, "epsilon": alone,
            "cumulative_epsilon_in_period": cum, "checkpoint": checkpoint,
            "enforced_cumulative": max(cum[a] for a in enforced) if checkpoint or set(enforced) <= _CHEAP else None,
        })

    runs = []
    for run_id in dict.fromkeys(e.run_id for e in entries if e.partner == partner):
        run_entries = [e for e in customer if e.run_id == run_id]
        summary = _layer_summary(run_entries, accountants, delta, cache)
        runs.append({
            "run_id": run_id,
            "rounds": sorted({e.round for e in run_entries if e.kind == "dpsgd_round"}),
            "releases": summary["releases"],
            "epsilon": summary["epsilon"],
            "refusals": sum(1 for r in refusals if r.run_id == run_id),
            "first": min((e.timestamp for e in run_entries), default=None),
            "last": max((e.timestamp for e in run_entries), default=None),
        })

    start, end = period.window(at)
    current = [e.event for e in customer if period.contains(e.when, at=at)]
    current_eps = {a: _compose(a, current, delta, cache) for a in accountants}
    all_time = _layer_summary(customer, accountants, delta, cache)["epsilon"]
    enforced_acc = max(enforced, key=lambda a: current_eps[a])
    peak = max((r["enforced_cumulative"] for r in rounds if r["enforced_cumulative"] is not None), default=0.0)
    lifetime = max(all_time[a] for a in enforced)

    compliance = None
    if policy is not None:
        problems = []
        if policy.record_only:
            pass  # nothing is enforced: the statement says so
        elif peak > policy.max_epsilon:
            problems.append(f"peak spend in a {period.label()} period {peak:.4f} > max_epsilon {policy.max_epsilon:g}")
        if not policy.record_only and policy.lifetime_max_epsilon is not None and lifetime > policy.lifetime_max_epsilon:
            problems.append(f"all-time spend {lifetime:.4f} > lifetime_max_epsilon {policy.lifetime_max_epsilon:g}")
        for e in customer if not policy.record_only else ():
            if e.kind == "dpsgd_round" and e.event.noise_multiplier < policy.min_noise_multiplier:
                problems.append(
                    f"seq {e.seq}: noise_multiplier {e.event.noise_multiplier:g} < min_noise_multiplier "
                    f"{policy.min_noise_multiplier:g}"
                )
        if policy.max_rounds is not None and not policy.record_only:
            for run in runs:
                if len(run["rounds"]) > policy.max_rounds:
                    problems.append(f"run {run['run_id']}: {len(run['rounds'])} rounds > max_rounds {policy.max_rounds}")
        remaining = max(0.0, policy.max_epsilon - current_eps[enforced_acc])
        if policy.lifetime_max_epsilon is not None:
            remaining = min(remaining, max(0.0, policy.lifetime_max_epsilon - lifetime))
        compliance = {
            "compliant": not problems,
            "record_only": policy.record_only,
            "problems": problems,
            "peak_period_epsilon": peak,
            "all_time_epsilon": lifetime,
            "max_epsilon": None if math.isinf(policy.max_epsilon) else policy.max_epsilon,
            "lifetime_max_epsilon": policy.lifetime_max_epsilon,
            "remaining_epsilon": None if policy.record_only else remaining,
        }

    agreement = []
    scopes = [(f"run {r['run_id']}", [e.event for e in customer if e.run_id == r["run_id"]], r["epsilon"]) for r in runs]
    scopes += [("current period", current, current_eps), ("all time", [e.event for e in customer], all_time)]
    for label, events, eps in scopes:
        agreement.append(_agreement(label, events, eps, delta))

    partner_layer = None
    if server:
        s_delta = max(e.delta for e in server)
        s_sum = _layer_summary(server, accountants, s_delta, cache)
        partner_layer = {
            "releases": s_sum["releases"], "delta": s_delta, "epsilon": s_sum["epsilon"],
            "enforced_accountant": max(enforced, key=lambda a: s_sum["epsilon"][a]),
            "amplified": any(e.event.kind == "poisson_sampled_gaussian" for e in server),
            "runs": sorted({e.run_id for e in server}),
        }

    report = {
        "report_version": REPORT_VERSION,
        "generated_at": at.isoformat(),
        "partner": partner,
        "privacy_unit": "customer",
        "adjacency": "add/remove one customer",
        "delta": delta,
        "accountants": list(accountants),
        "enforced_accountant": enforced_acc,
        "enforced_accountants": list(enforced),
        "period": {
            "label": period.label(),
            "start": start.isoformat() if start else None,
            "end": end.isoformat() if end else None,
        },
        "ledger": {
            "entries": sum(1 for e in entries if e.layer != "partner"),
            "verified": verification is not None,
            "head_seq": verification.head_seq if verification else None,
            "head_hash": verification.head_hash if verification else None,
            "public_key_fingerprint": verification.public_key_fingerprint if verification else None,
            "pinned_by": verification.pinned_by if verification else None,
            "ledger_id": verification.ledger_id if verification else None,
            "reset_of": (verification.genesis or {}).get("reset_of") if verification else None,
        },
        "counts": {
            "dpsgd_rounds": sum(1 for e in customer if e.kind == "dpsgd_round"),
            "evaluation_releases": sum(1 for e in customer if e.kind == "evaluation_release"),
            "runs": len(runs),
            "refusals": len(refusals),
            "open_reservations": sum(1 for e in customer if e.kind == "reservation"),
        },
        "current_period_epsilon": current_eps,
        "all_time_epsilon": all_time,
        "policy": {**policy.to_dict(), "source": policy.source} if policy else None,
        "compliance": compliance,
        "runs": runs,
        "rounds": rounds,
        "refusals": [
            {"seq": r.seq, "run_id": r.run_id, "round": r.round, "timestamp": r.timestamp, "extra": r.extra}
            for r in refusals
        ],
        "agreement": agreement,
        "agreement_tolerance": AGREEMENT_TOLERANCE,
        "partner_layer": partner_layer,
        # runs whose DP noise was derived from the run config's seed (privacy.noise=reproducible): no guarantee
        # against anyone who knows the seed
        "unprotected_runs": sorted({e.run_id for e in entries if e.kind == "run_start"
                                    and (e.extra or {}).get("noise") == "reproducible"}),
    }
    report["statement"] = build_statement(report)
    return report


def build_statement(report: dict[str, Any]) -> str:
    """The guarantee in words. Pinned in full by tests/privacy/test_report.py."""
    led, counts, d = report["ledger"], report["counts"], report["delta"]
    verified = (
        f"verified: hash chain, Ed25519 signatures and signed head checked against node key "
        f"{led['public_key_fingerprint']} (pinned by {led.get('pinned_by') or 'public key'}: compare it with the "
        "fingerprint registered at onboarding; a key found next to the ledger proves nothing)"
        if led["verified"]
        else "NOT verified: run `fedprop budget verify` before relying on this statement"
    )
    period = report["period"]
    window = (
        "all recorded time" if period["start"] is None and period["end"] is None
        else f"{period['start']} to {period['end'] or 'now'}"
    )
    acc = report["enforced_accountant"]
    evals = (
        f" and {counts['evaluation_releases']} evaluation release(s)" if counts["evaluation_releases"] else ""
    )
    unprotected = report.get("unprotected_runs") or []
    lines = ([
        f"WARNING: run(s) {', '.join(unprotected)} used reproducible noise (privacy.noise=reproducible): their noise "
        "is derived from the run config's seed, so they give NO differential-privacy guarantee against anyone who "
        "knows the seed (the coordinator chose it). The figures below hold only against parties who do not.",
        "",
    ] if unprotected else []) + [
        f"Privacy statement for partner {report['partner']} ({led['entries']} ledger entries; {verified}).",
        "",
        "Privacy unit: one customer. Two datasets are adjacent if one is obtained from the other by adding or "
        "removing all records of one customer (add/remove-one-customer adjacency). The analysis assumes one "
        "training row per customer; a customer with k rows is protected only at group size k.",
        "",
        f"Coverage: every release recorded in the ledger: {counts['dpsgd_rounds']} model update(s) from DP-SGD "
        f"rounds in {counts['runs']} run(s){evals}. Each release is recorded, signed and flushed before it "
        "leaves the node. Everything else a node sends is public by declaration on fedprop's release inventory "
        "(docs/release-inventory.md: e.g. the training-set size rounded to 2 significant digits, the privacy "
        "parameters, public bin edges, coarse timings); nothing else leaves, and anything not recorded is not "
        "covered.",
        "",
        "Mechanism and sampling assumption: each DP-SGD round is accounted as a Gaussian mechanism applied to "
        "a Poisson-sampled batch (each customer included independently with probability q), self-composed over "
        "the round's optimizer steps, with each customer's gradient clipped to the recorded L2 norm. Batches "
        "that are not Poisson-sampled are not covered by this analysis.",
        "",
        f"Guarantee: in the current {period['label']} period ({window}) the recorded releases compose to "
        f"({_fmt_eps(report['current_period_epsilon'][acc])}, {d:g})-DP for each customer by the {acc} "
        f"accountant, the largest of the enforced {', '.join(report['enforced_accountants'])}"
        + (" (tight: the larger of dp_pld and prv, each an upper bound)" if "tight" in report["enforced_accountants"] else "")
        + f". Over all recorded time: ({_fmt_eps(max(report['all_time_epsilon'][a] for a in report['enforced_accountants']))}, "
        f"{d:g})-DP. RDP bounds (rdp, dp_rdp) are valid but looser and are shown as cross-checks.",
    ]
    if counts.get("open_reservations"):
        lines[-1] += (f" Included: {counts['open_reservations']} reserved release(s) never committed or released "
                      "(a crash between check and release), counted as spent.")
    comp = report["compliance"]
    if comp is not None and comp.get("record_only"):
        lines += [
            "",
            "Policy: RECORD ONLY (record_only: true in " + (report["policy"].get("source") or "the policy")
            + "): every release is recorded, NO budget is enforced.",
        ]
    elif comp is None:
        lines += ["", "Policy: none given to this report; compliance with a budget was not assessed."]
    else:
        pol = report["policy"]
        verdict = "COMPLIANT" if comp["compliant"] else "NOT COMPLIANT (" + "; ".join(comp["problems"]) + ")"
        lifetime = (f", at most {pol['lifetime_max_epsilon']:g} over all recorded time"
                    if pol.get("lifetime_max_epsilon") is not None else "")
        lines += [
            "",
            f"Policy: at most epsilon {pol['max_epsilon']:g} per {period['label']} period{lifetime} at delta "
            f"{pol['delta']:g}, noise multiplier >= {pol['min_noise_multiplier']:g}, "
            + (f"at most {pol['max_rounds']} rounds per run" if pol["max_rounds"] else "no limit on rounds per run")
            + f": {verdict}. Remaining budget: {_fmt_eps(comp['remaining_epsilon'])}.",
        ]
    pl = report["partner_layer"]
    if pl is not None:
        pacc = pl["enforced_accountant"]
        amp = "with amplification by sampling of partners" if pl["amplified"] else "without amplification by sampling"
        lines += [
            "",
            f"Partner-level layer: the server recorded {pl['releases']} aggregate release(s) with partner-level "
            f"Gaussian noise on the clipped sum of partner updates ({amp}). Privacy unit: one partner; adjacency: "
            f"adding or removing one partner's entire contribution. They compose to "
            f"({_fmt_eps(pl['epsilon'][pacc])}, {pl['delta']:g})-DP for each partner by the {pacc} accountant. "
            "This layer protects a whole partner, all its customers at once, against what the server releases; "
            "the customer-level guarantee above covers everything that leaves this partner's node, including "
            "what the server sees.",
        ]
    lines += [
        "",
        "Not covered: hyperparameter tuning or model selection on partner data unless recorded as releases, "
        "timing and other side channels, data held by other partners, and any model a partner fits at its own "
        "node on its raw data (`fedprop personalise`): such a model is not DP and must never leave the node.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- rendering


def _table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _sections(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    accs = report["accountants"]
    runs = [
        [r["run_id"], str(len(r["rounds"])), str(r["releases"]), str(r["refusals"])]
        + [_fmt_eps(r["epsilon"][a]) for a in accs]
        for r in report["runs"]
    ]
    rounds = [
        [str(r["seq"]), r["run_id"], str(r["round"]), r["timestamp"], r["mechanism"]]
        + [_fmt_eps(r["epsilon"][a]) for a in accs]
        + [_fmt_eps(r["enforced_cumulative"])]
        for r in report["rounds"]
    ]
    agreement = [
        [a["scope"]] + [_fmt_eps(a["epsilon"][n]) for n in accs]
        + ["DIFFER: " + "; ".join(a["problems"]) if a["differs"]
           else f"agree (RDP {a['rdp_looser_by']:+.1%} vs tight: a looser bound, as expected)"]
        for a in report["agreement"]
    ]
    refusals = [[str(r["seq"]), r["run_id"], str(r["round"]), r["timestamp"], json.dumps(r["extra"])] for r in report["refusals"]]
    return [
        ("Spend per run", ["run", "rounds", "releases", "refusals"] + [f"eps ({a})" for a in accs], runs),
        (
            "Spend per round",
            ["seq", "run", "round", "timestamp", "mechanism"] + [f"eps ({a})" for a in accs] + ["cumulative in period"],
            rounds,
        ),
        (
            f"Accountants' agreement (differ: dp_pld outside prv's error interval, or rdp and dp_rdp "
            f"> {report['agreement_tolerance']:.0%} apart on the same orders)",
            ["scope"] + accs + ["agreement"],
            agreement,
        ),
        ("Refusals", ["seq", "run", "round", "timestamp", "details"], refusals),
    ]


def render_markdown(report: dict[str, Any]) -> str:
    out = [f"# Privacy budget report: partner {report['partner']}", "", "## Statement", "", report["statement"], ""]
    comp = report["compliance"]
    if comp is not None:
        verdict = "RECORD ONLY (no budget enforced)" if comp.get("record_only") else (
            "COMPLIANT" if comp["compliant"] else "NOT COMPLIANT")
        out += ["## Policy compliance", "", verdict, ""]
        out += [f"- {p}" for p in comp["problems"]] + ([""] if comp["problems"] else [])
    for title, headers, rows in _sections(report):
        out += [f"## {title}", "", _table(headers, rows) if rows else "(none)", ""]
    return "\n".join(out)


def render_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n"


def _plot_png(report: dict[str, Any]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, without touching pyplot's global state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = list(range(1, len(report["rounds"]) + 1))
    for acc in report["accountants"]:
        pts = [(x, r["cumulative_epsilon_in_period"][acc]) for x, r in zip(xs, report["rounds"])
               if r["cumulative_epsilon_in_period"][acc] is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=acc)
    if report["compliance"] is not None and report["compliance"]["max_epsilon"] is not None:
        ax.axhline(report["compliance"]["max_epsilon"], color="red", linestyle="--", label="policy max epsilon")
    prev = None
    for x, r in zip(xs, report["rounds"]):
        if prev is not None and r["run_id"] != prev:
            ax.axvline(x - 0.5, color="grey", linestyle=":", linewidth=1)
        prev = r["run_id"]
    ax.set_xlabel("release (in ledger order; dotted lines separate runs)")
    ax.set_ylabel(f"cumulative epsilon (delta={report['delta']:g})")
    ax.set_title(f"Customer-level epsilon in the {report['period']['label']} period")
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def render_html(report: dict[str, Any]) -> str:
    esc = html.escape
    png = base64.b64encode(_plot_png(report)).decode("ascii")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Privacy budget report: {esc(report['partner'])}</title>",
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #999;padding:.2em .5em;font-size:.9em}.bad{color:#b00;font-weight:bold}"
        ".statement p{margin:.6em 0}</style></head><body>",
        f"<h1>Privacy budget report: partner {esc(report['partner'])}</h1>",
        '<h2>Statement</h2><div class="statement">',
    ]
    parts += [f"<p>{esc(p)}</p>" for p in report["statement"].split("\n\n")]
    parts.append("</div>")
    comp = report["compliance"]
    if comp is not None:
        cls = "" if comp["compliant"] else ' class="bad"'
        verdict = "RECORD ONLY (no budget enforced)" if comp.get("record_only") else (
            "COMPLIANT" if comp["compliant"] else "NOT COMPLIANT")
        cls = ' class="bad"' if comp.get("record_only") else cls
        parts.append(f"<h2>Policy compliance</h2><p{cls}>{verdict}</p>")
        if comp["problems"]:
            parts.append("<ul>" + "".join(f"<li>{esc(p)}</li>" for p in comp["problems"]) + "</ul>")
    parts.append(
        '<h2>Cumulative epsilon</h2><img alt="cumulative epsilon over rounds" '
        f'src="data:image/png;base64,{png}">'
    )
    for title, headers, rows in _sections(report):
        parts.append(f"<h2>{esc(title)}</h2>")
        if not rows:
            parts.append("<p>(none)</p>")
            continue
        parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>")
        for row in rows:
            parts.append(
                "<tr>" + "".join(f'<td{" class=bad" if c.startswith("DIFFER") else ""}>{esc(c)}</td>' for c in row) + "</tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


_RENDERERS = {"md": render_markdown, "json": render_json, "html": render_html}


def write_report(report: dict[str, Any], path: str | os.PathLike[str], *, fmt: str) -> Path:
    """Render and write atomically (temp file in the same directory, fsync, os.replace)."""
    if fmt not in _RENDERERS:
        raise PrivacyError(f"unknown report format {fmt!r}; choose one of {', '.join(_RENDERERS)}.")
    path = Path(path)
    text = _RENDERERS[fmt](report)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # a report is meant to be shared (mkstemp creates 0600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
