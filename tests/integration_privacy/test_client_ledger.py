"""The partner ledger wired into the ClientApp, driven in-process: the issue's scenario without Ray.

Policy: at most epsilon 1.0 per (rolling 30-day) period. A run calibrated to privacy.epsilon=1 fits; a second
run in the same period is refused before it trains; a round that would exceed the remaining budget (spend
recorded by another federation mid-run) stops that partner while the other continues; a failed ledger
write withholds the update.
"""
from __future__ import annotations

import pytest

import clients.node as N
from clients import ledger_hooks as LH
from clients.client_app import ERR_BUDGET, ERR_LEDGER, make_client_app
from federation.config import from_dict
from federation.errors import ConfigError
from federation.privacy.events import PoissonSampledGaussian
from federation.privacy.ledger import Ledger, verify
from federation.privacy.policy import load_policy
from federation.privacy.report import build_report
from simulations.partners import load_partner

from .conftest import context, initial_arrays, make_cfg, train_msg

pytestmark = pytest.mark.usefixtures("task_identity")


def _releases(entries):
    """Entry kinds without the reservation bookkeeping (each round is reserved, then committed or released)."""
    return [e for e in entries if e.kind not in ("reservation", "reservation_release")]


def _entries(cfg, pid):
    node = LH.resolve_node_ledger(cfg, {"partition-id": pid})
    verify(node.ledger_path, node.public_key_path)  # every test leaves verifiable ledgers
    with Ledger.open(node.ledger_path, signing_key=None) as led:
        return led.entries()


def test_run_fits_then_second_run_in_period_refused_before_training(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path)
    app = make_client_app(config=cfg, loader=load_partner)
    ctxs = [context(pid, run_id=101) for pid in (0, 1)]
    arrays = initial_arrays(cfg)
    for rnd in (1, 2):
        for ctx in ctxs:
            reply = app(train_msg(arrays, rnd), ctx)
            assert not reply.has_error(), reply.error.reason
            # the hash in the reply is the hash of the arrays actually released, and the ledger holds it
            sent = LH.update_hash(reply.content["arrays"].to_torch_state_dict())
            assert reply.content["ledger"]["update-hash"] == sent
    for pid in (0, 1):
        entries = _entries(cfg, pid)
        assert [e.kind for e in entries] == ["run_start", "reservation", "dpsgd_round", "reservation", "dpsgd_round"]
        rounds = [e for e in entries if e.kind == "dpsgd_round"]
        assert [e.round for e in rounds] == [1, 2] and all(e.run_id == "101" for e in entries)
        assert all(e.privacy_unit == "customer" and e.clipping_norm == 1.0 and e.delta == 1e-5 for e in rounds)
        assert all(len(e.update_hash) == 64 and len(e.config_hash) == 64 for e in rounds)
        assert all(e.reported_accountant == "rdp" and e.reported_epsilon > 0 for e in rounds)
        report = build_report(entries, policy=load_policy(cfg.privacy.policy), partner=f"partner-{pid}")
        # training alone is calibrated to (1 - evaluation.epsilon_share) x target; the evaluation is still reserved
        assert 0.85 < report["current_period_epsilon"]["rdp"] <= 0.9 + 0.01
        assert report["compliance"]["compliant"]

    # run 2, same period, same ledgers: refused at the first train message, before any training
    def no_training(*a, **k):
        raise AssertionError("a refused run must not train")

    monkeypatch.setattr(N, "train_round", no_training)
    ctxs2 = [context(pid, run_id=202) for pid in (0, 1)]
    for rnd in (1, 2):
        for pid, ctx in enumerate(ctxs2):
            reply = app(train_msg(arrays, rnd), ctx)
            assert reply.has_error() and reply.error.code == ERR_BUDGET
            reason = reply.error.reason
            assert reason.startswith(f"partner {pid}: run refused before training: run refused: it would spend")
            assert "against a limit of 1 at delta=1e-05" in reason and "already spent 0.8" in reason
    for pid in (0, 1):
        entries = _entries(cfg, pid)
        assert [e.kind for e in entries][5:] == ["refusal"]  # one refusal for the run, nothing released
        assert entries[5].run_id == "202" and entries[5].extra["scope"] == "run"
        report = build_report(entries, policy=load_policy(cfg.privacy.policy), partner=f"partner-{pid}")
        assert report["counts"]["refusals"] == 1 and report["compliance"]["compliant"]
        assert [r["run_id"] for r in report["runs"]] == ["101", "202"] and report["runs"][1]["releases"] == 0


