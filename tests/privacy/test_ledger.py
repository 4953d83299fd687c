from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation.errors import LedgerIntegrityError, PrivacyError
from federation.privacy import (
    ENTRY_KINDS,
    Gaussian,
    Laplace,
    Ledger,
    LedgerEntry,
    Period,
    PoissonSampledGaussian,
    generate_node_key,
    load_public_key,
    load_signing_key,
    verify,
)
from federation.privacy.accountants import get_accountant
from federation.privacy.ledger import _entry_to_row, _COLUMNS

from .conftest import ROUND_EVENT, T0, append_round

REPO = Path(__file__).resolve().parents[2]


def pub(key_path: Path) -> Path:
    return Path(str(key_path) + ".pub")


def sql(path: Path, *statements: str, params=()) -> None:
    conn = sqlite3.connect(path)
    for s in statements:
        conn.execute(s, params)
    conn.commit()
    conn.close()


def expect_bad(path: Path, key: Path, seq: int, reason: str, **kwargs) -> None:
    with pytest.raises(LedgerIntegrityError, match=reason) as info:
        verify(path, pub(key), **kwargs)
    assert info.value.seq == seq, str(info.value)
    assert f"seq={seq}" in str(info.value) or seq == 0


# ---- keys


def test_node_key_is_private_and_never_overwritten(tmp_path):
    key = tmp_path / "k"
    public = generate_node_key(key)
    assert (key.stat().st_mode & 0o777) == 0o600
    assert load_public_key(pub(key)).public_bytes_raw() == public.public_bytes_raw()
    assert load_signing_key(key).public_key().public_bytes_raw() == public.public_bytes_raw()
    with pytest.raises(PrivacyError, match="already exists"):
        generate_node_key(key)


def test_group_readable_private_key_is_refused(tmp_path):
    key = tmp_path / "k"
    generate_node_key(key)
    os.chmod(key, 0o640)
    with pytest.raises(PrivacyError, match="chmod 600"):
        load_signing_key(key)


def test_public_key_from_raw_hex(tmp_path, node_key):
    raw = load_public_key(pub(node_key)).public_bytes_raw().hex()
    assert load_public_key(raw.encode()).public_bytes_raw().hex() == raw


# ---- append / read / verify


def test_entries_round_trip_and_verify(filled_ledger, node_key):
    with Ledger.open(filled_ledger, signing_key=None) as ledger:
        entries = ledger.entries()
        assert ledger.head() == (6, entries[-1].entry_hash)
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5, 6]
    assert [e.kind for e in entries] == ["run_start", "dpsgd_round", "dpsgd_round", "dpsgd_round", "run_start", "dpsgd_round"]
    assert entries[1].event == ROUND_EVENT
    assert entries[2].prev_hash == entries[1].entry_hash
    assert all(e.schema_version == 1 and e.privacy_unit == "customer" for e in entries)
    result = verify(filled_ledger, pub(node_key))
    assert result.entries == 6 and result.head_seq == 6
    assert set(result.entry_epsilons) == {2, 3, 4, 6}
    one = get_accountant("dp_pld").epsilon([ROUND_EVENT], delta=1e-5)
    assert result.entry_epsilons[3]["dp_pld"] == pytest.approx(one)
    assert set(result.entry_epsilons[3]) == {"rdp", "dp_rdp", "dp_pld", "prv", "tight"}


def test_spent_recomputes_from_mechanisms_per_period(filled_ledger):
    with Ledger.open(filled_ledger, signing_key=None) as ledger:
        month = Period.parse("calendar-month")
        spent = ledger.spent(partner="acme", period=month, accountant="rdp", delta=1e-5, at=T0)
        expected = get_accountant("rdp").epsilon([ROUND_EVENT] * 4, delta=1e-5)
        assert spent == pytest.approx(expected)
        later = T0 + timedelta(days=40)
        assert ledger.spent(partner="acme", period=month, accountant="rdp", delta=1e-5, at=later) == 0.0
        assert ledger.spent(partner="other", period=month, accountant="rdp", delta=1e-5, at=T0) == 0.0


