"""Atomic reserve/commit, node ledger identity, pinned-key verification and the server's witness."""
from __future__ import annotations

import multiprocessing
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation.errors import BudgetExceededError, LedgerIntegrityError, PrivacyError
from federation.privacy import Ledger, PoissonSampledGaussian, generate_node_key, load_public_key, verify
from federation.privacy.accountants import get_accountant
from federation.privacy.ledger import (
    init_node_ledger,
    open_node_ledger,
    public_key_fingerprint,
    verify_against,
)
from federation.privacy.policy import default_policy, policy_from_mapping
from server.federation_ledger import open_federation_ledger, record_partner_heads

from .conftest import T0, append_round

EVENT = PoissonSampledGaussian(sampling_rate=0.02, noise_multiplier=1.5, steps=40)  # 21 rounds in 2.0
POLICY = {"max_epsilon": 2.0, "period": "all-time", "delta": 1e-5, "min_noise_multiplier": 0.5,
          "allowed_accountants": ["rdp"]}


def pub(key: Path) -> Path:
    return Path(str(key) + ".pub")


def _reserve(ledger, policy, rnd, run_id="r"):
    return ledger.reserve(policy=policy, commits_as="dpsgd_round", partner="acme", run_id=run_id, round=rnd,
                          delta=1e-5, mechanism=EVENT, clipping_norm=1.0, config_hash="c" * 64)


def test_reserve_commit_release_and_open_reservations_count(tmp_path, node_key):
    pol = policy_from_mapping(POLICY)
    path = tmp_path / "l.db"
    with Ledger.open(path, signing_key=node_key) as ledger:
        r1 = _reserve(ledger, pol, 1)
        committed = r1.commit(update_hash="a" * 64)
        assert committed.kind == "dpsgd_round" and committed.extra["reservation_seq"] == r1.seq
        assert committed.event == EVENT and committed.clipping_norm == 1.0
        with pytest.raises(PrivacyError, match="already closed"):
            r1.release("twice")
        r2 = _reserve(ledger, pol, 2)
        ledger.reservation(r2.seq).release("training failed")
        r3 = _reserve(ledger, pol, 3)  # left open: a crash between reserve and commit
        assert ledger.events(partner="acme") == [EVENT, EVENT]  # round 1 + the open round 3, not released round 2
    result = verify(path, pub(node_key))
    assert result.open_reservations == (r3.seq,)
    assert set(result.entry_epsilons) == {r1.seq, committed.seq, r2.seq, r3.seq}


def test_reserve_refuses_and_records_in_the_same_transaction(tmp_path, node_key):
    pol = policy_from_mapping({**POLICY, "max_epsilon": 0.5})
    with Ledger.open(tmp_path / "l.db", signing_key=node_key) as ledger:
        with pytest.raises(BudgetExceededError, match="refused"):
            while True:
                _reserve(ledger, pol, 1).commit(update_hash="a" * 64)
        last = ledger.entries()[-1]
        assert last.kind == "refusal" and "limit of 0.5" in last.extra["reason"]
        assert get_accountant("rdp").epsilon(ledger.events(partner="acme"), delta=1e-5) <= 0.5


def test_a_commit_must_release_what_was_reserved(tmp_path, node_key):
    path = tmp_path / "l.db"
    with Ledger.open(path, signing_key=node_key) as ledger:
        r = _reserve(ledger, policy_from_mapping(POLICY), 1)
        bigger = PoissonSampledGaussian(sampling_rate=0.02, noise_multiplier=1.0, steps=500)
        ledger.append(kind="dpsgd_round", partner="acme", run_id="r", round=1, delta=1e-5, mechanism=bigger,
                      clipping_norm=1.0, update_hash="a" * 64, extra={"reservation_seq": r.seq})
    with pytest.raises(LedgerIntegrityError, match="releases something else"):
        verify(path, pub(node_key))


def test_appends_without_a_timestamp_never_go_backwards(tmp_path, node_key):
    path = tmp_path / "l.db"
    with Ledger.open(path, signing_key=node_key) as ledger:
        append_round(ledger, run_id="r", rnd=1, when=T0 + timedelta(days=36500))  # a clock far ahead
        e = ledger.append(kind="run_start", partner="acme", run_id="r2")  # now < previous: clamped, not refused
        assert e.when == ledger.entries()[-2].when
    verify(path, pub(node_key))


