"""Everything a node sends is on the release inventory (federation/inventory.py), captured from real runs; the
noise cannot be replayed from the config; the split is stable under adding a customer; no raw count leaves."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from clients import client_app as CA
from clients import node as N
from clients.capture import capture_mod
from federation.config import from_dict
from federation.featurespec import feature_names
from federation.inventory import INVENTORY, fields_of, lookup, render_markdown, undeclared
from federation.models import build_model
from simulations.partners import load_partner


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity):
    """Flower's run identity for messages built in-process (tests/conftest.py)."""


def _captured(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return rows, [(r["message"], f) for r in rows for f in r["fields"]]


def test_default_simulation_sends_only_inventoried_fields(tmp_path, monkeypatch):
    """A real federation on Flower's simulation engine (Ray), default model and privacy settings, every reply
    of every node captured by a client mod."""
    from simulations.simulate import run_simulation

    cap = tmp_path / "replies.jsonl"
    real = CA.make_client_app
    monkeypatch.setattr(CA, "make_client_app", lambda **kw: real(**kw, mods=[capture_mod(str(cap))]))
    cfg = from_dict({"partners": 3, "rounds": 2, "privacy": {"ledger_dir": str(tmp_path / "led")},
                     "data": {"min_customers": 400, "max_customers": 900}, "baselines": {"enabled": False},
                     "release": {"key_dir": str(tmp_path / "keys")}})
    run_simulation(cfg, tmp_path / "run")
    rows, captured = _captured(cap)
    kinds = sorted({r["message"] for r in rows})
    assert kinds == ["evaluate", "train"] and len(rows) == 3 * 2 + 3  # 2 train rounds, 1 evaluated round
    assert undeclared(captured) == []
    assert not any(f.endswith(("train-loss", "sum_score", "sum_logloss", "-cpu-s")) for _, f in captured)
    # every DP release that left was recorded in the partner's ledger
    from federation.privacy.ledger import Ledger

    for pid in range(3):
        with Ledger.open(tmp_path / "led" / "synthetic" / f"partner-{pid}.sqlite", signing_key=None) as led:
            kinds = [e.kind for e in led.entries()]
        assert kinds.count("dpsgd_round") == 2 and kinds.count("evaluation_release") == 2


def test_secure_aggregation_round_sends_only_inventoried_fields(tmp_path):
    """A real secure-aggregation federation (the server loop of server/secure_fedavg.py and the real ClientApp),
    in process: every reply the server received."""
    from server.outputs import RunOutputs
    from server.server_app import run_federation
    from tests.secagg_integration.conftest import InProcessGrid, tiny_config

    cfg = tiny_config(tmp_path)
    app = CA.make_client_app(config=cfg, loader=load_partner)
    grid = InProcessGrid(app, cfg.partners)
    out = RunOutputs(tmp_path / "run")
    out.write_config(cfg)
    run_federation(grid, cfg, heads=("churn", "propensity"), out=out, run_id="inv")
    captured = []
    for reply in grid.received:
        mt = reply.metadata.message_type
        fields = ["error:reason"] if reply.has_error() else fields_of(mt, reply.content)
        captured += [(mt, f) for f in fields]
    assert {mt for mt, _ in captured} >= {"query.secagg", "evaluate"}
    assert any(f == "configs:secagg/masked" for _, f in captured)
    assert undeclared(captured) == []


def test_an_undeclared_field_fails_the_inventory_check(tmp_path):
    """The check has teeth: a mod that adds one field to the train reply is caught."""
    def leaky(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        if not reply.has_error():
            reply.content["metrics"]["n-train-exact"] = 1234
        return reply

    cfg = from_dict({"partners": 2, "rounds": 1, "privacy": {"ledger_dir": str(tmp_path / "led")},
                     "model": {"kind": "logreg", "hidden": []}, "data": {"min_customers": 300, "max_customers": 500}})
    cap = tmp_path / "c.jsonl"
    app = CA.make_client_app(config=cfg, loader=load_partner, split_key=b"s" * 32, mods=[capture_mod(str(cap)), leaky])
    ctx = Context(run_id=3, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={})
    model = build_model(cfg.model, n_features=len(feature_names(cfg.data)), n_outputs=2)
    msg = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "config": ConfigRecord({"server-round": 1, "heads": "churn,propensity"})}),
                  dst_node_id=1, message_type="train")
    assert not app(msg, ctx).has_error()
    _, captured = _captured(cap)
    assert undeclared(captured) == ["train metrics:metrics/n-train-exact"]
    assert undeclared([("train", "metrics:metrics/train-loss")]) == ["train metrics:metrics/train-loss"]  # non-private only
    assert lookup("train", "arrays:arrays/0.weight").category == "dp_release"


def test_inventory_doc_is_generated_from_the_table():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "release-inventory.md").read_text()
    assert render_markdown() in doc
    assert all(f.category in ("public", "dp_release", "non_private") for f in INVENTORY)
    assert all(f.ledger for f in INVENTORY if f.category == "dp_release")


