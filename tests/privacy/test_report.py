from __future__ import annotations

import base64
import json
import re
from datetime import timedelta

import pytest

from federation.privacy import Gaussian, Ledger, generate_node_key, policy_from_mapping, verify
from federation.privacy.accountants import get_accountant
from federation.privacy.report import build_report, render_html, render_json, render_markdown, write_report

from .conftest import T0, append_round

POLICY = {
    "max_epsilon": 2.0, "period": "calendar-month", "delta": 1e-5, "min_noise_multiplier": 0.5,
    "max_rounds": 20, "allowed_accountants": ["rdp", "dp_pld"],
}

STATEMENT = """\
Privacy statement for partner acme (6 ledger entries; verified: hash chain, Ed25519 signatures and signed head checked against node key <FP> (pinned by public key: compare it with the fingerprint registered at onboarding; a key found next to the ledger proves nothing)).

Privacy unit: one customer. Two datasets are adjacent if one is obtained from the other by adding or removing all records of one customer (add/remove-one-customer adjacency). The analysis assumes one training row per customer; a customer with k rows is protected only at group size k.

Coverage: every release recorded in the ledger: 4 model update(s) from DP-SGD rounds in 2 run(s). Each release is recorded, signed and flushed before it leaves the node. Everything else a node sends is public by declaration on fedprop's release inventory (docs/release-inventory.md: e.g. the training-set size rounded to 2 significant digits, the privacy parameters, public bin edges, coarse timings); nothing else leaves, and anything not recorded is not covered.

Mechanism and sampling assumption: each DP-SGD round is accounted as a Gaussian mechanism applied to a Poisson-sampled batch (each customer included independently with probability q), self-composed over the round's optimizer steps, with each customer's gradient clipped to the recorded L2 norm. Batches that are not Poisson-sampled are not covered by this analysis.

Guarantee: in the current calendar-month period (2025-03-01T00:00:00+00:00 to 2025-04-01T00:00:00+00:00) the recorded releases compose to (1.786, 1e-05)-DP for each customer by the rdp accountant, the largest of the enforced rdp, dp_pld. Over all recorded time: (1.786, 1e-05)-DP. RDP bounds (rdp, dp_rdp) are valid but looser and are shown as cross-checks.

Policy: at most epsilon 2 per calendar-month period at delta 1e-05, noise multiplier >= 0.5, at most 20 rounds per run: COMPLIANT. Remaining budget: 0.214.

Not covered: hyperparameter tuning or model selection on partner data unless recorded as releases, timing and other side channels, data held by other partners, and any model a partner fits at its own node on its raw data (`fedprop personalise`): such a model is not DP and must never leave the node."""

PARTNER_LAYER = (
    "Partner-level layer: the server recorded 2 aggregate release(s) with partner-level Gaussian noise on the "
    "clipped sum of partner updates (without amplification by sampling). Privacy unit: one partner; adjacency: "
    "adding or removing one partner's entire contribution. They compose to (1.478, 1e-05)-DP for each partner "
    "by the rdp accountant. This layer protects a whole partner, all its customers at once, against what the "
    "server releases; the customer-level guarantee above covers everything that leaves this partner's node, "
    "including what the server sees."
)


def _report(filled_ledger, node_key, *, policy=POLICY, extra_entries=(), at=T0 + timedelta(days=1)):
    result = verify(filled_ledger, str(node_key) + ".pub")
    with Ledger.open(filled_ledger, signing_key=None) as ledger:
        entries = ledger.entries() + list(extra_entries)
    pol = policy_from_mapping(policy) if policy else None
    return build_report(entries, policy=pol, verification=result, at=at), result


def test_statement_is_pinned_in_full(filled_ledger, node_key):
    report, result = _report(filled_ledger, node_key)
    assert report["statement"].replace(result.public_key_fingerprint, "<FP>") == STATEMENT