def _hammer(path: str, key: str, worker: int, out) -> None:
    pol = policy_from_mapping(POLICY)
    done, errors = 0, []
    try:
        while True:
            with Ledger.open(path, signing_key=key) as ledger:
                try:
                    r = _reserve(ledger, pol, done + 1, run_id=f"w{worker}")
                except BudgetExceededError:
                    break
                if done % 3 == 2:
                    r.release("simulated training failure")
                else:
                    r.commit(update_hash=f"{worker:032x}{done:032x}")
                done += 1
    except Exception as exc:  # any other error is a spurious failure
        errors.append(f"{type(exc).__name__}: {exc}")
    out.put((worker, done, errors))


def test_processes_hammering_one_ledger_never_exceed_the_policy(tmp_path, node_key):
    path = tmp_path / "shared.db"
    with Ledger.open(path, signing_key=node_key):
        pass
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(str(path), str(node_key), w, out)) for w in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(not errors for _, _, errors in results), results
    assert sum(done for _, done, _ in results) >= 10
    result = verify(path, pub(node_key))
    with Ledger.open(path, signing_key=None) as ledger:
        entries = ledger.entries()
        spent = get_accountant("rdp").epsilon(ledger.events(partner="acme"), delta=1e-5)
    assert spent <= 2.0
    assert spent + get_accountant("rdp").epsilon([EVENT], delta=1e-5) > 2.0 * 0.95  # the budget was used up
    assert sum(e.kind == "refusal" for e in entries) == 4  # one per worker, nothing else refused
    assert result.open_reservations == ()


# ---- node identity: a missing ledger fails closed, a reset is explicit and visible


def test_a_deleted_ledger_is_refused_and_a_reset_is_explicit(tmp_path, node_key):
    path = tmp_path / "ledgers" / "partner.sqlite"
    path.parent.mkdir()
    with open_node_ledger(path, key_path=node_key) as ledger:
        first_id = ledger.ledger_id
        append_round(ledger, run_id="r", rnd=1, when=T0)
    path.unlink()
    with pytest.raises(LedgerIntegrityError, match="refusing to start a new, empty ledger"):
        open_node_ledger(path, key_path=node_key)
    with pytest.raises(LedgerIntegrityError, match="refusing to start"):  # a typo in ledger-path, same thing
        open_node_ledger(tmp_path / "ledgrs" / "partner.sqlite", key_path=node_key)
    with pytest.raises(PrivacyError, match="--reason"):
        init_node_ledger(path, key_path=node_key, reason=" ")
    with init_node_ledger(path, key_path=node_key, reason="disk lost, restored nothing") as ledger:
        ident = ledger.identity()
    assert ident["reset"] and ident["reset_of"] == first_id and ident["reason"] == "disk lost, restored nothing"
    with open_node_ledger(path, key_path=node_key) as ledger:  # the new ledger is now the node's
        assert ledger.ledger_id == ident["ledger_id"] != first_id
    with pytest.raises(PrivacyError, match="already exists"):
        init_node_ledger(path, key_path=node_key, reason="again")
    assert verify(path, pub(node_key)).genesis["reset_of"] == first_id


def test_another_ledger_at_the_nodes_path_is_refused(tmp_path, node_key):
    path = tmp_path / "partner.sqlite"
    open_node_ledger(path, key_path=node_key).close()
    path.unlink()
    Ledger.open(path, signing_key=node_key).close()  # someone creates a fresh one behind the node's back
    with pytest.raises(LedgerIntegrityError, match="is not this node's ledger"):
        open_node_ledger(path, key_path=node_key)


def test_resigned_backdated_ledger_fails_against_the_pinned_key(tmp_path, node_key):
    """The attack of the issue: sigma x10 in every entry, backdated, re-signed with a key beside the ledger."""
    path = tmp_path / "l.db"
    with Ledger.open(path, signing_key=node_key) as ledger:
        for rnd in range(1, 4):
            append_round(ledger, run_id="r", rnd=rnd, when=T0 + timedelta(minutes=rnd))
    pinned = public_key_fingerprint(load_public_key(pub(node_key)))
    forged_key = tmp_path / "beside-the-ledger.key"
    generate_node_key(forged_key)
    forged = tmp_path / "forged.db"
    calm = PoissonSampledGaussian(sampling_rate=0.02, noise_multiplier=11.0, steps=50)
    with Ledger.open(forged, signing_key=forged_key) as ledger:
        for rnd in range(1, 4):
            append_round(ledger, run_id="r", rnd=rnd, when=T0 - timedelta(days=400) + timedelta(minutes=rnd), event=calm)
    verify(forged, pub(forged_key))  # verifies against the key found beside it: proves nothing
    for kwargs in ({"fingerprint": pinned}, {"public_key": pub(node_key)}):
        with pytest.raises(LedgerIntegrityError, match="not the pinned key"):
            verify(forged, **kwargs)
    assert verify(path, fingerprint=pinned).pinned_by == "fingerprint"
    with pytest.raises(PrivacyError, match="pinned public key or fingerprint"):
        verify(path)