def test_round_over_remaining_budget_stops_that_partner_others_continue(tmp_path):
    cfg = make_cfg(tmp_path, rounds=3)
    app = make_client_app(config=cfg, loader=load_partner)
    ctxs = [context(pid, run_id=303) for pid in (0, 1)]
    arrays = initial_arrays(cfg)
    for ctx in ctxs:
        assert not app(train_msg(arrays, 1), ctx).has_error()
    # Partner 1 joins another federation concurrently; that run records two rounds' worth of the same
    # mechanism in the same period: 1 + 2 rounds still fit the budget (the run was calibrated for 3), a 4th not.
    node = LH.resolve_node_ledger(cfg, {"partition-id": 1})
    with LH.open_ledger(node) as led:
        plan = led.entries()[0].extra
        led.append(kind="dpsgd_round", partner="partner-1", run_id="other-federation", round=1, delta=1e-5,
                   mechanism=PoissonSampledGaussian(sampling_rate=plan["sampling_rate"],
                                                    noise_multiplier=plan["noise_multiplier"],
                                                    steps=2 * plan["steps_per_round"]),
                   clipping_norm=1.0, update_hash="0" * 64)
    r0, r1 = (app(train_msg(arrays, 2), ctx) for ctx in ctxs)
    assert not r0.has_error()
    assert r1.has_error() and r1.error.code == ERR_BUDGET
    assert r1.error.reason.startswith("partner 1: round 2 refused: it would spend epsilon")
    assert "against a limit of 1 at delta=1e-05; remaining budget" in r1.error.reason
    r0 = app(train_msg(arrays, 3), ctxs[0])
    assert not r0.has_error()  # the other partner finishes its run
    kinds = [(e.kind, e.round) for e in _releases(_entries(cfg, 1))]
    assert kinds == [("run_start", None), ("dpsgd_round", 1), ("dpsgd_round", 1), ("refusal", 2)]
    assert [(e.kind, e.round) for e in _releases(_entries(cfg, 0))] == [
        ("run_start", None), ("dpsgd_round", 1), ("dpsgd_round", 2), ("dpsgd_round", 3)]
    report = build_report(_entries(cfg, 1), policy=load_policy(cfg.privacy.policy), partner="partner-1")
    assert report["compliance"]["compliant"] and report["compliance"]["peak_period_epsilon"] <= 1.0