def test_partner_level_layer_is_stated_when_server_entries_exist(filled_ledger, node_key, tmp_path):
    server_key = tmp_path / "server.key"
    generate_node_key(server_key)
    with Ledger.open(tmp_path / "server.db", signing_key=server_key) as server:
        for rnd in (1, 2):
            server.append(kind="server_dp_round", partner="federation", run_id="r1", round=rnd, delta=1e-5,
                          mechanism=Gaussian(noise_multiplier=4.0), clipping_norm=0.5, update_hash="e" * 64,
                          privacy_unit="partner", timestamp=T0 + timedelta(minutes=rnd))
        server_entries = server.entries()
    report, result = _report(filled_ledger, node_key, extra_entries=server_entries)
    paragraphs = report["statement"].replace(result.public_key_fingerprint, "<FP>").split("\n\n")
    assert paragraphs[-2] == PARTNER_LAYER
    assert "\n\n".join(paragraphs[:-2] + paragraphs[-1:]) == STATEMENT
    assert report["partner_layer"]["releases"] == 2


def test_non_compliance_is_stated_with_the_numbers(filled_ledger, node_key):
    report, _ = _report(filled_ledger, node_key, policy={**POLICY, "max_epsilon": 1.5})
    assert report["compliance"]["compliant"] is False
    assert "NOT COMPLIANT (peak spend in a calendar-month period 1.7862 > max_epsilon 1.5)" in report["statement"]
    assert report["compliance"]["remaining_epsilon"] == 0.0


def test_unverified_report_says_so(filled_ledger, node_key):
    with Ledger.open(filled_ledger, signing_key=None) as ledger:
        report = build_report(ledger.entries(), at=T0)
    assert "NOT verified: run `fedprop budget verify`" in report["statement"]
    assert report["compliance"] is None
    assert "Policy: none given to this report; compliance with a budget was not assessed." in report["statement"]


def test_per_run_per_round_and_agreement(filled_ledger, node_key):
    report, _ = _report(filled_ledger, node_key)
    assert [r["run_id"] for r in report["runs"]] == ["r1", "r2"]
    assert [r["rounds"] for r in report["runs"]] == [[1, 2, 3], [1]]
    cum = [r["cumulative_epsilon_in_period"]["rdp"] for r in report["rounds"]]
    assert cum == sorted(cum) and len(cum) == 4
    assert cum[-1] == pytest.approx(report["all_time_epsilon"]["rdp"])
    scopes = {a["scope"]: a for a in report["agreement"]}
    assert set(scopes) == {"run r1", "run r2", "current period", "all time"}
    # RDP is ~18% above the tight accountants here: expected (a looser bound), not a disagreement
    assert scopes["all time"]["differs"] is False and 0.1 < scopes["all time"]["rdp_looser_by"] < 0.3
    assert set(scopes["all time"]["epsilon"]) == {"rdp", "dp_rdp", "dp_pld", "prv", "tight"}
    lo, hi = scopes["all time"]["prv_interval"]
    assert lo <= scopes["all time"]["epsilon"]["dp_pld"] <= hi


def test_period_resets_the_current_spend(filled_ledger, node_key):
    report, _ = _report(filled_ledger, node_key, at=T0 + timedelta(days=40))
    assert set(report["current_period_epsilon"].values()) == {0.0}
    assert report["compliance"]["remaining_epsilon"] == 2.0


def test_renderings(filled_ledger, node_key, tmp_path):
    report, _ = _report(filled_ledger, node_key)
    md = render_markdown(report)
    assert md.startswith("# Privacy budget report: partner acme")
    assert "| run r1 |" in md and "DIFFER" not in md and "a looser bound, as expected" in md
    assert json.loads(render_json(report)) == json.loads(json.dumps(report))
    page = render_html(report)
    png = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert png and base64.b64decode(png.group(1)).startswith(b"\x89PNG")
    assert "<script" not in page
    for fmt in ("md", "json", "html"):
        out = write_report(report, tmp_path / f"r.{fmt}", fmt=fmt)
        assert out.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_html_escapes_ledger_text(tmp_path, node_key):
    path = tmp_path / "l.db"
    with Ledger.open(path, signing_key=node_key) as ledger:
        ledger.append(kind="refusal", partner="<b>acme</b>", run_id="<script>x</script>", round=1,
                      extra={"reason": "<img src=x>"})
        entries = ledger.entries()
    page = render_html(build_report(entries, at=T0))
    assert "<script>x" not in page and "<img src=x>" not in page and "&lt;b&gt;acme" in page