def test_reported_epsilon_is_checked_by_verify(tmp_path, node_key):
    path = tmp_path / "l.db"
    good = get_accountant("rdp").epsilon([ROUND_EVENT], delta=1e-5)
    with Ledger.open(path, signing_key=node_key) as ledger:
        ledger.append(kind="dpsgd_round", partner="acme", run_id="r", round=1, delta=1e-5, mechanism=ROUND_EVENT,
                      clipping_norm=1.0, update_hash="a" * 64, reported_epsilon=good, reported_accountant="rdp")
        ledger.append(kind="dpsgd_round", partner="acme", run_id="r", round=2, delta=1e-5, mechanism=ROUND_EVENT,
                      clipping_norm=1.0, update_hash="b" * 64, reported_epsilon=good / 2, reported_accountant="rdp")
    expect_bad(path, node_key, 2, "reported_epsilon")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="dpsgd"), "unknown entry kind"),
        (dict(mechanism=Gaussian(noise_multiplier=2.0)), "allows mechanisms"),
        (dict(mechanism=None), "requires a mechanism"),
        (dict(delta=None), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(clipping_norm=None), "clipping_norm"),
        (dict(clipping_norm=0.0), "clipping_norm"),
        (dict(update_hash=None), "update_hash"),
        (dict(privacy_unit="partner"), "privacy unit 'customer'"),
        (dict(privacy_unit="row"), "privacy_unit"),
        (dict(partner=""), "partner"),
        (dict(round=-1), "round"),
        (dict(reported_epsilon=1.0), "reported_accountant"),
        (dict(mechanism={"kind": "gaussian", "noise_multiplier": 1.0, "extra": 1}), "unknown field"),
    ],
)
def test_append_validates_and_writes_nothing_on_error(tmp_path, node_key, kwargs, message):
    path = tmp_path / "l.db"
    base = dict(kind="dpsgd_round", partner="acme", run_id="r", round=1, delta=1e-5, mechanism=ROUND_EVENT,
                clipping_norm=1.0, update_hash="a" * 64)
    with Ledger.open(path, signing_key=node_key) as ledger:
        with pytest.raises(PrivacyError, match=message):
            ledger.append(**{**base, **kwargs})
        assert ledger.entries() == []
        ledger.append(**base)
    verify(path, pub(node_key))


def test_every_entry_kind_can_be_appended_and_verified(tmp_path, node_key):
    path = tmp_path / "l.db"
    examples = {
        "run_start": dict(),
        "dpsgd_round": dict(round=1, delta=1e-5, mechanism=ROUND_EVENT, clipping_norm=1.0, update_hash="a" * 64),
        "evaluation_release": dict(round=1, delta=1e-5, mechanism=Laplace(noise_multiplier=20.0, count=2)),
        "server_dp_round": dict(round=1, delta=1e-5, mechanism=Gaussian(noise_multiplier=4.0), clipping_norm=0.5,
                                update_hash="b" * 64, privacy_unit="partner"),
        "refusal": dict(round=2, extra={"reason": "budget", "spent": 0.93}),
        "reservation": dict(round=3, delta=1e-5, mechanism=ROUND_EVENT, extra={"commits_as": "dpsgd_round"}),
        "reservation_release": dict(round=3, extra={"reservation_seq": 6, "reason": "training failed"}),
        "partner_heads": dict(round=3, extra={"heads": {"p": {"seq": 1, "entry_hash": "c" * 64}}}),
    }
    assert set(examples) == set(ENTRY_KINDS)
    with Ledger.open(path, signing_key=node_key) as ledger:
        for kind, kw in examples.items():
            ledger.append(kind=kind, partner="acme", run_id="r", **kw)
    result = verify(path, pub(node_key))
    assert result.entries == len(ENTRY_KINDS)
    assert set(result.entry_epsilons) == {2, 3, 4, 6}
    assert result.open_reservations == ()


def test_backdated_append_is_refused(filled_ledger, node_key):
    with Ledger.open(filled_ledger, signing_key=node_key) as ledger:
        with pytest.raises(PrivacyError, match="earlier than the previous"):
            append_round(ledger, run_id="r3", rnd=1, when=T0 - timedelta(days=1))


