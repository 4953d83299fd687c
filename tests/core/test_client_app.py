"""The ClientApp driven in-process (no Ray): cumulative epsilon in context.state, refusal, evaluation."""
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.client_app import ERR_BUDGET, make_client_app
from federation.config import from_dict
from federation.featurespec import feature_names
from federation.models import build_model
from simulations.partners import load_partner

CFG = from_dict({"partners": 2, "rounds": 2, "privacy": {"epsilon": 2.0}, "train": {"batch_size": 64},
                 "data": {"min_customers": 300, "max_customers": 600}})


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity):
    """Flower's run identity for messages built in-process (tests/conftest.py)."""


def _msg(kind, arrays, rnd):
    cfg = ConfigRecord({"server-round": rnd, "heads": "churn,propensity"})
    return Message(RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=1, message_type=kind)


def test_train_rounds_accumulate_epsilon_then_refuse():
    app = make_client_app(config=CFG, loader=load_partner)
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(), run_config={})
    model = build_model(CFG.model, n_features=len(feature_names(CFG.data)), n_outputs=2)
    arrays = ArrayRecord(model.state_dict())
    eps = []
    for rnd in (1, 2):
        reply = app(_msg("train", arrays, rnd), ctx)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        m = reply.content["metrics"]
        eps.append(m["epsilon"])
        assert m["num-examples"] >= 100 and m["num-examples"] % 10 == 0  # public size bucket, not batches
        assert "train-loss" not in m  # the exact training loss never leaves the node
        arrays = reply.content["arrays"]
    assert 0 < eps[0] < eps[1] <= 2.0
    reply = app(_msg("train", arrays, 3), ctx)
    assert reply.has_error() and reply.error.code == ERR_BUDGET
    assert "refusing to train" in reply.error.reason and "target 2.0000" in reply.error.reason

    ev = app(_msg("evaluate", arrays, 2), ctx)
    assert not ev.has_error(), ev.error.reason if ev.has_error() else ""
    m = ev.content["metrics"]
    # a DP release: noisy integer counts in the public bins, nothing else about the test customers
    assert m["churn.hist.format_version"] == 2 and len(m["churn.hist.pos"]) == CFG.evaluation.bins
    assert "churn.auc" not in m and "churn.hist.sum_score" not in m and m["num-examples"] == 1
    assert m["churn.hist.sigma"] > 0
    again = app(_msg("evaluate", arrays, 2), ctx)  # only the planned (accounted) releases are made
    assert again.has_error() and again.error.code == ERR_BUDGET and "planned" in again.error.reason


def test_state_is_per_node():
    app = make_client_app(config=CFG, loader=load_partner)
    model = build_model(CFG.model, n_features=len(feature_names(CFG.data)), n_outputs=2)
    # run 2: run 1's ledger entries (previous test, same session ledgers) would be restored, and its rounds refused
    a = Context(run_id=2, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={})
    b = Context(run_id=2, node_id=2, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(), run_config={})
    ra = app(_msg("train", ArrayRecord(model.state_dict()), 1), a)
    app(_msg("train", ArrayRecord(model.state_dict()), 2), a)
    rb = app(_msg("train", ArrayRecord(model.state_dict()), 1), b)
    # each node keeps its own privacy state: a has spent two rounds, b one (the sampling rates may coincide: they
    # come from public size buckets of a split drawn with a fresh secret key, so they are not compared)
    assert len(b.state) == 1 and len(a.state) == 1
    ea, eb = (next(iter(c.state.config_records.values()))["json"] for c in (a, b))
    assert __import__("json").loads(ea) != __import__("json").loads(eb)
    assert rb.content["metrics"]["epsilon"] < app(_msg("train", ArrayRecord(model.state_dict()), 2), b).content["metrics"]["epsilon"]
    assert ra.content["metrics"]["epsilon"] > 0