def test_a_real_disagreement_is_flagged_in_red(filled_ledger, node_key, monkeypatch):
    """dp_pld claiming less than PRV's proven lower bound is a bug somewhere: DIFFER, in red."""
    import federation.privacy.accountants as acc_mod

    monkeypatch.setattr(acc_mod, "_EPSILON_CACHE", {})
    monkeypatch.setattr(acc_mod.DpPldAccountant, "_epsilon", lambda self, events, delta: 0.5)
    report, _ = _report(filled_ledger, node_key)
    scopes = {a["scope"]: a for a in report["agreement"]}
    assert scopes["all time"]["differs"] and "outside prv's error interval" in scopes["all time"]["problems"][0]
    assert "<td class=bad>DIFFER" in render_html(report)


def test_record_only_is_printed_in_every_report(filled_ledger, node_key):
    report, _ = _report(filled_ledger, node_key, policy={"record_only": True})
    assert "Policy: RECORD ONLY (record_only: true in policy): every release is recorded, NO budget is enforced." \
        in report["statement"]
    assert "RECORD ONLY (no budget enforced)" in render_markdown(report)
    assert report["compliance"]["remaining_epsilon"] is None


def test_report_composes_incrementally(tmp_path, node_key, monkeypatch):
    """300 releases in one month: the tight accountants run a handful of times, not once per row."""
    import federation.privacy.accountants as acc_mod

    monkeypatch.setattr(acc_mod, "_EPSILON_CACHE", {})
    monkeypatch.setattr(acc_mod, "_PRV_CACHE", {})
    calls = {"prv": 0}
    real = acc_mod.PrvAccountant._epsilon

    def counting(self, events, delta):
        calls["prv"] += 1
        return real(self, events, delta)

    monkeypatch.setattr(acc_mod.PrvAccountant, "_epsilon", counting)
    path = tmp_path / "l.db"
    with Ledger.open(path, signing_key=node_key) as ledger:
        t = T0
        for run in range(30):
            for rnd in range(1, 11):
                t += timedelta(minutes=1)
                append_round(ledger, run_id=f"r{run}", rnd=rnd, when=t)
        entries = ledger.entries()
    pol = policy_from_mapping({**POLICY, "max_epsilon": 50.0, "max_rounds": None, "allowed_accountants": ["tight"]})
    report = build_report(entries, policy=pol, at=t)
    assert len(report["rounds"]) == 300 and calls["prv"] <= 5
    cum = [r["cumulative_epsilon_in_period"]["rdp"] for r in report["rounds"]]
    assert cum == sorted(cum) and all(c is not None for c in cum)
    last = report["rounds"][-1]
    assert last["checkpoint"] and last["enforced_cumulative"] == pytest.approx(report["all_time_epsilon"]["tight"])
    assert report["compliance"]["peak_period_epsilon"] == last["enforced_cumulative"]


def test_rolling_window_peak_is_found_at_the_rows_before_releases_expire(tmp_path, node_key):
    """A 1-day rolling window: the peak is the busiest day's spend, not the last day's."""
    path = tmp_path / "l.db"
    with Ledger.open(path, signing_key=node_key) as ledger:
        for rnd in range(1, 6):  # busy day: 5 rounds
            append_round(ledger, run_id="busy", rnd=rnd, when=T0 + timedelta(hours=rnd))
        append_round(ledger, run_id="quiet", rnd=1, when=T0 + timedelta(days=3))
        entries = ledger.entries()
    pol = policy_from_mapping({**POLICY, "period": 1, "max_epsilon": 50.0, "allowed_accountants": ["tight"]})
    report = build_report(entries, policy=pol, at=T0 + timedelta(days=3))
    busy = get_accountant("tight").epsilon([e.event for e in entries[:5]], delta=1e-5)
    assert [r["checkpoint"] for r in report["rounds"]] == [False, False, False, False, True, True]
    assert report["compliance"]["peak_period_epsilon"] == pytest.approx(busy)
    assert report["current_period_epsilon"]["tight"] < busy