# ---- the server's witness


def _head(ident, node=1):
    """The head a node sends: seq, hash, ledger id and its ledger key's signature of them."""
    return {"seq": ident["seq"], "entry_hash": ident["entry_hash"], "ledger_id": ident["ledger_id"],
            "signature": ident["head_signature"], "node": node}


def _federation(tmp_path, heads_by_round, conflicts=()):
    fed = tmp_path / "federation.sqlite"
    with open_federation_ledger(fed, key_path=None) as ledger:
        for rnd, heads in heads_by_round:
            record_partner_heads(ledger, run_id="run-1", round=rnd, heads=heads,
                                 conflicts=[c for r, c in conflicts if r == rnd])
    return fed, fed.with_suffix(".key.pub")


def _forged(ledger_path, key_path, seq, entry_hash):
    """A head for the same ledger id signed by ANOTHER key (a hostile partner's or the coordinator's)."""
    with Ledger.open(ledger_path, signing_key=None) as led:
        lid = led.ledger_id
    other = Ed25519PrivateKey.generate()
    from federation.privacy.ledger import _head_bytes  # noqa: PLC0415 - the exact bytes a forger would sign
    return {"seq": seq, "entry_hash": entry_hash, "ledger_id": lid, "node": 666,
            "signature": other.sign(_head_bytes(lid, seq, entry_hash)).hex()}


def _partner_ledger(tmp_path, key, rounds=3, backup_after=None):
    path = tmp_path / "partner.sqlite"
    heads = []
    with open_node_ledger(path, key_path=key) as ledger:
        for rnd in range(1, rounds + 1):
            append_round(ledger, run_id="run-1", rnd=rnd, when=T0 + timedelta(minutes=rnd))
            ident = ledger.identity()
            heads.append((rnd, {"acme": _head(ident)}))
            if rnd == backup_after:
                with sqlite3.connect(tmp_path / "backup.sqlite") as dst:
                    ledger._conn.backup(dst)  # noqa: SLF001 - a consistent copy, as the owner would keep
    return path, heads


def test_verify_against_passes_an_intact_ledger_and_catches_a_rollback(tmp_path, node_key):
    path, heads = _partner_ledger(tmp_path, node_key, backup_after=2)
    fed, fed_pub = _federation(tmp_path, heads)
    ok = verify_against(path, fed, public_key=pub(node_key), federation_public_key=fed_pub)
    assert ok.heads_checked == 3 and ok.last_recorded_head == (3, heads[-1][1]["acme"]["entry_hash"])
    (tmp_path / "backup.sqlite").replace(path)  # after the run, the owner restores the copy of round 2
    assert verify(path, pub(node_key)).head_seq == 2  # a valid ledger on its own: signed head and all
    with pytest.raises(LedgerIntegrityError, match="truncated or rolled back"):
        verify_against(path, fed, public_key=pub(node_key), federation_public_key=fed_pub)


def _signed(key_path, ledger_id, seq, entry_hash):
    """A head this node's key signed at run time (what it sent), for a ledger state it no longer has."""
    from federation.privacy.ledger import _head_bytes, load_signing_key  # noqa: PLC0415

    sig = load_signing_key(key_path).sign(_head_bytes(ledger_id, seq, entry_hash)).hex()
    return {"seq": seq, "entry_hash": entry_hash, "ledger_id": ledger_id, "signature": sig, "node": 1}


