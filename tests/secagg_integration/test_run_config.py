"""`flwr run --run-config` only overrides keys that pyproject declares: every fedprop key must be there."""
from __future__ import annotations

from pathlib import Path

from flwr.common.config import flatten_dict, get_fused_config_from_dir, get_project_config, parse_config_args

from federation.config import FedpropConfig, from_dict, from_run_config, to_dict, to_run_config, validate
from server.deploy import format_node_config

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_declares_every_run_config_key_with_its_default(monkeypatch):
    # tests/conftest.py moves the ledger/key default dirs to temp dirs; compare against the shipped defaults
    monkeypatch.delenv("FEDPROP_LEDGER_DIR", raising=False)
    monkeypatch.delenv("FEDPROP_KEY_DIR", raising=False)
    declared = flatten_dict(get_project_config(ROOT)["tool"]["flwr"]["app"]["config"])
    expected = to_run_config(FedpropConfig())
    assert {k: declared.get(k) for k in expected} == expected
    # 0 = auto keys (rounds, privacy.max_grad_norm) are declared as 0 and resolve exactly as validate() does
    assert to_dict(from_run_config(declared)) == to_dict(validate(FedpropConfig()))


def test_a_full_config_survives_flwr_run_config_parsing():
    cfg = from_dict({"partners": 3, "rounds": 2, "model": {"kind": "logreg", "hidden": []},
                     "secagg": {"enabled": True, "degree": 2}, "central_dp": {"enabled": True, "delta": 1e-6}})
    fused = get_fused_config_from_dir(ROOT, parse_config_args([format_node_config(to_run_config(cfg))]))
    assert to_dict(from_run_config(fused)) == to_dict(cfg)
