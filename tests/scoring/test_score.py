"""`fedprop score`: signature first, contract second, scores written atomically; and `fedprop data synth`."""
from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from clients.score import SEGMENTS, deciles, load_thresholds, score
from federation.errors import ConfigError
from federation.signing import generate_keypair
from simulations.cli import main as fedprop

MODEL = "model_churn+propensity.pt"
CONTRACT = "contracts/synthetic_events.yaml"
COLUMNS = ["customer_id", "churn_probability", "churn_decile", "propensity_score", "propensity_decile", "segment"]


@pytest.fixture
def pinned(signed_run):
    """The federation key the partner pinned at onboarding: kept apart from the model's folder."""
    return signed_run.parent / "keys" / "server.pub"


@pytest.fixture
def model_copy(signed_run, tmp_path):
    """What a partner receives: the model, its signature, the federation public key (and the cards)."""
    d = tmp_path / "release"
    d.mkdir()
    for name in (MODEL, MODEL + ".sig", "federation.pub", "model_card_churn.json", "model_card_churn.json.sig",
                 "model_card_propensity.json", "model_card_propensity.json.sig"):
        shutil.copy(signed_run / name, d / name)
    return d


def _run(capsys, *args):
    rc = fedprop(["score", *map(str, args)])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return rc, out.out, out.err