def test_failed_ledger_write_withholds_the_update(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, policy=False)
    app = make_client_app(config=cfg, loader=load_partner)
    from federation.privacy.ledger import Reservation

    def failing(self, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(Reservation, "commit", failing)
    reply = app(train_msg(initial_arrays(cfg), 1), context(0, run_id=404))
    assert reply.has_error() and reply.error.code == ERR_LEDGER
    assert "update withheld" in reply.error.reason and "disk full" not in reply.error.reason  # details stay local
    assert not reply.has_content()  # no arrays leave the node
    # the round's reservation was released: nothing is counted for an update that never left
    assert [e.kind for e in _entries(cfg, 0)] == ["run_start", "reservation", "reservation_release"]


def test_no_policy_file_means_the_default_policy_is_enforced(tmp_path):
    """No policy file: fedprop's default policy (monthly and lifetime caps) applies; runs at epsilon 3 fit until
    the cap, then the next run is refused before training. "Record only" is never a default."""
    from federation.privacy.policy import default_policy

    cfg = make_cfg(tmp_path, policy=False, epsilon=3.0, rounds=1)
    app = make_client_app(config=cfg, loader=load_partner)
    cap = default_policy().max_epsilon
    outcomes = []
    for run in range(1, 11):  # runs at epsilon 3 compose sub-additively (3 runs: ~4.1 by the tight accountants)
        outcomes.append(app(train_msg(initial_arrays(cfg), 1), context(0, run_id=run)).has_error())
        if outcomes[-1]:
            break
    assert outcomes[0] is False and outcomes[-1] is True  # refused once the default policy's monthly cap is near
    kinds = [e.kind for e in _entries(cfg, 0)]
    assert "refusal" in kinds and kinds[:3] == ["run_start", "reservation", "dpsgd_round"]
    from federation.privacy.accountants import get_accountant

    from federation.privacy.ledger import select_events

    spent = select_events(_entries(cfg, 0))  # what counts: releases and still-open reservations
    assert get_accountant("tight").epsilon(spent, delta=1e-5) <= cap + 1e-6  # the default policy's accountant


def test_node_config_keys_win_and_explicit_key_must_exist(tmp_path):
    cfg = make_cfg(tmp_path, policy=False)
    nc = {"partition-id": 3, "ledger-path": str(tmp_path / "node" / "l.sqlite"),
          "node-key": str(tmp_path / "node" / "missing.key"), "budget-policy": str(tmp_path / "p.yaml")}
    node = LH.resolve_node_ledger(cfg, nc)
    assert node.partner == "partner-3" and node.ledger_path == tmp_path / "node" / "l.sqlite"
    assert node.policy_path == tmp_path / "p.yaml"
    with pytest.raises(ConfigError, match="node-key"):
        LH.open_ledger(node)
    default = LH.resolve_node_ledger(cfg, {"partition-id": 0})
    LH.open_ledger(default).close()
    assert default.key_path.stat().st_mode & 0o777 == 0o600 and default.public_key_path.exists()


def test_config_keys_validated():
    with pytest.raises(ConfigError) as err:
        from_dict({"privacy": {"ledger_dir": " ", "policy": "policy.json"}})
    assert "privacy.ledger_dir" in str(err.value) and "privacy.policy" in str(err.value)


def test_dp_evaluation_release_is_noisy_and_recorded_before_it_leaves(tmp_path, monkeypatch):
    """Evaluation is a DP release inside the run's budget: discrete Gaussian counts, one ledger entry per head."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from clients.client_app import make_client_app
    from federation.config import from_dict
    from federation.featurespec import feature_names
    from federation.models import build_model
    from federation.privacy.ledger import Ledger
    from simulations.partners import load_partner

    cfg = from_dict({"partners": 2, "rounds": 1, "privacy": {"epsilon": 2.0, "ledger_dir": str(tmp_path / "led")},
                     "evaluation": {"bins": 16}, "data": {"min_customers": 300, "max_customers": 600}})
    app = make_client_app(config=cfg, loader=load_partner)
    ctx = Context(run_id=7, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={})
    model = build_model(cfg.model, n_features=len(feature_names(cfg.data)), n_outputs=2)

    def msg(kind, arrays):
        return Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, "heads": "churn,propensity"})}),
                       dst_node_id=1, message_type=kind)

    early = app(msg("evaluate", ArrayRecord(model.state_dict())), ctx)  # no budget planned yet: refused
    assert early.has_error()
    trained = app(msg("train", ArrayRecord(model.state_dict())), ctx)
    assert not trained.has_error(), trained.error.reason
    reply = app(msg("evaluate", trained.content["arrays"]), ctx)
    assert not reply.has_error(), reply.error.reason
    m = reply.content["metrics"]
    assert len(m["churn.hist.pos"]) == 16 and m["churn.hist.format_version"] == 2
    ledger = Ledger.open(tmp_path / "led" / "synthetic" / "partner-0.sqlite", signing_key=None)
    releases = [e for e in ledger.entries() if e.kind == "evaluation_release"]
    assert len(releases) == 2 and all(e.event.kind == "discrete_gaussian" for e in releases)
    assert all(e.event.noise_multiplier == pytest.approx(m["churn.hist.sigma"]) for e in releases)
    from federation.privacy.accountants import get_accountant

    from federation.privacy.ledger import select_events

    events = select_events(ledger.entries())
    assert get_accountant("tight").epsilon(events, delta=1e-5) <= 2.0  # training + evaluation within the target


def test_restarted_node_restores_its_run_state_and_never_spends_twice_for_a_round(tmp_path):
    """kill -9 of a SuperNode loses context.state: the privacy state comes back from the ledger, the epsilon
    continues where it was, and a round already recorded is refused instead of spent again."""
    cfg = make_cfg(tmp_path, policy=False, epsilon=3.0, rounds=3)
    app = make_client_app(config=cfg, loader=load_partner)
    ctx = context(0, run_id=55)
    r1 = app(train_msg(initial_arrays(cfg), 1), ctx)
    assert not r1.has_error(), r1.error.reason
    eps1 = r1.content["metrics"]["epsilon"]
    fresh = context(0, run_id=55)  # the restarted node: empty context.state, same ledger
    again = app(train_msg(initial_arrays(cfg), 1), fresh)
    assert again.has_error() and "already released" in again.error.reason
    r2 = app(train_msg(initial_arrays(cfg), 2), fresh)
    assert not r2.has_error(), r2.error.reason
    assert r2.content["metrics"]["epsilon"] > eps1  # cumulative over both processes, not reset
    kinds = [(e.kind, e.round) for e in _entries(cfg, 0)]
    assert kinds.count(("dpsgd_round", 1)) == 1 and kinds.count(("run_start", None)) == 1


def _witnessed_federation(tmp_path, secure: bool):
    """A 2-round federation (3 partners under secure aggregation) whose server keeps a witness: (cfg, partner 0's
    ledger, the in-process grid, the run outputs)."""
    from server.outputs import RunOutputs
    from tests.secagg_integration.conftest import InProcessGrid

    extra = {"partners": 3, "secagg": {"enabled": True}} if secure else {}
    cfg = make_cfg(tmp_path, policy=False, epsilon=3.0, rounds=2, release={"key_dir": str(tmp_path / "srvkeys")}, **extra)
    grid = InProcessGrid(make_client_app(config=cfg, loader=load_partner), cfg.partners)
    out = RunOutputs(tmp_path / "run")
    out.write_config(cfg)
    return cfg, LH.resolve_node_ledger(cfg, {"partition-id": 0}), grid, out


@pytest.mark.parametrize("framer", [False, True], ids=["honest", "a-partner-claims-its-name"])
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure-aggregation"])
def test_server_witness_catches_a_rolled_back_partner_ledger(tmp_path, secure, framer):
    """In-process federation of the real ClientApp and ServerApp: the server records each partner's ledger head per
    round; restoring an older copy of a partner's ledger afterwards fails verify --against. With secure
    aggregation the head travels in the clear beside the masked input (before: secure rounds carried no head, so a
    rollback there went unseen). ``framer``: every other partner sends its head under partner 0's name with a seq
    beyond partner 0's ledger (before heads were signed, that made partner 0's intact ledger fail verification,
    and the last claim overwrote partner 0's genuine head); now partner 0's intact ledger verifies, the claims are
    listed as ignored, and partner 0's rollback is still caught."""
    import shutil

    from federation.privacy.ledger import LedgerVerificationError, verify_against
    from server.server_app import WITNESS_FILE, run_federation

    cfg, node, grid, out = _witnessed_federation(tmp_path, secure)

    snapshots = []
    real = grid.send_and_receive

    def frame(reply):
        from flwr.app import ConfigRecord

        for key in ("ledger", "witness"):
            if key in reply.content.config_records:
                rec = dict(reply.content[key])
                if rec.get("ledger-partner") not in (None, node.partner):
                    rec.update({"ledger-partner": node.partner, "entry-seq": int(rec["entry-seq"]) + 50})
                    reply.content[key] = ConfigRecord(rec)
        return reply

    def snap(messages, **kw):  # copy partner 0's ledger after each exchange (the owner's backup)
        replies = real(messages, **kw)
        if framer:
            replies = [frame(r) if not r.has_error() else r for r in replies]
        if node.ledger_path.exists():
            snapshots.append(tmp_path / f"snap{len(snapshots)}.sqlite")
            shutil.copy(node.ledger_path, snapshots[-1])
        return replies

    grid.send_and_receive = snap
    run_federation(grid, cfg, heads=("churn", "propensity"), out=out, run_id="wit")
    if secure:
        assert all(r.get("secagg", {}).get("survivors") == 3 for r in out.rounds["churn+propensity"])
    fed = out.dir / WITNESS_FILE
    fed_pub = tmp_path / "srvkeys" / "federation-ledger.key.pub"
    ok = verify_against(node.ledger_path, fed, public_key=node.public_key_path, federation_public_key=fed_pub,
                        partner=node.partner)
    assert ok.heads_checked == 2  # one signed head per round
    assert len(ok.heads_ignored) == (2 * (cfg.partners - 1) if framer else 0), ok.heads_ignored
    shutil.copy(snapshots[0], node.ledger_path)  # roll back to the copy taken after round 1
    with pytest.raises(LedgerVerificationError):
        verify_against(node.ledger_path, fed, public_key=node.public_key_path, federation_public_key=fed_pub,
                       partner=node.partner)


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure-aggregation"])
def test_server_witness_catches_erased_evaluation_releases(tmp_path, secure):
    """Adversary: whoever can write the ledger's folder (not the key folder), e.g. the ledger's owner, who wants its
    budget back. It copies the ledger after the last train reply and restores that copy after the evaluation: the
    copy is intact (chain, signatures and signed head are the node's own), and it lacks the evaluation_release
    entries, i.e. DP releases that did leave the node. The evaluation reply carries the signed ledger head too, and
    the server witnesses it, so verify --against refuses the copy (before: only train replies carried a head, and
    the restored copy verified against the federation ledger)."""
    import shutil

    from federation.privacy.ledger import LedgerVerificationError, verify_against
    from server.server_app import WITNESS_FILE, run_federation

    cfg, node, grid, out = _witnessed_federation(tmp_path, secure)
    backup = tmp_path / "before-evaluation.sqlite"
    real = grid.send_and_receive

    def snap(messages, **kw):  # the owner's copy, taken just before the node answers the evaluation
        messages = list(messages)
        if any(m.metadata.message_type == "evaluate" for m in messages) and node.ledger_path.exists():
            shutil.copy(node.ledger_path, backup)
        return real(messages, **kw)

    grid.send_and_receive = snap
    run_federation(grid, cfg, heads=("churn", "propensity"), out=out, run_id="wit-eval")
    with Ledger.open(node.ledger_path, signing_key=None) as led:
        released = [e for e in led.entries() if e.kind == "evaluation_release"]
    assert released, "the run made evaluation releases"
    with Ledger.open(backup, signing_key=None) as led:
        assert not [e for e in led.entries() if e.kind == "evaluation_release"]
    fed, fed_pub = out.dir / WITNESS_FILE, tmp_path / "srvkeys" / "federation-ledger.key.pub"
    ok = verify_against(node.ledger_path, fed, public_key=node.public_key_path, federation_public_key=fed_pub,
                        partner=node.partner)
    assert ok.last_recorded_head[0] >= released[-1].seq  # the server saw the head after the evaluation releases
    verify(backup, node.public_key_path)  # the copy is intact on its own ...
    shutil.copy(backup, node.ledger_path)
    with pytest.raises(LedgerVerificationError, match="truncated or rolled back"):  # ... but not against the witness
        verify_against(node.ledger_path, fed, public_key=node.public_key_path, federation_public_key=fed_pub,
                       partner=node.partner)


@pytest.mark.parametrize("where,refused", [("same", True), ("below", True), ("apart", False)])
def test_a_deployed_node_refuses_a_ledger_key_inside_the_ledgers_folder(tmp_path, where, refused):
    """Whoever can write the ledger's folder must not be able to reach its signing key: not next to the ledger,
    nor in a subfolder of it (only the same folder was refused before)."""
    from federation.errors import FedpropError

    cfg = make_cfg(tmp_path, policy=False)
    ledger = tmp_path / "var" / "ledger.sqlite"
    key = {"same": tmp_path / "var" / "l.key", "below": tmp_path / "var" / "keys" / "l.key",
           "apart": tmp_path / "etc" / "l.key"}[where]
    node_config = {"partition-id": 0, "ledger-path": str(ledger), "node-key": str(key)}
    if refused:
        with pytest.raises(FedpropError, match="lies in the ledger's folder"):
            LH.resolve_node_ledger(cfg, node_config, deployment=True)
    else:
        assert LH.resolve_node_ledger(cfg, node_config, deployment=True).key_path == key
