"""fedprop's per-message timing metrics (aggregate seconds, no data) and the per-process data cache.

No timed assertions: only that the figures are present, non-negative and consistent; speed is benchmarked
by benchmarks/bench_simulation.py.
"""
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients import node as N
from clients.client_app import make_client_app
from clients.privacy_state import _merge_history, _rdp_epsilon
from federation.config import from_dict
from federation.featurespec import feature_names
from federation.models import build_model
from simulations.partners import load_partner

HEADS = "churn,propensity"


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity):
    """Flower's run identity for messages built in-process (tests/conftest.py)."""


def _msg(kind, arrays, rnd):
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd, "heads": HEADS})}),
                   dst_node_id=1, message_type=kind)


def test_replies_carry_phase_timings_and_data_is_prepared_once(tmp_path, monkeypatch):
    cfg = from_dict({**{"partners": 2, "rounds": 3, "seed": 7}, "privacy": {"epsilon": 4.0, "ledger_dir": str(tmp_path)},
                     "model": {"kind": "logreg", "hidden": []}, "data": {"min_customers": 200, "max_customers": 300}})
    calls = []

    def counting_loader(c, node_config):
        calls.append(dict(node_config))
        return load_partner(c, node_config)

    monkeypatch.setattr(N, "_CACHE", {})
    app = make_client_app(config=cfg, loader=counting_loader)
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={})
    arrays = ArrayRecord(build_model(cfg.model, n_features=len(feature_names(cfg.data)), n_outputs=2).state_dict())
    preps = []
    for rnd in (1, 2, 3):
        reply = app(_msg("train", arrays, rnd), ctx)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        m = reply.content["metrics"]
        for phase in ("data-prep", "deserialize", "train", "serialize", "ledger"):
            assert m[f"time.{phase}-s"] >= 0.0 and f"time.{phase}-cpu-s" not in m, phase  # coarse wall time only
        preps.append(m["time.data-prep-s"])
        arrays = reply.content["arrays"]
    ev = app(_msg("evaluate", arrays, 3), ctx).content["metrics"]  # the one planned evaluation (final round)
    for phase in ("data-prep", "deserialize", "evaluate", "serialize"):
        assert ev[f"time.{phase}-s"] >= 0.0, phase
    assert len(calls) == 1  # the partner's data is prepared once per process, not every round or message
    assert preps[0] > max(preps[1:])  # later rounds only look the cached tensors up


def test_history_merge_keeps_the_epsilon():
    h = [(1.7, 0.05, 40)] * 4 + [(1.2, 0.01, 5)]
    assert _merge_history(h) == ((1.7, 0.05, 160), (1.2, 0.01, 5))
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(h)
    assert _rdp_epsilon(h, 1e-5) == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)