def test_scores_have_columns_deciles_and_segments(model_copy, pinned, events_csv, tmp_path):
    out = tmp_path / "scores.parquet"
    res = score(model=model_copy / MODEL, public_key=pinned, data=events_csv, contract=CONTRACT, out=out,
                thresholds={"churn": 0.3, "propensity": 0.6})
    df = pd.read_parquet(out)
    assert list(df.columns) == COLUMNS and len(df) == res["customers"] > 100
    assert df["customer_id"].is_unique
    for head, col in (("churn", "churn_probability"), ("propensity", "propensity_score")):
        assert df[col].between(0, 1).all()
        counts = df[f"{head}_decile"].value_counts().sort_index()
        assert list(counts.index) == list(range(1, 11)) and counts.max() - counts.min() <= 1
        top, second = df.loc[df[f"{head}_decile"] == 1, col], df.loc[df[f"{head}_decile"] == 2, col]
        assert top.min() >= second.max()  # decile 1 = the highest scores
    churn, prop = df["churn_probability"] >= 0.3, df["propensity_score"] >= 0.6
    expect = np.select([churn & prop, churn, prop], list(SEGMENTS[:3]), SEGMENTS[3])
    assert (df["segment"].astype(str).to_numpy() == expect).all()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # customer-level scores: owner only
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_csv_output_and_atomic_replace(model_copy, pinned, events_csv, tmp_path, capsys, monkeypatch):
    out = tmp_path / "scores.csv"
    rc, stdout, _ = _run(capsys, "--public-key", pinned, "--model", model_copy / MODEL, "--data", events_csv, "--contract", CONTRACT,
                         "--out", out, "--thresholds", "churn=0.25")
    assert rc == 0 and "scored" in stdout and "segments" in stdout
    before = out.read_bytes()
    assert pd.read_csv(out).columns.tolist() == COLUMNS

    def crash(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", crash)  # the write fails at the rename: the old file must survive
    rc, _, err = _run(capsys, "--public-key", pinned, "--model", model_copy / MODEL, "--data", events_csv, "--contract", CONTRACT, "--out", out)
    assert rc == 1 and "disk full" in err
    assert out.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_tampered_model_is_refused(model_copy, pinned, events_csv, tmp_path, capsys):
    data = bytearray((model_copy / MODEL).read_bytes())
    data[len(data) // 2] ^= 0x01
    (model_copy / MODEL).write_bytes(bytes(data))
    out = tmp_path / "scores.csv"
    rc, _, err = _run(capsys, "--public-key", pinned, "--model", model_copy / MODEL, "--data", events_csv, "--contract", CONTRACT, "--out", out)
    assert rc == 1 and "REFUSED" in err and MODEL in err and "tampered" in err
    assert not out.exists()


def test_wrong_key_and_missing_signature_are_refused(model_copy, pinned, events_csv, tmp_path, capsys):
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    out = tmp_path / "scores.csv"
    rc, _, err = _run(capsys, "--public-key", tmp_path / "other.pub", "--model", model_copy / MODEL, "--data",
                      events_csv, "--contract", CONTRACT, "--out", out)
    assert rc == 1 and "does not verify against the federation public key" in err and MODEL in err
    (model_copy / (MODEL + ".sig")).unlink()
    rc, _, err = _run(capsys, "--public-key", pinned, "--model", model_copy / MODEL, "--data", events_csv, "--contract", CONTRACT, "--out", out)
    assert rc == 1 and "signature file" in err and "missing" in err
    assert not out.exists()


def test_score_needs_a_pinned_key(model_copy, events_csv, tmp_path, capsys):
    """The genuine model with the genuine federation.pub beside it: still nothing scored without a pin."""
    out = tmp_path / "scores.csv"
    rc, _, err = _run(capsys, "--model", model_copy / MODEL, "--data", events_csv, "--contract", CONTRACT, "--out", out)
    assert rc == 2 and "no pinned federation key" in err and "--public-key" in err and "--key-fingerprint" in err
    assert not out.exists()


def test_attackers_model_sig_and_key_in_one_folder_are_refused(model_copy, pinned, events_csv, tmp_path, capsys):
    """Issue 12 point 5: an attacker replaces the model, signs it with its own key and drops its own public key
    as federation.pub next to it. Every way a partner can run score refuses it."""
    from federation.signing import public_key_fingerprint, sign_file

    evil = tmp_path / "evil"
    evil.mkdir()
    blob = torch.load(model_copy / MODEL, weights_only=True)
    blob["state_dict"] = {k: torch.full_like(v, 5.0) for k, v in blob["state_dict"].items()}  # "everyone churns"
    torch.save(blob, evil / MODEL)
    (evil / "federation.pub").unlink(missing_ok=True)
    generate_keypair(tmp_path / "attacker.key", evil / "federation.pub")
    sign_file(evil / MODEL, tmp_path / "attacker.key")
    out = tmp_path / "scores.csv"
    base = ["--model", evil / MODEL, "--data", events_csv, "--contract", CONTRACT, "--out", out]
    rc, _, err = _run(capsys, *base)  # no pin: refused outright
    assert rc == 2 and "no pinned federation key" in err
    rc, _, err = _run(capsys, *base, "--public-key", pinned)  # the pinned key: signature does not verify
    assert rc == 1 and "does not verify against the federation public key" in err
    rc, _, err = _run(capsys, *base, "--key-fingerprint", public_key_fingerprint(pinned))  # pinned fingerprint
    assert rc == 1 and "REFUSED" in err and "not the pinned" in err
    assert not out.exists()
    # control: the attacker's model verifies against the attacker's key, so the refusals above are the pin's doing
    rc, _, _ = _run(capsys, *base, "--public-key", evil / "federation.pub")
    assert rc == 0 and out.exists()


def test_fingerprint_pin_accepts_the_genuine_key_beside_the_model(model_copy, pinned, events_csv, tmp_path, capsys):
    from federation.signing import public_key_fingerprint

    out = tmp_path / "scores.csv"
    rc, stdout, _ = _run(capsys, "--key-fingerprint", public_key_fingerprint(pinned), "--model", model_copy / MODEL,
                         "--data", events_csv, "--contract", CONTRACT, "--out", out)
    assert rc == 0 and "scored" in stdout and out.exists()


def test_bad_data_file_is_refused_with_one_report(model_copy, pinned, events_csv, tmp_path, capsys):
    df = pd.read_csv(events_csv)
    df["amount"] = df["amount"].astype(object)
    df.loc[3, "amount"] = "12,50 EUR"
    df.loc[7, "timestamp"] = "yesterday"
    bad = tmp_path / "bad.csv"
    df.to_csv(bad, index=False)
    out = tmp_path / "scores.csv"
    rc, _, err = _run(capsys, "--public-key", pinned, "--model", model_copy / MODEL, "--data", bad, "--contract", CONTRACT, "--out", out)
    assert rc == 1 and "does not satisfy the contract" in err
    assert "'amount'" in err and "'timestamp'" in err and "Nothing was scored" in err
    df.drop(columns=["plan"]).to_csv(bad, index=False)
    rc, _, err = _run(capsys, "--public-key", pinned, "--model", model_copy / MODEL, "--data", bad, "--contract", CONTRACT, "--out", out)
    assert rc == 1 and "plan" in err
    assert not out.exists()


def test_contract_that_does_not_match_the_model_is_refused(model_copy, pinned, events_csv, tmp_path, capsys):
    rc, _, err = _run(capsys, "--public-key", pinned, "--model", model_copy / MODEL, "--data", events_csv, "--contract",
                      "contracts/telco_churn.yaml", "--out", tmp_path / "s.csv")
    assert rc == 1 and "REFUSED" in err and "features" in err


def test_cutoff_override_scores_current_customers(model_copy, pinned, events_csv, tmp_path):
    res = score(model=model_copy / MODEL, public_key=pinned, data=events_csv, contract=CONTRACT, out=tmp_path / "s.parquet",
                cutoff="2024-03-31")
    assert res["cutoff"] == "2024-03-31" and res["customers"] > 0  # after the training cutoff: no label horizon


def test_a_cutoff_past_the_log_is_refused_as_nothing_to_score(model_copy, pinned, events_csv, tmp_path):
    """--cutoff today on an old log: the refusal spoke of delta, DP noise and min_customers=1 (an onboarding trial);
    it now says no customer is active in the window before the cutoff, and what to do."""
    from clients.score import ScoringRefused

    with pytest.raises(ScoringRefused, match=r"no customer has an activity event in the \d+ days before it") as exc:
        score(model=model_copy / MODEL, public_key=pinned, data=events_csv, contract=CONTRACT, out=tmp_path / "s.parquet",
              cutoff="2031-01-01")
    assert "delta" not in str(exc.value) and "--cutoff YYYY-MM-DD" in str(exc.value)
    assert not (tmp_path / "s.parquet").exists()


def test_customers_inactive_in_the_window_are_counted_as_skipped(model_copy, pinned, events_csv, tmp_path):
    import pandas as pd

    res = score(model=model_copy / MODEL, public_key=pinned, data=events_csv, contract=CONTRACT, out=tmp_path / "s.parquet",
                cutoff="2024-03-31")
    ids = pd.read_csv(events_csv)["user_id"].astype(str).str.strip().nunique()
    assert res["customers_in_data"] == ids and res["skipped"] == ids - res["customers"]


def test_thresholds_from_config_and_flags(tmp_path):
    assert load_thresholds(None, None) == {"churn": 0.2, "propensity": 0.8}  # conf/scoring.yaml
    assert load_thresholds(None, "churn=0.35") == {"churn": 0.35, "propensity": 0.8}
    cfg = tmp_path / "s.yaml"
    cfg.write_text("thresholds: {churn: 0.1, propensity: 0.9}\n")
    assert load_thresholds(cfg, None) == {"churn": 0.1, "propensity": 0.9}
    with pytest.raises(ConfigError) as exc:
        load_thresholds(None, "churn=2,upsell=0.3")
    assert "churn=2.0" in str(exc.value) and "upsell" in str(exc.value)


def test_deciles_are_balanced_and_ordered():
    p = np.random.default_rng(0).random(1003)
    d = deciles(p)
    assert set(d) == set(range(1, 11)) and np.bincount(d)[1:].max() - np.bincount(d)[1:].min() <= 1
    assert p[d == 1].min() > p[d == 10].max()


def test_data_synth_matches_the_simulation_features(tmp_path, capsys):
    from federation.config import from_dict
    from federation.contract import build_features, load_contract
    from federation.validation import read_validated
    from simulations.partners import synthetic_partner

    out = tmp_path / "p1.parquet"
    assert fedprop(["data", "synth", "--partner", "1", "--partners", "2", "--out", str(out),
                    "--min-customers", "150", "--max-customers", "250"]) == 0
    assert "events of" in capsys.readouterr().out
    frame = pd.read_parquet(out)
    assert list(frame.columns) == ["user_id", "timestamp", "event_type", "amount", "channel", "plan"]
    c = load_contract(CONTRACT)
    fs = build_features(read_validated(c, str(out)).frame, c)
    ref = synthetic_partner(from_dict({"data": {"min_customers": 150, "max_customers": 250}}), 1, 2)
    a, b = np.argsort(fs.customer_ids.astype(str)), np.argsort(ref.customer_ids.astype(str))
    assert (fs.customer_ids.astype(str)[a] == ref.customer_ids.astype(str)[b]).all()
    assert np.array_equal(fs.X[a], ref.X[b]) and fs.feature_names == ref.feature_names
    assert all(np.array_equal(fs.y[k][a], ref.y[k][b]) for k in ref.y)


def _edit_card(model_copy, signed_run, head, **metrics):
    """The coordinator re-issues a card: edited and signed again with the federation key."""
    from federation.signing import sign_file

    card = model_copy / f"model_card_{head}.json"
    c = json.loads(card.read_text())
    c["metrics"].update(metrics)
    card.write_text(json.dumps(c))
    sign_file(card, signed_run.parent / "keys" / "server.key")
    return card


def test_uncalibrated_heads_are_warned_about(model_copy, pinned, signed_run, events_csv, tmp_path, capsys):
    _edit_card(model_copy, signed_run, "churn", ece=0.18, ece_half_width=0.02, ece_meaningful=True, base_rate=0.27)
    _edit_card(model_copy, signed_run, "propensity", ece=0.01, ece_half_width=0.005, ece_meaningful=True)
    rc, out, err = _run(capsys, "--model", model_copy / MODEL, "--public-key", pinned, "--data", events_csv,
                        "--contract", CONTRACT, "--out", tmp_path / "s.csv")
    assert rc == 0
    assert "WARNING: churn: probabilities are not calibrated" in err and "ECE 0.180 +-0.020" in err
    assert "propensity:" not in err  # a calibrated head is not warned about
    (model_copy / "model_card_propensity.json").unlink()
    rc, out, err = _run(capsys, "--model", model_copy / MODEL, "--public-key", pinned, "--data", events_csv,
                        "--contract", CONTRACT, "--out", tmp_path / "s.csv")
    assert "propensity: calibration unknown" in err


def test_a_card_edited_on_disk_is_refused_not_believed(model_copy, pinned, events_csv, tmp_path, capsys):
    """Whoever writes the model's folder edits the card (to hide a calibration warning) without the federation key."""
    card = model_copy / "model_card_churn.json"
    c = json.loads(card.read_text())
    c["metrics"].update({"ece": 0.0, "ece_meaningful": True})
    card.write_text(json.dumps(c))
    rc, out, err = _run(capsys, "--model", model_copy / MODEL, "--public-key", pinned, "--data", events_csv,
                        "--contract", CONTRACT, "--out", tmp_path / "s.csv")
    assert rc == 1 and "REFUSED" in err and "model_card_churn.json" in err
    assert not (tmp_path / "s.csv").exists()


def test_a_model_trained_with_a_data_cutoff_override_scores_with_the_contract_file(model_copy, pinned, events_csv,
                                                                                  tmp_path):
    """`fedprop simulate ... data.cutoff=...` (the onboarding guide's way to try another date) signs a card whose
    contract hash covers that cutoff; scoring with the unedited contract file was refused as 'bounds or vocabularies
    differ'. The window is not an encoding: the card's cutoff/horizon are put in, then the hash must match."""
    from clients.score import ScoringRefused
    from pathlib import Path

    src = yaml.safe_load((Path(__file__).resolve().parents[2] / "conf" / CONTRACT).read_text())
    src["events"]["cutoff"], src["events"]["horizon_days"] = "2023-11-15", 60  # the file's own window differs
    other = tmp_path / "c.yaml"
    other.write_text(yaml.safe_dump(src))
    res = score(model=model_copy / MODEL, public_key=pinned, data=events_csv, contract=other, out=tmp_path / "s.parquet")
    assert res["cutoff"] == "2023-11-15" and res["customers"] > 0  # scored at the contract's own cutoff
    src["static"][0]["vocabulary"] = src["static"][0]["vocabulary"][:-1]  # an encoding that differs: still refused
    other.write_text(yaml.safe_dump(src))
    with pytest.raises(ScoringRefused, match="hash"):
        score(model=model_copy / MODEL, public_key=pinned, data=events_csv, contract=other, out=tmp_path / "t.parquet")