def test_another_nodes_key_cannot_append(filled_ledger, tmp_path):
    other = tmp_path / "other.key"
    generate_node_key(other)
    with pytest.raises(LedgerIntegrityError, match="belongs to node key"):
        Ledger.open(filled_ledger, signing_key=other)


def test_ledger_spans_reopening(filled_ledger, node_key):
    with Ledger.open(filled_ledger, signing_key=node_key) as ledger:
        entry = append_round(ledger, run_id="r2", rnd=2, when=T0 + timedelta(hours=5))
    assert entry.seq == 7
    assert verify(filled_ledger, pub(node_key)).head_seq == 7


# ---- tampering: each makes verify fail naming the first bad entry


def test_edited_field(filled_ledger, node_key):
    sql(filled_ledger, "UPDATE entries SET clipping_norm = 5.0 WHERE seq = 3")
    expect_bad(filled_ledger, node_key, 3, "does not match its hash")


def test_edited_mechanism(filled_ledger, node_key):
    m = json.dumps({**ROUND_EVENT.to_dict(), "noise_multiplier": 5.0}, sort_keys=True, separators=(",", ":"))
    sql(filled_ledger, "UPDATE entries SET mechanism = ? WHERE seq = 4", params=(m,))
    expect_bad(filled_ledger, node_key, 4, "does not match its hash")


def test_edited_and_rehashed_entry_fails_the_signature(filled_ledger, node_key):
    conn = sqlite3.connect(filled_ledger)
    row = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM entries WHERE seq = 2").fetchone()
    conn.close()
    from federation.privacy.ledger import _row_to_entry

    entry = _row_to_entry(row)
    edited = LedgerEntry(**{**asdict(entry), "delta": 1e-3})
    sql(filled_ledger, "UPDATE entries SET delta = 1e-3, entry_hash = ? WHERE seq = 2", params=(edited.compute_hash(),))
    # seq 2 now hashes correctly, but seq 3's prev_hash no longer links... the signature fails first at seq 2
    expect_bad(filled_ledger, node_key, 2, "signature is not valid")


def test_deleted_entry(filled_ledger, node_key):
    sql(filled_ledger, "DELETE FROM entries WHERE seq = 3")
    expect_bad(filled_ledger, node_key, 3, "missing")


def test_reordered_entries(filled_ledger, node_key):
    sql(
        filled_ledger,
        "UPDATE entries SET seq = -1 WHERE seq = 2",
        "UPDATE entries SET seq = 2 WHERE seq = 4",
        "UPDATE entries SET seq = 4 WHERE seq = -1",
    )
    expect_bad(filled_ledger, node_key, 2, "does not match its hash")


def test_reordered_rows_with_fields_swapped_wholesale(filled_ledger, node_key):
    # swap every column except seq between rows 3 and 4: each row is self-consistent but the chain is not
    conn = sqlite3.connect(filled_ledger)
    cols = [c for c in _COLUMNS if c != "seq"]
    r3 = conn.execute(f"SELECT {', '.join(cols)} FROM entries WHERE seq = 3").fetchone()
    r4 = conn.execute(f"SELECT {', '.join(cols)} FROM entries WHERE seq = 4").fetchone()
    sets = ", ".join(f"{c} = ?" for c in cols)
    conn.execute(f"UPDATE entries SET {sets} WHERE seq = 3", r4)
    conn.execute(f"UPDATE entries SET {sets} WHERE seq = 4", r3)
    conn.commit()
    conn.close()
    expect_bad(filled_ledger, node_key, 3, "does not match its hash")


