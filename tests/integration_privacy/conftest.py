"""Shared helpers: the ClientApp driven in-process (no Ray) against per-test ledgers and policies."""
from __future__ import annotations

import pytest
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from federation.config import from_dict
from federation.featurespec import feature_names
from federation.models import build_model

HEADS = "churn,propensity"


def write_policy(path, *, max_epsilon=1.0, period=30, accountants=("rdp", "dp_pld"), **more):
    path.write_text(yaml.safe_dump({
        "privacy_unit": "customer", "max_epsilon": max_epsilon, "period": period, "delta": 1e-5,
        "min_noise_multiplier": 0.3, "max_rounds": 10, "allowed_accountants": list(accountants), **more,
    }))
    return path


# Partners of 1600-2400 training customers: q = 128/n is small, which keeps Opacus RDP calibration fast.
def make_cfg(tmp_path, *, epsilon=1.0, rounds=2, partners=2, policy=True, **extra):
    pol = str(write_policy(tmp_path / "policy.yaml")) if policy else ""
    return from_dict({
        "partners": partners, "rounds": rounds, "privacy": {"epsilon": epsilon, "ledger_dir": str(tmp_path / "ledgers"),
                                                           "policy": pol},
        "model": {"kind": "logreg", "hidden": []}, "data": {"min_customers": 2000, "max_customers": 3000}, **extra,
    })


def initial_arrays(cfg):
    model = build_model(cfg.model, n_features=len(feature_names(cfg.data)), n_outputs=2)
    return ArrayRecord(model.state_dict())


def train_msg(arrays, rnd):
    cfg = ConfigRecord({"server-round": rnd, "heads": HEADS})
    return Message(RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=1, message_type="train")


def context(pid, *, run_id, partners=2):
    return Context(run_id=run_id, node_id=pid + 1, node_config={"partition-id": pid, "num-partitions": partners},
                   state=RecordDict(), run_config={})


@pytest.fixture
def task_identity(flower_task_identity):
    """Flower's run identity for messages built in-process (tests/conftest.py)."""
