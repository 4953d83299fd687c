from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from federation.privacy import PoissonSampledGaussian, calibrate_noise_multiplier, generate_node_key, load_public_key
from federation.privacy.accountants import get_accountant
from federation.privacy.cli import main, register, run, sampling_plan
from federation.privacy.ledger import open_node_ledger, public_key_fingerprint

REPO = Path(__file__).resolve().parents[2]
PRIVACY_SOURCES = sorted((REPO / "federation" / "privacy").glob("*.py"))


def test_plan_prints_epsilon_per_accountant(capsys):
    code = main(["budget", "plan", "--n-customers", "5000", "--batch-size", "100", "--epochs-per-round", "1",
                 "--rounds", "10", "--noise-multiplier", "1.0", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["sampling_rate"], out["steps_per_round"], out["total_steps"]) == (0.02, 50, 500)
    run_event = PoissonSampledGaussian(sampling_rate=0.02, noise_multiplier=1.0, steps=500)
    for name, row in out["accountants"].items():
        assert row["epsilon_run"] == pytest.approx(get_accountant(name).epsilon([run_event], delta=1e-5))
    assert set(out["accountants"]) == {"rdp", "dp_rdp", "dp_pld", "prv", "tight"}


def test_plan_target_epsilon_prints_the_noise(capsys):
    code = main(["budget", "plan", "--sampling-rate", "0.02", "--steps", "50", "--rounds", "10",
                 "--target-epsilon", "1.0", "--accountant", "rdp"])
    assert code == 0
    out = capsys.readouterr().out
    sigma = calibrate_noise_multiplier(target_epsilon=1.0, delta=1e-5, sampling_rate=0.02, steps=500, accountant="rdp")
    assert f"noise multiplier {sigma:.4f}" in out
    assert "500 Poisson-sampled Gaussian steps" in out


def test_plan_reads_a_run_config(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("rounds: 4\ntrain:\n  batch_size: 50\n  local_epochs: 2\nprivacy:\n  epsilon: 3.0\n  delta: 1.0e-6\n")
    assert main(["budget", "plan", "--config", str(cfg), "--n-customers", "1000", "--accountant", "rdp",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["sampling_rate"], out["steps_per_round"], out["rounds"], out["delta"]) == (0.05, 40, 4, 1e-6)
    assert out["target_epsilon"] == 3.0
    assert sampling_plan(n_customers=1000, batch_size=50, epochs_per_round=2) == (0.05, 40)


def test_plan_names_what_is_missing(capsys):
    assert main(["budget", "plan", "--rounds", "3"]) == 2
    err = capsys.readouterr().err
    assert "--sampling-rate, or --batch-size with --n-customers" in err and "--steps or --epochs-per-round" in err


def _pinned_pub(node_key, tmp_path) -> str:
    """The node's public key as compliance holds it: a copy kept apart from the ledger's folder."""
    (tmp_path / "compliance").mkdir(exist_ok=True)
    pub = tmp_path / "compliance" / "partner.pub"
    shutil.copy(str(node_key) + ".pub", pub)
    return str(pub)


def test_verify_and_report_commands(filled_ledger, node_key, tmp_path, capsys):
    assert main(["budget", "verify", str(filled_ledger), "--public-key", str(node_key) + ".pub"]) == 2
    assert "lies in the ledger's own folder" in capsys.readouterr().err
    pub = _pinned_pub(node_key, tmp_path)
    assert main(["budget", "verify", str(filled_ledger), "--public-key", pub]) == 0
    assert "OK" in capsys.readouterr().out
    fp = public_key_fingerprint(load_public_key(pub))
    assert main(["budget", "verify", str(filled_ledger), "--fingerprint", fp]) == 0
    assert f"key {fp} (pinned by fingerprint)" in capsys.readouterr().out
    assert main(["budget", "verify", str(filled_ledger), "--fingerprint", "SHA256:" + "0" * 32]) == 1
    assert "not the pinned key" in capsys.readouterr().err
    policy = tmp_path / "policy.yaml"
    policy.write_text("max_epsilon: 10\nperiod: all-time\ndelta: 1.0e-5\nmin_noise_multiplier: 0.5\n"
                      "allowed_accountants: [rdp, dp_rdp, dp_pld]\n")
    out = tmp_path / "report.html"
    assert main(["budget", "report", str(filled_ledger), "--public-key", pub, "--policy", str(policy),
                 "--format", "html", "--out", str(out)]) == 0
    assert "data:image/png;base64," in out.read_text()
    assert f"wrote {out}" in capsys.readouterr().out
    assert main(["budget", "report", str(filled_ledger), "--public-key", pub, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["dpsgd_rounds"] == 4


def test_verify_exits_non_zero_naming_the_first_bad_entry(filled_ledger, node_key, tmp_path, capsys):
    conn = sqlite3.connect(filled_ledger)
    conn.execute("UPDATE entries SET update_hash = 'x' WHERE seq = 4")
    conn.commit()
    conn.close()
    pub = _pinned_pub(node_key, tmp_path)
    assert main(["budget", "verify", str(filled_ledger), "--public-key", pub]) == 1
    assert "entry seq=4" in capsys.readouterr().err
    assert main(["budget", "report", str(filled_ledger), "--public-key", pub]) == 1


def test_init_and_verify_against_the_federation_ledger(tmp_path, capsys):
    from server.federation_ledger import open_federation_ledger, record_partner_heads

    keys, data = tmp_path / "keys", tmp_path / "data"
    keys.mkdir()
    data.mkdir()
    key = keys / "node.key"
    generate_node_key(key)
    ledger = data / "partner.sqlite"
    assert main(["budget", "init", str(ledger), "--node-key", str(key), "--reason", "onboarding"]) == 0
    assert "created" in capsys.readouterr().out
    with open_node_ledger(ledger, key_path=key) as led:
        led.append(kind="run_start", partner="acme", run_id="r1")
        ident = led.identity()
    fed = tmp_path / "server" / "federation.sqlite"
    with open_federation_ledger(fed) as f:
        record_partner_heads(f, run_id="r1", round=1,
                             heads={"acme": {**{k: ident[k] for k in ("seq", "entry_hash", "ledger_id")},
                                             "signature": ident["head_signature"]}})
    args = ["budget", "verify", str(ledger), "--public-key", str(key) + ".pub", "--against", str(fed),
            "--federation-public-key", str(fed.with_suffix(".key.pub"))]
    assert main(args) == 0 and "1 head(s) the server recorded for acme match" in capsys.readouterr().out
    ledger.unlink()  # the owner deletes the ledger and starts over on purpose
    assert main(["budget", "init", str(ledger), "--node-key", str(key), "--reason", "lost disk"]) == 0
    assert f"RESET of ledger {ident['ledger_id']}" in capsys.readouterr().out
    with open_node_ledger(ledger, key_path=key) as led:
        led.append(kind="run_start", partner="acme", run_id="r2")
    assert main(args) == 0 and f"resets seen: {ident['ledger_id']}" in capsys.readouterr().out


def test_register_mounts_under_another_parser():
    parser = argparse.ArgumentParser(prog="fedprop")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["budget", "plan", "--sampling-rate", "0.1", "--steps", "3", "--rounds", "1",
                              "--noise-multiplier", "2", "--accountant", "rdp"])
    assert args.func is run and run(args) == 0


def test_privacy_core_imports_neither_torch_nor_flwr_nor_opacus():
    banned = ("torch", "flwr", "opacus")
    for path in PRIVACY_SOURCES:
        for line in path.read_text().splitlines():
            words = line.strip().replace(",", " ").split()
            if words[:1] in (["import"], ["from"]):
                assert not any(w.split(".")[0] in banned for w in words[1:2]), f"{path.name}: {line}"
    code = (
        "import sys, federation.privacy, federation.privacy.report, federation.privacy.cli; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'flwr', 'opacus')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_report_audit_file_is_schema_checked(tmp_path):
    import json as _json

    import pytest as _pytest

    from federation.errors import FedpropError
    from federation.privacy.cli import _audit_summary

    good = tmp_path / "a.json"
    good.write_text(_json.dumps({"schema": "fedprop-audit/1", "passed": True, "line": "Empirical audit (PASS; ...)",
                                 "results": []}))
    assert _audit_summary(good)["line"].startswith("Empirical audit")
    bad = tmp_path / "b.json"
    bad.write_text(_json.dumps({"schema": "other", "line": "x"}))
    with _pytest.raises(FedpropError, match="not a fedprop audit file"):
        _audit_summary(bad)


def test_plan_resolves_auto_rounds_from_the_target_epsilon(tmp_path, capsys):
    from federation.config import auto_schedule

    cfg = tmp_path / "run.yaml"
    cfg.write_text("rounds: 0\ntrain:\n  batch_size: 50\n  local_epochs: 2\nprivacy:\n  epsilon: 3.0\n")
    assert main(["budget", "plan", "--config", str(cfg), "--n-customers", "1000", "--accountant", "rdp",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rounds"] == auto_schedule(3.0)[1] == 20
    assert main(["budget", "plan", "--config", str(cfg), "--n-customers", "1000", "--accountant", "rdp",
                 "--target-epsilon", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rounds"] == auto_schedule(1.0)[1] == 10


def test_plan_resolves_rounds_as_the_run_would(tmp_path, capsys):
    # Absent rounds / epsilon take the schema defaults (0 = auto, epsilon 3), DP off takes the first row, and a
    # round count the run would refuse is refused here too.
    from federation.config import FedpropConfig, auto_schedule, from_dict

    def plan(text: str, *extra: str):
        cfg = tmp_path / "run.yaml"
        cfg.write_text(text)
        return main(["budget", "plan", "--config", str(cfg), "--n-customers", "1000", "--batch-size", "50",
                     "--epochs-per-round", "1", "--accountant", "rdp", "--json", *extra])

    assert plan("train:\n  batch_size: 50\n", "--noise-multiplier", "1") == 0
    assert json.loads(capsys.readouterr().out)["rounds"] == from_dict({}).rounds == auto_schedule(
        FedpropConfig().privacy.epsilon)[1]
    assert plan("privacy:\n  enabled: false\n  epsilon: 8\n", "--noise-multiplier", "1") == 0
    assert json.loads(capsys.readouterr().out)["rounds"] == auto_schedule(None)[1]
    assert plan("rounds: 0.5\n", "--noise-multiplier", "1") == 2
    assert "rounds=0.5 must be an integer" in capsys.readouterr().err