def _forge(path: Path, seq: int, forger: Ed25519PrivateKey, **changes) -> None:
    conn = sqlite3.connect(path)
    from federation.privacy.ledger import _row_to_entry

    prev = _row_to_entry(conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM entries WHERE seq = ?", (seq - 1,)).fetchone())
    base = _row_to_entry(conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM entries WHERE seq = ?", (prev.seq,)).fetchone())
    forged = LedgerEntry(**{**asdict(base), "seq": seq, "prev_hash": prev.entry_hash, "entry_hash": "", "signature": "",
                            **changes})
    forged = LedgerEntry(**{**asdict(forged), "entry_hash": forged.compute_hash(),
                            "signature": forger.sign(forged.signed_bytes()).hex()})
    conn.execute("DELETE FROM entries WHERE seq = ?", (seq,))
    conn.execute(f"INSERT INTO entries({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                 _entry_to_row(forged))
    conn.commit()
    conn.close()


def test_forged_entry_signed_by_another_key(filled_ledger, node_key):
    _forge(filled_ledger, 4, Ed25519PrivateKey.generate(), round=3, update_hash="f" * 64)
    expect_bad(filled_ledger, node_key, 4, "signature is not valid")


def test_forged_entry_appended_at_the_tail(filled_ledger, node_key):
    _forge(filled_ledger, 7, Ed25519PrivateKey.generate(), round=2)
    expect_bad(filled_ledger, node_key, 7, "signature is not valid")


def test_whole_ledger_resigned_with_another_key_fails_against_the_pinned_key(tmp_path, node_key):
    path = tmp_path / "fake.db"
    other = tmp_path / "other.key"
    generate_node_key(other)
    with Ledger.open(path, signing_key=other) as ledger:
        append_round(ledger, run_id="r", rnd=1, when=T0)
    expect_bad(path, node_key, 0, "not the pinned key")
    # the stored key swapped for the pinned one: the first entry's signature gives it away
    sql(path, "UPDATE meta SET value = ? WHERE key = 'public_key'",
        params=(load_public_key(pub(node_key)).public_bytes_raw().hex(),))
    expect_bad(path, node_key, 1, "signature is not valid")


def test_truncated_tail(filled_ledger, node_key):
    sql(filled_ledger, "DELETE FROM entries WHERE seq >= 5")
    expect_bad(filled_ledger, node_key, 5, "truncated")


def test_rollback_to_an_older_copy_is_caught_by_an_external_head(filled_ledger, node_key, tmp_path):
    old = tmp_path / "old.db"
    with Ledger.open(filled_ledger, signing_key=node_key) as ledger:
        shutil.copy(filled_ledger, old)
        entry = append_round(ledger, run_id="r2", rnd=2, when=T0 + timedelta(hours=5))
    verify(old, pub(node_key))  # an older consistent copy verifies on its own ...
    expect_bad(old, node_key, 7, "externally recorded head", expected_head=(7, entry.entry_hash))
    verify(filled_ledger, pub(node_key), expected_head=(7, entry.entry_hash))


def test_tampered_ledger_is_never_appended_to(filled_ledger, node_key):
    sql(filled_ledger, "UPDATE entries SET round = 9 WHERE seq = 6")
    with pytest.raises(LedgerIntegrityError, match="seq=6"):
        Ledger.open(filled_ledger, signing_key=node_key)


def test_unknown_schema_version(filled_ledger, node_key):
    sql(filled_ledger, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    expect_bad(filled_ledger, node_key, 0, "schema_version")


# ---- durability: an entry whose append returned survives the process being killed right after


def test_append_is_durable_when_the_process_is_killed_right_after(tmp_path, node_key):
    path = tmp_path / "ledger.db"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from federation.privacy import Ledger, PoissonSampledGaussian
        ledger = Ledger.open({str(path)!r}, signing_key={str(node_key)!r})
        ledger.append(kind="run_start", partner="acme", run_id="r1")
        entry = ledger.append(kind="dpsgd_round", partner="acme", run_id="r1", round=1, delta=1e-5,
            mechanism=PoissonSampledGaussian(sampling_rate=0.02, noise_multiplier=1.1, steps=50),
            clipping_norm=1.0, update_hash="ab" * 32)
        sys.stdout.write(entry.entry_hash + "\\n")
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # the update would be sent here; no close, no atexit
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    reported_hash = proc.stdout.strip()
    result = verify(path, pub(node_key), expected_head=(2, reported_hash))
    assert result.entries == 2 and result.head_hash == reported_hash
