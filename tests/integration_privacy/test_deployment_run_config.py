"""Adversary: the coordinator, or anyone who can submit a run of the signed app (the run config is not signed, and
every local user of the coordinator's host reaches the Control API). It cannot change the node config, so the run
config must not be able to switch off what the node's guarantee rests on: a deployed node (no typed config of its
own) refuses ``privacy.enabled=false`` (exact counts, training loss and un-noised models, with no ledger entry and
no policy check) and ``privacy.noise=reproducible`` (noise the seed holder can replay) unless its own node config
allows them (``allow-non-private``, ``allow-reproducible-noise``). Before, both were sent on the run config's word."""
from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

from clients.client_app import ERR_BUDGET, make_client_app
from federation.config import to_run_config
from federation.privacy.ledger import Ledger, generate_node_key
from simulations.partners import load_partner

from federation.config import from_dict

from .conftest import initial_arrays, train_msg

pytestmark = pytest.mark.usefixtures("task_identity")


def make_cfg(tmp_path, *, epsilon=1.0, privacy=None):
    return from_dict({"partners": 2, "rounds": 2, "privacy": {"epsilon": epsilon, **(privacy or {})},
                      "model": {"kind": "logreg", "hidden": []}, "data": {"min_customers": 2000, "max_customers": 3000}})


def _deployed_node(tmp_path, cfg, **node_extra):
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    generate_node_key(keys / "acme-ledger.key")
    node_config = {"partition-id": 0, "num-partitions": 2, "partner": "acme",
                   "ledger-path": str(tmp_path / "ledger" / "acme.sqlite"), "node-key": str(keys / "acme-ledger.key"),
                   **node_extra}
    app = make_client_app(loader=load_partner)  # deployment: the run config is the coordinator's
    ctx = Context(run_id=5, node_id=1, node_config=node_config, state=RecordDict(), run_config=to_run_config(cfg))
    return app, ctx


@pytest.mark.parametrize("message", ["train", "evaluate"])
def test_a_run_config_that_switches_dp_off_is_refused_by_a_deployed_node(tmp_path, message):
    cfg = make_cfg(tmp_path, privacy={"enabled": False})
    app, ctx = _deployed_node(tmp_path, cfg)
    msg = train_msg(initial_arrays(cfg), 1)
    if message == "evaluate":
        msg.metadata.message_type = "evaluate"
    reply = app(msg, ctx)
    assert reply.has_error(), f"the node released {sorted(reply.content['metrics'])} without DP"
    assert reply.error.code == ERR_BUDGET and "privacy.enabled=false" in reply.error.reason
    assert "allow-non-private" in reply.error.reason


def test_a_run_config_asking_for_reproducible_noise_is_refused_by_a_deployed_node(tmp_path):
    cfg = make_cfg(tmp_path, epsilon=3.0, privacy={"noise": "reproducible"})
    app, ctx = _deployed_node(tmp_path, cfg)
    reply = app(train_msg(initial_arrays(cfg), 1), ctx)
    assert reply.has_error() and reply.error.code == ERR_BUDGET
    assert "privacy.noise=reproducible" in reply.error.reason and "allow-reproducible-noise" in reply.error.reason
    assert not (tmp_path / "ledger" / "acme.sqlite").exists()  # refused before the ledger or the data


def test_the_node_config_can_allow_reproducible_noise_and_the_ledger_says_so(tmp_path):
    cfg = make_cfg(tmp_path, epsilon=3.0, privacy={"noise": "reproducible"})
    app, ctx = _deployed_node(tmp_path, cfg, **{"allow-reproducible-noise": True})
    with pytest.warns(UserWarning, match="reproducible"):
        reply = app(train_msg(initial_arrays(cfg), 1), ctx)
    assert not reply.has_error(), reply.error.reason
    with Ledger.open(tmp_path / "ledger" / "acme.sqlite", signing_key=None) as led:
        start = next(e for e in led.entries() if e.kind == "run_start")
    assert start.extra["noise"] == "reproducible" and start.extra["reproducible_noise_no_guarantee"]