def test_verify_against_catches_a_rewrite_and_a_replacement(tmp_path, node_key):
    path, heads = _partner_ledger(tmp_path, node_key)
    ledger_id = heads[0][1]["acme"]["ledger_id"]
    (tmp_path / "a").mkdir()
    fed, fed_pub = _federation(tmp_path / "a", [(1, {"acme": _signed(node_key, ledger_id, 2, "e" * 64)})])
    with pytest.raises(LedgerIntegrityError, match="rewritten or replaced"):
        verify_against(path, fed, public_key=pub(node_key), federation_public_key=fed_pub)
    (tmp_path / "b").mkdir()
    fed, fed_pub = _federation(tmp_path / "b", [(1, {"acme": _signed(node_key, "0" * 32, 1, "e" * 64)})])
    with pytest.raises(LedgerIntegrityError, match="declares no reset of it: the ledger was replaced"):
        verify_against(path, fed, public_key=pub(node_key), federation_public_key=fed_pub)


@pytest.mark.parametrize("forgery", ["another key", "no signature", "bad hex"])
def test_a_head_the_partner_did_not_sign_cannot_frame_it(tmp_path, node_key, forgery):
    """Another partner (or the coordinator) records, under acme's name, a head acme never sent -- one beyond its
    ledger's end, so that acme's intact ledger would look rolled back. Only acme's key makes evidence: the
    forgery is listed as ignored and the intact ledger verifies. Before heads were signed this raised
    'truncated or rolled back' on an intact ledger."""
    path, heads = _partner_ledger(tmp_path, node_key)
    fake = _forged(path, node_key, 9, "f" * 64)
    if forgery == "no signature":
        fake.pop("signature")
    elif forgery == "bad hex":
        fake["signature"] = "zz" * 64
    fed, fed_pub = _federation(tmp_path, heads[:1] + [(2, {"acme": fake})] + heads[1:])
    res = verify_against(path, fed, public_key=pub(node_key), federation_public_key=fed_pub)
    assert res.heads_checked == 3 and len(res.heads_ignored) == 1 and "node 666" in res.heads_ignored[0]


def test_a_second_claim_of_a_name_cannot_hide_the_genuine_head(tmp_path, node_key):
    """A hostile node replies as acme in the same round as acme (the server keeps both claims): acme's genuine,
    signed head still witnesses a later rollback, and the hostile claim is ignored."""
    path, heads = _partner_ledger(tmp_path, node_key, backup_after=2)
    rnd, last = heads[-1]
    fake = _forged(path, node_key, 1, heads[0][1]["acme"]["entry_hash"])  # a harmless-looking old head
    fed, fed_pub = _federation(tmp_path, heads[:-1] + [(rnd, {"acme": fake})], conflicts=[(rnd, {"partner": "acme", **last["acme"]})])
    ok = verify_against(path, fed, public_key=pub(node_key), federation_public_key=fed_pub)
    assert ok.heads_checked == 3 and ok.last_recorded_head == (3, last["acme"]["entry_hash"]) and len(ok.heads_ignored) == 1
    (tmp_path / "backup.sqlite").replace(path)  # the owner restores round 2's copy
    with pytest.raises(LedgerIntegrityError, match="truncated or rolled back"):
        verify_against(path, fed, public_key=pub(node_key), federation_public_key=fed_pub)


def test_verify_against_reports_an_explicit_reset(tmp_path, node_key):
    path, heads = _partner_ledger(tmp_path, node_key)
    path.unlink()
    with init_node_ledger(path, key_path=node_key, reason="new hardware") as ledger:
        append_round(ledger, run_id="run-2", rnd=1, when=T0 + timedelta(days=1))
        ident = ledger.identity()
    heads.append((1, {"acme": _head(ident)}))
    fed, fed_pub = _federation(tmp_path, heads)
    res = verify_against(path, fed, public_key=pub(node_key), federation_public_key=fed_pub)
    assert res.resets_seen == (heads[0][1]["acme"]["ledger_id"],) and res.heads_checked == 4


def test_default_policy_caps_a_partner_without_a_policy_file(tmp_path, node_key):
    """No policy file: the default policy's caps still hold through reserve."""
    pol = default_policy()
    big = PoissonSampledGaussian(sampling_rate=0.05, noise_multiplier=1.5, steps=100)
    with Ledger.open(tmp_path / "l.db", signing_key=node_key) as ledger:
        with pytest.raises(BudgetExceededError):
            for rnd in range(1, 50):
                ledger.reserve(policy=pol, commits_as="dpsgd_round", partner="acme", run_id="r", round=rnd,
                               delta=1e-5, mechanism=big, clipping_norm=1.0).commit(update_hash="a" * 64)
        spent = get_accountant("tight").epsilon(ledger.events(partner="acme"), delta=1e-5)
    assert 4.0 < spent <= 5.0  # the monthly cap of 5 is reached, never crossed
