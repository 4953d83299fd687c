"""Model release (signature, keys, model card) and the summary's federation-value table."""
from __future__ import annotations

import json
import stat

import pytest

from federation.config import from_dict
from federation.contract import load_contract
from federation.featurespec import feature_names
from federation.signing import SigningKeyError, public_key_fingerprint, verify_file
from server.release import ensure_server_key, privacy_guarantees, training_contract
from simulations.summary import render_summary
from tests.report.runfixture import make_run


def test_final_model_is_signed_and_public_key_copied(run_dir):
    keys = run_dir.parent / "keys"
    manifest = verify_file(run_dir / "model_churn+propensity.pt", run_dir / "federation.pub")
    assert manifest["file"] == "model_churn+propensity.pt"
    assert (run_dir / "federation.pub").read_bytes() == (keys / "server.pub").read_bytes()
    assert stat.S_IMODE((keys / "server.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    verify_file(run_dir / "model_card_churn.json", run_dir / "federation.pub")


def test_key_is_reused_across_runs(run_dir, tmp_path):
    keys = run_dir.parent / "keys"
    other = make_run(tmp_path / "run2", keys, rounds=1)
    assert public_key_fingerprint(other / "federation.pub") == public_key_fingerprint(run_dir / "federation.pub")


def test_half_a_key_pair_is_refused(tmp_path):
    ensure_server_key(tmp_path / "k")
    (tmp_path / "k" / "server.pub").unlink()
    with pytest.raises(SigningKeyError, match="only one of"):
        ensure_server_key(tmp_path / "k")


def test_model_card_contents(run_dir):
    card = json.loads((run_dir / "model_card_churn.json").read_text())
    rounds = json.loads((run_dir / "federated_rounds.json").read_text())["churn+propensity"]
    cfg = from_dict(json.loads((run_dir / "config.json").read_text())["config"])
    assert card["task"] == "churn" and card["model"]["heads"] == ["churn", "propensity"] and card["model"]["output"] == 0
    assert card["model"]["file"] == "model_churn+propensity.pt" and card["model"]["signature"].endswith(".sig")
    assert card["data_contract"]["features"] == list(feature_names(cfg.data))
    assert card["data_contract"]["hash"] == load_contract("contracts/synthetic_events.yaml").contract_hash()
    assert card["data_contract"]["name"] == "synthetic_events"
    assert card["training"] == {"rounds": 3, "partners": 3}  # counts only
    g = card["privacy"]["guarantees"]
    assert [x["partner"] for x in g] == ["partner-0", "partner-1", "partner-2"]
    for x in g:
        last = rounds[-1]["partners"][x["partner"].split("-")[1]]["train"]
        assert x["epsilon"] == pytest.approx(last["epsilon"]) and x["delta"] == 1e-5
        assert x["accountant"] == "tight" and x["unit"] == "customer"
    m = card["metrics"]
    assert m["auc_roc"] == pytest.approx(rounds[-1]["evaluate"]["churn.auc_roc"])
    assert len(m["gains"]["cumulative_lift"]) == 10 and len(m["reliability"]["count"]) == 10
    md = (run_dir / "model_card_churn.md").read_text()
    assert "Top-decile lift" in md and "tight" in md and card["data_contract"]["hash"] in md


def test_no_guarantee_claimed_without_dp():
    cfg = from_dict({"privacy": {"enabled": False}})
    assert privacy_guarantees(cfg, [{"partners": {"0": {"train": {"epsilon": 1.0}}}}]) == []


def test_training_contract_for_real_data_uses_the_run_cutoff():
    cfg = from_dict({"data": {"name": "online_retail", "kind": "events", "contract": "contracts/online_retail.yaml",
                              "cutoff": "2011-08-01", "horizon_days": 60}})
    c = training_contract(cfg)
    assert (c.events.cutoff, c.events.horizon_days) == ("2011-08-01", 60)
    assert c.contract_hash() != load_contract("contracts/online_retail.yaml").contract_hash()


def test_summary_per_partner_federation_value(run_dir):
    s = json.loads((run_dir / "summary.json").read_text())
    for head in ("churn", "propensity"):
        pp = s["tasks"][head]["per_partner"]
        assert sorted(pp, key=int) == ["0", "1", "2"]
        for v in pp.values():
            for k in ("local_only_auc", "federated_dp_auc", "centralized_auc", "local_only_top_decile_lift",
                      "federated_dp_top_decile_lift", "centralized_top_decile_lift"):
                assert 0 < v[k] < 20, k
            assert v["gain_auc"] == pytest.approx(v["federated_dp_auc"] - v["local_only_auc"])
            assert v["gain_top_decile_lift"] == pytest.approx(v["federated_dp_top_decile_lift"] - v["local_only_top_decile_lift"])
        assert s["tasks"][head]["partners_gaining_auc"] == sum(1 for v in pp.values() if v["gain_auc"] > 0)
    text = render_summary(s)
    assert "Federation value per partner" in text
    assert sum(1 for line in text.splitlines() if line.startswith("| churn | ") and line.count("|") == 14) == 3  # + personalised AUC, its gain
    # a natural split's partner names sit next to their numbers in the table (not only on a line at the end)
    named = render_summary({**s, "partner_names": {"0": "North", "1": "partner-1", "2": "South"}})
    rows = [line for line in named.splitlines() if line.startswith("| churn | ") and line.count("|") == 14]
    assert [r.split(" | ")[1] for r in rows] == ["0 (North)", "1", "2 (South)"]