# ----------------------------------------------------------------------------------- unpredictable noise
def _train_once(cfg, tmp_path, tag):
    cfg.privacy.ledger_dir = str(tmp_path / f"led-{tag}")
    app = CA.make_client_app(config=cfg, loader=load_partner, split_key=b"k" * 32)
    ctx = Context(run_id=9, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={})
    torch.manual_seed(0)
    model = build_model(cfg.model, n_features=len(feature_names(cfg.data)), n_outputs=2)
    msg = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "config": ConfigRecord({"server-round": 1, "heads": "churn,propensity"})}),
                  dst_node_id=1, message_type="train")
    reply = app(msg, ctx)
    assert not reply.has_error(), reply.error.reason
    return torch.cat([v.flatten() for v in reply.content["arrays"].to_torch_state_dict().values()])


@pytest.mark.parametrize("engine", ["fast", "opacus"])
def test_same_config_and_seed_give_different_updates_and_the_seed_replay_fails(tmp_path, engine):
    base = {"partners": 2, "rounds": 2, "seed": 42, "train": {"engine": engine, "local_epochs": 0.5},
            "data": {"min_customers": 300, "max_customers": 500}}
    N._CACHE.clear()
    a = _train_once(from_dict(base), tmp_path, f"a-{engine}")
    b = _train_once(from_dict(base), tmp_path, f"b-{engine}")
    assert not torch.equal(a, b)  # secure (default) noise: two runs of one config differ
    rep = {**base, "privacy": {"noise": "reproducible"}}
    with pytest.warns(UserWarning, match="NO differential-privacy guarantee"):
        r1 = _train_once(from_dict(rep), tmp_path, f"r1-{engine}")
        r2 = _train_once(from_dict(rep), tmp_path, f"r2-{engine}")
    assert torch.equal(r1, r2)  # only the loudly named option replays
    # An adversary who knows the config replays every config-derived generator: none matches a secure run.
    assert not torch.equal(r1, a) and not torch.equal(r1, b)


def test_chacha_noise_is_not_a_function_of_anything_in_the_config():
    from clients.noise import ChaChaNoise, make_noise_source

    x = make_noise_source("secure", seed_material=(42, 0, 1, 1))
    y = make_noise_source("secure", seed_material=(42, 0, 1, 1))
    assert isinstance(x, ChaChaNoise)
    assert not np.array_equal(x.uniform(64), y.uniform(64))
    z = ChaChaNoise().standard_normal(200_000)
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.01
    g = ChaChaNoise().gaussian((100_000,), 3.0)
    assert abs(float(g.std()) - 3.0) < 0.05


# -------------------------------------------------------------------------------- split and public sizes
def test_split_is_stable_when_one_customer_is_added():
    key = b"\x01" * 32
    ids = np.array([f"c{i:05d}" for i in range(1000)])
    before = N.test_membership(ids, key=key, test_fraction=0.2)
    after = N.test_membership(np.append(ids, "new-customer"), key=key, test_fraction=0.2)
    assert np.array_equal(before, after[:-1])  # nobody else moved between train and test
    assert 0.15 < before.mean() < 0.25
    other = N.test_membership(ids, key=b"\x02" * 32, test_fraction=0.2)
    assert not np.array_equal(before, other)  # the split depends on the node's secret key


@pytest.mark.parametrize("n,bucket", [(1, 1), (99, 99), (480, 480), (4823, 4800), (123456, 120000)])
def test_public_size_bucket(n, bucket):
    assert N.public_size(n) == bucket


def test_separate_heads_split_epsilon_and_delta():
    cfg = from_dict({"task": "both", "model": {"heads": "separate"}, "privacy": {"epsilon": 3.0, "delta": 1e-5}})
    assert N.run_share(cfg) == (1.5, 5e-6)
    assert N.run_share(from_dict({})) == (3.0, 1e-5)


def test_a_data_error_leaves_the_node_as_a_code_without_values(tmp_path):
    """A loader failure quoting a customer id: the reply carries a public reason, the id stays in the local log."""
    from federation.errors import DataValidationError

    def bad_loader(cfg, node_config):
        raise DataValidationError(["column customer_id: duplicate id '7590-VHVEG' in rows 3, 9"], source="x.csv")

    cfg = from_dict({"partners": 2, "rounds": 1, "privacy": {"ledger_dir": str(tmp_path / "led")}})
    app = CA.make_client_app(config=cfg, loader=bad_loader, split_key=b"s" * 32)
    ctx = Context(run_id=3, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={})
    model = build_model(cfg.model, n_features=len(feature_names(cfg.data)), n_outputs=2)
    msg = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "config": ConfigRecord({"server-round": 1, "heads": "churn,propensity"})}),
                  dst_node_id=1, message_type="train")
    reply = app(msg, ctx)
    assert reply.has_error() and reply.error.code == CA.ERR_NODE
    assert "7590-VHVEG" not in reply.error.reason and reply.error.reason.startswith("data_validation_failed")


def test_client_app_module_imports_nothing_heavy():
    """Flower starts a ClientApp process per message: importing the app must not pull torch, pandas, Opacus or
    dp-accounting (the secure-aggregation stages need none of them)."""
    import subprocess
    import sys

    code = ("import sys, clients.client_app as a; assert a.app is not None; "
            "print(sorted(m for m in ('torch', 'pandas', 'opacus', 'dp_accounting', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
