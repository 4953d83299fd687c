"""The issue's scenario on Flower's real simulation engine (Ray): privacy.epsilon=1 against a policy of 1.0
per period, with the ledgers and reports the run leaves behind, checked by `fedprop budget verify|report`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clients import ledger_hooks as LH
from federation.privacy.events import PoissonSampledGaussian
from simulations.simulate import run_simulation

from .conftest import make_cfg


def test_simulation_partner_with_earlier_spend_refused_others_continue(tmp_path):
    """One simulation: partner 1's ledger already holds 0.6 of its 1.0 budget from an earlier run this period,
    so its run (planned ~1.0) is refused before training; partner 0 trains every round; reports show both."""
    cfg = make_cfg(tmp_path, rounds=2, baselines={"enabled": False})
    with LH.open_ledger(LH.resolve_node_ledger(cfg, {"partition-id": 1})) as led:
        led.append(kind="dpsgd_round", partner="partner-1", run_id="earlier-run", round=1, delta=1e-5,
                   mechanism=PoissonSampledGaussian(sampling_rate=0.05, noise_multiplier=2.0, steps=20),
                   clipping_norm=1.0, update_hash="e" * 64)
    summary = run_simulation(cfg, tmp_path / "run")
    rounds = json.loads((tmp_path / "run" / "federated_rounds.json").read_text())["churn+propensity"]
    assert [sorted(r["partners"]) for r in rounds] == [["0"], ["0"]]  # partner 0 carries on alone
    reasons = [ref["reason"] for r in rounds for ref in r["refusals"]]
    assert len(reasons) == 2 and all(x.startswith("partner 1: run refused before training: run refused: it would "
                                                  "spend epsilon") and "already spent 0.5999" in x for x in reasons)
    idx = summary["privacy_reports"]
    p0, p1 = idx["partners"]["0"], idx["partners"]["1"]
    assert p0["rounds_released_this_run"] == 2 and p0["refusals_this_run"] == [] and 0.9 < p0["period_epsilon"] <= 1.0
    assert p1["rounds_released_this_run"] == 0 and len(p1["refusals_this_run"]) == 1
    assert abs(p1["period_epsilon"] - 0.600) < 1e-3 and p0["compliant"] and p1["compliant"]
    for fmt in ("md", "json", "html"):
        assert Path(p1["reports"][fmt]).exists()
    md = (tmp_path / "run" / "summary.md").read_text()
    assert "### Privacy budget reports" in md and str(tmp_path / "run" / "privacy") in md

    led = tmp_path / "ledgers" / "synthetic"
    keys = tmp_path / "ledgers-keys" / "synthetic"  # signing keys live outside the ledgers' folder
    cli = [sys.executable, "-m", "simulations.cli", "budget"]
    from federation.privacy.ledger import Ledger

    with Ledger.open(led / "partner-0.sqlite", signing_key=None) as l0:
        kinds0 = [e.kind for e in l0.entries()]
    assert kinds0.count("dpsgd_round") == 2 and kinds0.count("evaluation_release") == 2
    # p0: run_start + 2 rounds + 2 evaluation releases, each release preceded by its reservation; p1: earlier round + refusal
    for pid, n in ((0, len(kinds0)), (1, 2)):
        ok = subprocess.run(cli + ["verify", str(led / f"partner-{pid}.sqlite"), "--public-key",
                                   str(keys / f"partner-{pid}.key.pub")], capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0 and ok.stdout.startswith("OK ") and f"{n} entries" in ok.stdout, ok.stderr
    rep = subprocess.run(cli + ["report", str(led / "partner-1.sqlite"), "--public-key", str(keys / "partner-1.key.pub"),
                                "--policy", cfg.privacy.policy, "--format", "json"],
                         capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    data = json.loads(rep.stdout)
    assert data["ledger"]["verified"] and data["compliance"]["compliant"] and data["counts"]["refusals"] == 1
    assert [r["run_id"] for r in data["runs"]][0] == "earlier-run"


@pytest.mark.slow  # two simulations (~40 s quiet, more under load); in-process twin: test_client_ledger.py
def test_simulation_second_run_in_period_refused_and_reported(tmp_path):
    cfg = make_cfg(tmp_path, rounds=2, baselines={"enabled": False})
    s1 = run_simulation(cfg, tmp_path / "run1")
    idx = s1["privacy_reports"]
    for pid in ("0", "1"):
        p = idx["partners"][pid]
        assert p["rounds_released_this_run"] == 2 and p["refusals_this_run"] == []
        assert 0.9 < p["period_epsilon"] <= 1.0 and p["compliant"] is True
        for fmt in ("md", "json", "html"):
            assert Path(p["reports"][fmt]).exists()
    assert "### Privacy budget reports" in (tmp_path / "run1" / "summary.md").read_text()

    from federation.errors import FedpropError

    with pytest.raises(FedpropError, match="no partner trained"):  # nothing trained: the run fails, releases nothing
        run_simulation(cfg, tmp_path / "run2")
    rounds = json.loads((tmp_path / "run2" / "federated_rounds.json").read_text())["churn+propensity"]
    assert not (tmp_path / "run2" / "model_churn+propensity.pt").exists()
    assert all(r["partners"] == {} for r in rounds)  # nobody trained or evaluated: nothing was released
    reasons = [ref["reason"] for r in rounds for ref in r["refusals"]]
    assert len(reasons) == 4 and all("run refused before training: run refused: it would spend" in x for x in reasons)
    for pid in ("0", "1"):
        report = json.loads((tmp_path / "run2" / "privacy" / f"partner-{pid}.json").read_text())
        assert report["compliance"]["compliant"] is True
        # run 1: 2 training rounds + 1 evaluated round x 2 heads; run 2: nothing
        assert [r["releases"] for r in report["runs"]] == [4, 0] and report["counts"]["refusals"] == 1
    md = (tmp_path / "run2" / "privacy" / "partner-0.md").read_text()
    assert "COMPLIANT" in md and "run refused" in md

