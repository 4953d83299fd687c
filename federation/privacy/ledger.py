"""Per-partner privacy ledger: append-only, hash-chained, Ed25519-signed entries in SQLite.

Each entry records a mechanism (``federation.privacy.events``), never an authoritative epsilon
(PRINCIPLES.md 1). The format is a compatibility contract (PRINCIPLES.md 2): entry kinds load through the
closed ``ENTRY_KINDS`` table, fields are only ever added as optional, and every row carries
``schema_version``.

Integrity: ``entry_hash = SHA-256(domain || canonical JSON of every field except the hash and signature)``;
the JSON includes ``seq`` and ``prev_hash`` (the previous entry's hash; the first entry chains to a hash of
the ledger id). The node's Ed25519 key signs the same bytes. A signed head ``(seq, hash)`` is kept in the
``meta`` table in the same transaction, so deleting rows at the tail is detected too -- unless an attacker
also restores an older signed head; to rule that out pass an externally kept head (e.g. the one the
server received with the partner's last update) as ``verify(..., expected_head=...)``.

Durability: WAL journal with ``synchronous=FULL``; ``append`` commits before it returns, so an update that
leaves the node after ``append`` returned always has its record on disk.

Atomic budget: ``Ledger.reserve`` checks a policy against everything the ledger holds (releases, and
reservations neither committed nor released) and appends a ``reservation`` entry in ONE ``BEGIN IMMEDIATE``
transaction; the caller trains, then ``Reservation.commit(update_hash=...)`` appends the release entry
(``dpsgd_round`` / ``evaluation_release``) or ``Reservation.release(reason)`` frees the spend. So no
interleaving of processes on one ledger can exceed a policy. A reservation never closed (a crash) keeps
counting: fail closed. Timestamps of ``append`` without an explicit ``timestamp`` are taken under the lock.

Identity: ``meta.genesis`` (signed by the node key) records the ledger id, the key's fingerprint, when and
why the ledger was created, and whether it replaces (resets) an earlier ledger of the same node.
``open_node_ledger`` refuses to create a new, empty ledger where the node already has one
(``<key>.ledger.json`` in the node's key directory) unless ``init_node_ledger(reason=...)`` resets it.
``verify`` trusts only a pinned public key or fingerprint; ``verify_against`` compares the ledger with the
heads the server recorded in its federation ledger (rollback, truncation, replacement).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import stat
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from federation.errors import LedgerIntegrityError, PrivacyError
from federation.privacy.accountants import available_accountants, get_accountant
from federation.privacy.events import EVENT_KINDS, event_from_dict
from federation.privacy.policy import BudgetPolicy, Period, check_round, check_run

__all__ = [
    "SCHEMA_VERSION",
    "EntryKind",
    "ENTRY_KINDS",
    "LedgerEntry",
    "Ledger",
    "LedgerVerificationError",
    "VerificationResult",
    "verify",
    "verify_against",
    "verify_head_signature",
    "AgainstResult",
    "Reservation",
    "open_node_ledger",
    "init_node_ledger",
    "identity_path",
    "spending_entries",
    "generate_node_key",
    "load_signing_key",
    "load_public_key",
    "public_key_fingerprint",
    "hash_bytes",
]

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})
_DOMAIN = b"fedprop-ledger-entry-v1\x00"
_HEAD_DOMAIN = b"fedprop-ledger-head-v1\x00"
_GENESIS_DOMAIN = b"fedprop-ledger-genesis-record-v1\x00"


@dataclass(frozen=True)
class EntryKind:
    """What an entry kind means. ``layer`` is the privacy unit its mechanism protects (None: no release)."""

    name: str
    layer: str | None
    mechanisms: frozenset[str]
    requires_update_hash: bool
    requires_clipping_norm: bool
    description: str
    #: a reserved spend: counts until a later entry commits or releases it (``extra.reservation_seq``)
    reservation: bool = False


#: The closed table of entry kinds. Add kinds; never remove or redefine one.
ENTRY_KINDS: Mapping[str, EntryKind] = {
    k.name: k
    for k in (
        EntryKind("run_start", None, frozenset(), False, False, "a partner joined a run (no release)"),
        EntryKind(
            "dpsgd_round", "customer", frozenset({"poisson_sampled_gaussian"}), True, True,
            "a model update trained with DP-SGD left the partner node",
        ),
        EntryKind(
            "evaluation_release", "customer", frozenset(EVENT_KINDS), False, False,
            "a noisy evaluation statistic left the partner node",
        ),
        EntryKind(
            "server_dp_round", "partner", frozenset({"gaussian", "poisson_sampled_gaussian"}), True, True,
            "the server released an aggregate with partner-level DP noise",
        ),
        EntryKind("refusal", None, frozenset(), False, False, "a run or round was refused by policy (no release)"),
        EntryKind(
            "reservation", "customer", frozenset(EVENT_KINDS), False, False,
            "a release's spend was checked and reserved (counts until committed or released)", True,
        ),
        EntryKind("reservation_release", None, frozenset(), False, False, "a reservation was freed (no release)"),
        EntryKind("partner_heads", None, frozenset(), False, False, "the server recorded partners' ledger heads"),
    )
}
#: entry kinds a reservation may commit as
COMMIT_KINDS = ("dpsgd_round", "evaluation_release")
PRIVACY_UNITS = ("customer", "partner")


def hash_bytes(data: bytes) -> str:
    """Hex SHA-256, e.g. for ``config_hash`` / ``update_hash``."""
    return hashlib.sha256(data).hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _parse_ts(value: str) -> datetime:
    ts = datetime.fromisoformat(value)
    if ts.tzinfo is None:
        raise PrivacyError(f"timestamp {value!r} has no timezone.")
    return ts.astimezone(timezone.utc)


@dataclass(frozen=True, kw_only=True)
class LedgerEntry:
    schema_version: int
    seq: int
    kind: str
    partner: str
    run_id: str
    round: int | None
    timestamp: str
    privacy_unit: str
    delta: float | None
    mechanism: dict | None
    clipping_norm: float | None
    config_hash: str | None
    update_hash: str | None
    reported_epsilon: float | None
    reported_accountant: str | None
    extra: dict | None
    prev_hash: str
    entry_hash: str = ""
    signature: str = ""

    _UNSIGNED = ("entry_hash", "signature")

    def body(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in self._UNSIGNED}

    def signed_bytes(self) -> bytes:
        return _DOMAIN + _canonical(self.body())

    def compute_hash(self) -> str:
        return hashlib.sha256(self.signed_bytes()).hexdigest()

    @property
    def event(self):
        """The mechanism record (loaded through the closed kind table), or None."""
        return None if self.mechanism is None else event_from_dict(self.mechanism)

    @property
    def layer(self) -> str | None:
        return ENTRY_KINDS[self.kind].layer

    @property
    def when(self) -> datetime:
        return _parse_ts(self.timestamp)


_COLUMNS = [f.name for f in fields(LedgerEntry)]
_JSON_COLUMNS = ("mechanism", "extra")


def _validate_fields(e: LedgerEntry) -> None:
    """Raise PrivacyError describing the first semantic problem of an entry (used by append and verify)."""
    if e.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
        raise PrivacyError(f"unsupported schema_version {e.schema_version!r} (supported: {sorted(SUPPORTED_SCHEMA_VERSIONS)})")
    kind = ENTRY_KINDS.get(e.kind)
    if kind is None:
        raise PrivacyError(f"unknown entry kind {e.kind!r}; known kinds: {', '.join(ENTRY_KINDS)}")
    for name in ("partner", "run_id"):
        value = getattr(e, name)
        if not isinstance(value, str) or not value:
            raise PrivacyError(f"{name} must be a non-empty string, got {value!r}")
    if e.privacy_unit not in PRIVACY_UNITS:
        raise PrivacyError(f"privacy_unit must be one of {PRIVACY_UNITS}, got {e.privacy_unit!r}")
    if kind.layer is not None and e.privacy_unit != kind.layer:
        raise PrivacyError(f"entry kind {e.kind!r} protects privacy unit {kind.layer!r}, got {e.privacy_unit!r}")
    if e.round is not None and (isinstance(e.round, bool) or not isinstance(e.round, int) or e.round < 0):
        raise PrivacyError(f"round must be an integer >= 0 or None, got {e.round!r}")
    _parse_ts(e.timestamp)
    if kind.layer is None:
        if e.mechanism is not None:
            raise PrivacyError(f"entry kind {e.kind!r} records no release, but a mechanism was given")
    else:
        if e.round is None and kind.requires_update_hash:
            raise PrivacyError(f"entry kind {e.kind!r} requires round")
        if e.mechanism is None:
            raise PrivacyError(f"entry kind {e.kind!r} requires a mechanism")
        event = event_from_dict(e.mechanism)
        if event.kind not in kind.mechanisms:
            raise PrivacyError(
                f"entry kind {e.kind!r} allows mechanisms {sorted(kind.mechanisms)}, got {event.kind!r}"
            )
        if isinstance(e.delta, bool) or not isinstance(e.delta, (int, float)) or not 0 < e.delta < 1:
            raise PrivacyError(f"delta must be in (0, 1) for a release, got {e.delta!r}")
    if kind.requires_clipping_norm and (
        isinstance(e.clipping_norm, bool)
        or not isinstance(e.clipping_norm, (int, float))
        or not 0 < e.clipping_norm < math.inf
    ):
        raise PrivacyError(f"entry kind {e.kind!r} requires clipping_norm > 0, got {e.clipping_norm!r}")
    if kind.requires_update_hash and not (isinstance(e.update_hash, str) and e.update_hash):
        raise PrivacyError(f"entry kind {e.kind!r} requires update_hash (hash of the released update)")
    if e.reported_epsilon is not None:
        if not isinstance(e.reported_epsilon, (int, float)) or not 0 <= e.reported_epsilon:
            raise PrivacyError(f"reported_epsilon must be a number >= 0, got {e.reported_epsilon!r}")
        if e.reported_accountant not in available_accountants():
            raise PrivacyError(
                f"reported_epsilon needs reported_accountant in {list(available_accountants())}, "
                f"got {e.reported_accountant!r}"
            )
    if e.extra is not None and not isinstance(e.extra, dict):
        raise PrivacyError(f"extra must be a mapping or None, got {type(e.extra).__name__}")


# ---------------------------------------------------------------------------------------------- keys


def generate_node_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Create a node key: private key (PKCS8 PEM, mode 0600, never overwritten) at ``path`` and the
    public key (SubjectPublicKeyInfo PEM) at ``path + '.pub'``. Returns the public key."""
    path = Path(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PrivacyError(f"{path} already exists; refusing to overwrite a node key.") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    pub = key.public_key()
    Path(str(path) + ".pub").write_bytes(
        pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return pub


def load_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load a node's private key; refuses a key file readable by group or others."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PrivacyError(f"{path}: private key is accessible by group/others (mode {oct(mode & 0o777)}); chmod 600 it.")
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise PrivacyError(f"{path}: not an Ed25519 private key.")
    return key


def load_public_key(source: str | os.PathLike[str] | bytes | Ed25519PublicKey) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file path, PEM bytes, or 64-hex-character raw key text/bytes."""
    if isinstance(source, Ed25519PublicKey):
        return source
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    text = data.strip()
    try:
        if text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(text)
        else:
            key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(text.decode("ascii")))
    except ValueError as exc:
        raise PrivacyError(f"cannot read an Ed25519 public key from {source!r}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise PrivacyError(f"{source!r} is not an Ed25519 public key.")
    return key


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_fingerprint(key: Ed25519PublicKey) -> str:
    return "SHA256:" + hashlib.sha256(_raw_public(key)).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------- storage

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER NOT NULL UNIQUE,
    schema_version INTEGER NOT NULL,
    kind TEXT NOT NULL,
    partner TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER,
    timestamp TEXT NOT NULL,
    privacy_unit TEXT NOT NULL,
    delta REAL,
    mechanism TEXT,
    clipping_norm REAL,
    config_hash TEXT,
    update_hash TEXT,
    reported_epsilon REAL,
    reported_accountant TEXT,
    extra TEXT,
    prev_hash TEXT NOT NULL,
    entry_hash TEXT NOT NULL,
    signature TEXT NOT NULL
);
"""


#: how long a writer waits for another's BEGIN IMMEDIATE (a reservation composes the whole history under it)
_LOCK_TIMEOUT_S = 600.0


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=_LOCK_TIMEOUT_S)
    else:
        conn = sqlite3.connect(str(path), isolation_level=None, timeout=_LOCK_TIMEOUT_S)
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def _row_to_entry(row: Sequence[Any]) -> LedgerEntry:
    data = dict(zip(_COLUMNS, row))
    for col in _JSON_COLUMNS:
        if data[col] is not None:
            data[col] = json.loads(data[col])
    return LedgerEntry(**data)


def _entry_to_row(e: LedgerEntry) -> list[Any]:
    data = asdict(e)
    for col in _JSON_COLUMNS:
        if data[col] is not None:
            data[col] = _canonical(data[col]).decode()
    return [data[c] for c in _COLUMNS]


def _meta(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM meta").fetchall())


def _genesis_hash(ledger_id: str) -> str:
    return hashlib.sha256(b"fedprop-ledger-genesis-v1\x00" + ledger_id.encode()).hexdigest()


def _head_bytes(ledger_id: str, seq: int, entry_hash: str) -> bytes:
    return _HEAD_DOMAIN + _canonical({"ledger_id": ledger_id, "seq": seq, "entry_hash": entry_hash})


def verify_head_signature(public_key: Ed25519PublicKey, *, ledger_id: str, seq: int, entry_hash: str,
                          signature: Any) -> bool:
    """True iff ``signature`` (hex) is the ledger key ``public_key``'s signature of the head (ledger id, seq, hash)."""
    if not isinstance(signature, str) or len(signature) != 128:
        return False
    try:
        public_key.verify(bytes.fromhex(signature), _head_bytes(str(ledger_id), int(seq), str(entry_hash)))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _read_rows(conn: sqlite3.Connection) -> list[LedgerEntry]:
    rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM entries ORDER BY seq, rowid").fetchall()
    return [_row_to_entry(r) for r in rows]


class Ledger:
    """A partner's (or the server's) ledger. Open with ``Ledger.open(path, signing_key=...)``."""

    def __init__(self, path: Path, conn: sqlite3.Connection, key: Ed25519PrivateKey | None, meta: dict[str, str]):
        self.path = path
        self._conn = conn
        self._key = key
        self.ledger_id = meta["ledger_id"]
        self.public_key = load_public_key(meta["public_key"].encode())
        self.genesis: dict[str, Any] | None = json.loads(meta["genesis"]) if "genesis" in meta else None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        signing_key: Ed25519PrivateKey | str | os.PathLike[str] | None,
        create: bool = True,
        reason: str | None = None,
        reset_of: str | None = None,
    ) -> "Ledger":
        """Open the ledger at ``path`` (creating it if absent and ``create``). ``signing_key`` None opens
        read-only. A new ledger records a signed genesis (key fingerprint, ``reason``, and ``reset_of``: the
        id of the ledger it replaces, if any).

        The chain and signatures are checked on open; a tampered ledger is never appended to."""
        path = Path(path)
        key = signing_key if isinstance(signing_key, Ed25519PrivateKey) or signing_key is None else load_signing_key(signing_key)
        if key is None or (not create and not path.exists()):
            if not path.exists():
                raise PrivacyError(
                    f"{path}: no ledger here" + (" (and no signing key to create one)." if key is None else
                                                 "; refusing to create one (create=False).")
                )
            conn = _connect(path, readonly=key is None)
        else:
            conn = _connect(path, readonly=False)
            conn.execute("BEGIN IMMEDIATE")
            try:
                # executescript would COMMIT implicitly: run the DDL statements one by one in this transaction
                for stmt in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(stmt)
                if not _meta(conn):
                    pub = _raw_public(key.public_key()).hex()
                    ledger_id = uuid.uuid4().hex
                    created = datetime.now(timezone.utc).isoformat()
                    genesis = {
                        "ledger_id": ledger_id, "public_key_fingerprint": public_key_fingerprint(key.public_key()),
                        "created_at": created, "reason": reason, "reset": reset_of is not None, "reset_of": reset_of,
                    }
                    conn.executemany(
                        "INSERT INTO meta(key, value) VALUES (?, ?)",
                        [
                            ("schema_version", str(SCHEMA_VERSION)),
                            ("ledger_id", ledger_id),
                            ("public_key", pub),
                            ("created_at", created),
                            ("genesis", _canonical(genesis).decode()),
                            ("genesis_signature", key.sign(_GENESIS_DOMAIN + _canonical(genesis)).hex()),
                        ],
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                conn.close()
                raise
        meta = _meta(conn)
        if "ledger_id" not in meta or "public_key" not in meta:
            conn.close()
            raise LedgerIntegrityError(f"{path}: not a fedprop ledger (meta table incomplete).")
        if key is not None and meta["public_key"] != _raw_public(key.public_key()).hex():
            conn.close()
            raise LedgerIntegrityError(
                f"{path}: this ledger belongs to node key {meta['public_key'][:16]}..., not to the signing key "
                "given; refusing to append with another node's key."
            )
        ledger = cls(path, conn, key, meta)
        _check_chain(path, conn, ledger.public_key)
        return ledger

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def entries(self) -> list[LedgerEntry]:
        return _read_rows(self._conn)

    def head(self) -> tuple[int, str]:
        """(seq, entry_hash) of the last entry; (0, genesis hash) when empty. Send it with each update."""
        row = self._conn.execute("SELECT seq, entry_hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        return (0, _genesis_hash(self.ledger_id)) if row is None else (int(row[0]), row[1])

    def identity(self) -> dict[str, Any]:
        """What the node tells the server with each update: ledger id, key fingerprint, reset info, head, and the
        head's signature (``head_signature``: hex, by this ledger's key; "" for an empty ledger)."""
        seq, h = self.head()
        g = self.genesis or {}
        meta = _meta(self._conn)
        sig = meta.get("head_signature", "") if seq and meta.get("head_hash") == h else ""
        return {
            "ledger_id": self.ledger_id, "public_key_fingerprint": public_key_fingerprint(self.public_key),
            "reset": bool(g.get("reset")), "reset_of": g.get("reset_of"), "reason": g.get("reason"),
            "seq": seq, "entry_hash": h, "head_signature": sig,
        }

    def sign_head(self, seq: int, entry_hash: str) -> str:
        """This ledger's signature (hex) of the head (ledger id, ``seq``, ``entry_hash``): what the node sends the
        server beside each release, so the server's witness of this head cannot be forged by anyone without this
        node's key (``verify_head_signature``; a hostile partner claiming this partner's name, or the coordinator)."""
        return self._require_key().sign(_head_bytes(self.ledger_id, int(seq), str(entry_hash))).hex()

    # ------------------------------------------------------------------------------------------ writing

    def _require_key(self) -> Ed25519PrivateKey:
        if self._key is None:
            raise PrivacyError(f"{self.path}: opened read-only (no signing key); cannot append.")
        return self._key

    def _transaction(self):
        return _Transaction(self._conn)

    def append(
        self,
        *,
        kind: str,
        partner: str,
        run_id: str,
        round: int | None = None,
        delta: float | None = None,
        mechanism: Any = None,
        clipping_norm: float | None = None,
        config_hash: str | None = None,
        update_hash: str | None = None,
        privacy_unit: str = "customer",
        reported_epsilon: float | None = None,
        reported_accountant: str | None = None,
        extra: Mapping[str, Any] | None = None,
        timestamp: datetime | None = None,
    ) -> LedgerEntry:
        """Validate, sign, append and COMMIT one entry (durable when this returns). Without ``timestamp``
        the time is read under the write lock (never earlier than the previous entry's)."""
        fields_ = dict(
            kind=kind, partner=partner, run_id=run_id, round=round, delta=delta, mechanism=mechanism,
            clipping_norm=clipping_norm, config_hash=config_hash, update_hash=update_hash, privacy_unit=privacy_unit,
            reported_epsilon=reported_epsilon, reported_accountant=reported_accountant, extra=extra, timestamp=timestamp,
        )
        self._require_key()
        with self._transaction():
            return self._append_locked(**fields_)

    def _append_locked(self, *, mechanism: Any, extra: Mapping[str, Any] | None, timestamp: datetime | None, **kw) -> LedgerEntry:
        """Append inside an open BEGIN IMMEDIATE transaction (the caller commits)."""
        key = self._require_key()
        if mechanism is not None and not isinstance(mechanism, Mapping):
            if type(mechanism) not in EVENT_KINDS.values():
                raise PrivacyError(f"mechanism must be an event record or its dict, got {type(mechanism).__name__}.")
            mechanism = mechanism.to_dict()
        elif mechanism is not None:
            mechanism = event_from_dict(mechanism).to_dict()
        if timestamp is not None and timestamp.tzinfo is None:
            raise PrivacyError("timestamp must be timezone-aware.")
        extra_dict = None if extra is None else json.loads(_canonical(dict(extra)))
        conn = self._conn
        last = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        if last is None:
            seq, prev_hash, prev_ts = 1, _genesis_hash(self.ledger_id), None
        else:
            prev = _row_to_entry(last)
            if prev.compute_hash() != prev.entry_hash:
                raise LedgerIntegrityError(
                    f"{self.path}: last entry seq={prev.seq} does not match its hash; refusing to append."
                )
            seq, prev_hash, prev_ts = prev.seq + 1, prev.entry_hash, prev.when
        if timestamp is None:  # read under the lock; a clock stepped back by NTP never breaks the order
            when_utc = datetime.now(timezone.utc)
            if prev_ts is not None and when_utc < prev_ts:
                when_utc = prev_ts
        else:
            when_utc = timestamp.astimezone(timezone.utc)
            if prev_ts is not None and when_utc < prev_ts:
                raise PrivacyError(
                    f"timestamp {when_utc.isoformat()} is earlier than the previous entry's {prev_ts.isoformat()}."
                )
        delta, clip, rep = kw.pop("delta"), kw.pop("clipping_norm"), kw.pop("reported_epsilon")
        entry = LedgerEntry(
            schema_version=SCHEMA_VERSION, seq=seq, timestamp=when_utc.isoformat(timespec="microseconds"),
            delta=None if delta is None else float(delta), mechanism=mechanism,
            clipping_norm=None if clip is None else float(clip),
            reported_epsilon=None if rep is None else float(rep), extra=extra_dict, prev_hash=prev_hash, **kw,
        )
        _validate_fields(entry)
        entry_hash = entry.compute_hash()
        entry = LedgerEntry(**{**asdict(entry), "entry_hash": entry_hash, "signature": key.sign(entry.signed_bytes()).hex()})
        conn.execute(
            f"INSERT INTO entries({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
            _entry_to_row(entry),
        )
        head_sig = key.sign(_head_bytes(self.ledger_id, seq, entry_hash)).hex()
        conn.executemany(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
            [("head_seq", str(seq)), ("head_hash", entry_hash), ("head_signature", head_sig)],
        )
        return entry

    # ------------------------------------------------------------------------------------------ budget

    def reserve(
        self,
        *,
        policy: BudgetPolicy,
        commits_as: str,
        partner: str,
        run_id: str,
        round: int,
        delta: float,
        mechanism: Any,
        clipping_norm: float | None = None,
        config_hash: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> "Reservation":
        """In ONE write transaction: compose everything this partner's ledger holds (releases and open
        reservations) with ``mechanism``, check ``policy`` (period cap, lifetime cap, noise, rounds), then
        append a ``reservation`` entry (allowed) or a ``refusal`` entry and raise the policy's error.

        ``commits_as``: the release kind the reservation becomes (``dpsgd_round`` or ``evaluation_release``).
        A record-only policy reserves without checking the budget."""
        if commits_as not in COMMIT_KINDS:
            raise PrivacyError(f"commits_as must be one of {COMMIT_KINDS}, got {commits_as!r}.")
        event = mechanism if type(mechanism) in EVENT_KINDS.values() else event_from_dict(mechanism)
        self._require_key()
        with self._transaction():
            entries = _read_rows(self._conn)  # read under the write lock: nobody appends in between
            period_events, lifetime_events = _budget_events(entries, partner=partner, policy=policy)
            try:
                check = check_round(
                    policy, spent_events=period_events, round_event=event, round_number=max(1, int(round)),
                    lifetime_events=lifetime_events,
                )
            except PrivacyError as exc:
                self._append_locked(
                    kind="refusal", partner=partner, run_id=run_id, round=round, mechanism=None, timestamp=None,
                    extra={"scope": commits_as, "reason": str(exc), "mechanism": event.describe()}, delta=None,
                    clipping_norm=None, config_hash=config_hash, update_hash=None, privacy_unit="customer",
                    reported_epsilon=None, reported_accountant=None,
                )
                refused = exc
            else:
                refused = None
                entry = self._append_locked(
                    kind="reservation", partner=partner, run_id=run_id, round=round, delta=delta, mechanism=event,
                    clipping_norm=clipping_norm, config_hash=config_hash, update_hash=None, privacy_unit="customer",
                    reported_epsilon=None, reported_accountant=None, timestamp=None,
                    extra={
                        **dict(extra or {}), "commits_as": commits_as, "policy": policy.source or "(in memory)",
                        "policy_record_only": policy.record_only, "policy_total_epsilon": check.total_epsilon,
                        "policy_lifetime_epsilon": check.lifetime_total_epsilon, "policy_accountant": check.accountant,
                    },
                )
        if refused is not None:
            raise refused
        return Reservation(self, entry)

    def reservation(self, seq: int) -> "Reservation":
        """The reservation entry ``seq`` of this ledger (e.g. after reopening it), still open."""
        rows = [e for e in self.entries() if e.seq == seq]
        if not rows or rows[0].kind != "reservation":
            raise PrivacyError(f"{self.path}: entry seq={seq} is not a reservation.")
        return Reservation(self, rows[0])

    def check_budget(self, policy: BudgetPolicy, *, partner: str, planned_events: Sequence[Any], planned_rounds: int):
        """``policy.check_run`` against this ledger's period and lifetime spend (releases + open reservations).
        A check only: rounds reserve their own spend with ``reserve``."""
        period_events, lifetime_events = _budget_events(self.entries(), partner=partner, policy=policy)
        return check_run(
            policy, spent_events=period_events, planned_events=planned_events, planned_rounds=planned_rounds,
            lifetime_events=lifetime_events,
        )

    def events(
        self,
        *,
        partner: str | None = None,
        layer: str = "customer",
        period: Period | None = None,
        at: datetime | None = None,
    ) -> list:
        """Mechanism records of the releases protecting ``layer`` (optionally one partner, one period),
        open reservations included (they may still be released)."""
        return select_events(self.entries(), partner=partner, layer=layer, period=period, at=at)

    def spent(
        self,
        *,
        partner: str,
        period: Period,
        accountant: str,
        delta: float,
        at: datetime | None = None,
    ) -> float:
        """Customer-level epsilon spent by ``partner`` in the period containing ``at`` (default: now),
        recomputed by composing the recorded mechanisms under ``accountant`` at ``delta``."""
        events = self.events(partner=partner, layer="customer", period=period, at=at)
        return get_accountant(accountant).epsilon(events, delta=delta)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self._conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")


@dataclass
class Reservation:
    """A reserved spend (``Ledger.reserve``): ``commit`` it when the release leaves, or ``release`` it."""

    ledger: Ledger
    entry: LedgerEntry

    @property
    def seq(self) -> int:
        return self.entry.seq

    def closed_by(self) -> int | None:
        """The seq of the entry that committed or released this reservation, or None while it is open."""
        row = self.ledger._conn.execute(  # noqa: SLF001
            "SELECT seq FROM entries WHERE seq > ? AND json_extract(extra, '$.reservation_seq') = ?",
            (self.seq, self.seq),
        ).fetchone()
        return None if row is None else int(row[0])

    def _close(self, **fields_) -> LedgerEntry:
        led = self.ledger
        with led._transaction():  # noqa: SLF001
            closed = self.closed_by()
            if closed is not None:
                raise PrivacyError(f"{led.path}: reservation seq={self.seq} was already closed by entry seq={closed}.")
            return led._append_locked(timestamp=None, **fields_)  # noqa: SLF001

    def commit(
        self,
        *,
        update_hash: str | None = None,
        reported_epsilon: float | None = None,
        reported_accountant: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> LedgerEntry:
        """Append the release entry (kind ``commits_as``, same mechanism, delta, round, clipping norm)."""
        e = self.entry
        base = {k: v for k, v in (e.extra or {}).items() if k != "commits_as"}
        return self._close(
            kind=e.extra["commits_as"], partner=e.partner, run_id=e.run_id, round=e.round, delta=e.delta,
            mechanism=e.mechanism, clipping_norm=e.clipping_norm, config_hash=e.config_hash, update_hash=update_hash,
            privacy_unit=e.privacy_unit, reported_epsilon=reported_epsilon, reported_accountant=reported_accountant,
            extra={**base, **dict(extra or {}), "reservation_seq": e.seq},
        )

    def release(self, reason: str) -> LedgerEntry:
        """Free the spend: nothing was released (training failed, the round was abandoned)."""
        if not isinstance(reason, str) or not reason.strip():
            raise PrivacyError("a reservation release needs a reason.")
        e = self.entry
        return self._close(
            kind="reservation_release", partner=e.partner, run_id=e.run_id, round=e.round, delta=None,
            mechanism=None, clipping_norm=None, config_hash=e.config_hash, update_hash=None,
            privacy_unit=e.privacy_unit, reported_epsilon=None, reported_accountant=None,
            extra={"reservation_seq": e.seq, "reason": reason},
        )


def spending_entries(entries: Iterable[LedgerEntry]) -> list[LedgerEntry]:
    """Entries whose mechanism counts: releases, and reservations no later entry committed or released."""
    entries = list(entries)
    closed = {
        e.extra.get("reservation_seq") for e in entries
        if e.extra and e.kind in COMMIT_KINDS + ("reservation_release",) and "reservation_seq" in e.extra
    }
    return [
        e for e in entries
        if e.layer is not None and not (ENTRY_KINDS[e.kind].reservation and e.seq in closed)
    ]


def _budget_events(entries: Sequence[LedgerEntry], *, partner: str, policy: BudgetPolicy, at: datetime | None = None):
    spending = spending_entries(entries)
    period = select_events(spending, partner=partner, layer="customer", period=policy.period, at=at, _spending=True)
    lifetime = select_events(spending, partner=partner, layer="customer", _spending=True)
    return period, lifetime


def select_events(
    entries: Iterable[LedgerEntry],
    *,
    partner: str | None = None,
    layer: str = "customer",
    period: Period | None = None,
    at: datetime | None = None,
    _spending: bool = False,
) -> list:
    out = []
    for e in entries if _spending else spending_entries(entries):
        if e.layer != layer or (partner is not None and e.partner != partner):
            continue
        if period is not None and not period.contains(e.when, at=at):
            continue
        out.append(e.event)
    return out


# ---------------------------------------------------------------------------------------------- node identity


def identity_path(key_path: str | os.PathLike[str]) -> Path:
    """Where a node records its ledger identity: ``<node key>.ledger.json``, in the node's key directory."""
    return Path(str(key_path) + ".ledger.json")


def _write_identity(key_path: Path, ledger: Ledger) -> None:
    record = {**{k: v for k, v in ledger.identity().items() if k not in ("seq", "entry_hash")},
              "ledger_path": str(Path(ledger.path).resolve())}
    target = identity_path(key_path)
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)


def _read_identity(key_path: Path) -> dict[str, Any] | None:
    path = identity_path(key_path)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        record["ledger_id"]
    except (ValueError, KeyError, TypeError) as exc:
        raise LedgerIntegrityError(f"{path}: node ledger identity record unreadable ({exc}); restore it.") from exc
    return record


def open_node_ledger(ledger_path: str | os.PathLike[str], *, key_path: str | os.PathLike[str]) -> Ledger:
    """Open a partner node's ledger for appending, failing closed.

    * the ledger exists: it must be the one the node's identity record names (else LedgerIntegrityError);
    * it is missing and the node already has a ledger identity: refuse (a typo in ``ledger-path``, an
      unmounted volume or a deleted ledger must not restart the budget at zero); reset explicitly with
      ``init_node_ledger(..., reason=...)`` / ``fedprop budget init --reason``;
    * it is missing and the node never had one (first use of this key): create it and record the identity."""
    ledger_path, key_path = Path(ledger_path), Path(key_path)
    record = _read_identity(key_path)
    if not ledger_path.exists():
        if record is not None:
            raise LedgerIntegrityError(
                f"{ledger_path}: no ledger here, but this node (key {key_path}) already has ledger "
                f"{record['ledger_id']} at {record.get('ledger_path')}; refusing to start a new, empty ledger "
                "(its budget would restart at zero). Fix ledger-path or mount the volume; to start over on purpose "
                "run `fedprop budget init --reason '...'` (the federation will see the reset)."
            )
        ledger = Ledger.open(ledger_path, signing_key=key_path)
        _write_identity(key_path, ledger)
        return ledger
    ledger = Ledger.open(ledger_path, signing_key=key_path)
    if record is not None and record["ledger_id"] != ledger.ledger_id:
        ledger.close()
        raise LedgerIntegrityError(
            f"{ledger_path}: ledger {ledger.ledger_id} is not this node's ledger {record['ledger_id']} "
            f"(recorded in {identity_path(key_path)}); refusing to use it."
        )
    if record is None:
        _write_identity(key_path, ledger)
    return ledger


def init_node_ledger(
    ledger_path: str | os.PathLike[str], *, key_path: str | os.PathLike[str], reason: str
) -> Ledger:
    """Create a new, empty ledger for this node on purpose (``fedprop budget init --reason``). Where the node
    already had a ledger, the new one's signed genesis says ``reset`` and names the old ledger id, which the
    server sees with the node's next update. Refuses to overwrite an existing ledger file."""
    ledger_path, key_path = Path(ledger_path), Path(key_path)
    if not isinstance(reason, str) or not reason.strip():
        raise PrivacyError("budget init needs a --reason (it is recorded in the new ledger and seen by the federation).")
    if ledger_path.exists():
        raise PrivacyError(f"{ledger_path} already exists; refusing to replace a ledger (move it away first).")
    record = _read_identity(key_path)
    ledger = Ledger.open(
        ledger_path, signing_key=key_path, reason=reason.strip(), reset_of=None if record is None else record["ledger_id"]
    )
    _write_identity(key_path, ledger)
    return ledger


# ---------------------------------------------------------------------------------------------- verify


class LedgerVerificationError(LedgerIntegrityError):
    """Verification failed; ``seq`` is the first bad entry (0: the ledger's meta data)."""

    def __init__(self, path: Path, seq: int, reason: str) -> None:
        self.path = str(path)
        self.seq = seq
        self.reason = reason
        where = "ledger metadata" if seq == 0 else f"entry seq={seq}"
        super().__init__(
            f"{path}: verification failed at {where}: {reason}. Entries from this one on cannot be trusted; "
            "do not release further updates from this node until the ledger is restored from a verified copy."
        )


@dataclass(frozen=True)
class VerificationResult:
    path: str
    entries: int
    head_seq: int
    head_hash: str
    public_key_fingerprint: str
    accountants: tuple[str, ...]
    #: seq -> accountant -> epsilon of that entry's mechanism alone at the entry's delta (releases only)
    entry_epsilons: Mapping[int, Mapping[str, float]] = field(default_factory=dict)
    ledger_id: str = ""
    #: the signed genesis record (None for ledgers created before it existed)
    genesis: Mapping[str, Any] | None = None
    #: how the key was pinned: "public key" or "fingerprint"
    pinned_by: str = "public key"
    #: reservation seqs neither committed nor released (their spend counts)
    open_reservations: tuple[int, ...] = ()


def _check_chain(path: Path, conn: sqlite3.Connection, public_key: Ed25519PublicKey) -> list[LedgerEntry]:
    """Structure, chain, signature and head checks; raises LedgerVerificationError at the first bad entry."""
    meta = _meta(conn)
    try:
        version = int(meta.get("schema_version", ""))
    except ValueError:
        version = None
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise LedgerVerificationError(path, 0, f"unsupported ledger schema_version {meta.get('schema_version')!r}")
    ledger_id = meta.get("ledger_id", "")
    try:
        rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM entries ORDER BY seq, rowid").fetchall()
    except sqlite3.DatabaseError as exc:
        raise LedgerVerificationError(path, 0, f"entries table unreadable: {exc}") from exc
    entries: list[LedgerEntry] = []
    prev_hash, prev_ts = _genesis_hash(ledger_id), None
    for i, row in enumerate(rows):
        expected = i + 1
        try:
            e = _row_to_entry(row)
        except (TypeError, ValueError) as exc:
            raise LedgerVerificationError(path, expected, f"row unreadable: {exc}") from exc
        if e.seq != expected:
            if isinstance(e.seq, int) and e.seq > expected:
                raise LedgerVerificationError(
                    path, expected, f"entry is missing (next stored entry has seq={e.seq}): deleted?"
                )
            raise LedgerVerificationError(path, expected, f"sequence broken: found seq={e.seq!r}")
        if e.compute_hash() != e.entry_hash:
            raise LedgerVerificationError(path, e.seq, "content does not match its hash (edited?)")
        if e.prev_hash != prev_hash:
            raise LedgerVerificationError(
                path, e.seq, "prev_hash does not link to the previous entry (reordered, deleted or inserted?)"
            )
        try:
            public_key.verify(bytes.fromhex(e.signature), e.signed_bytes())
        except (InvalidSignature, ValueError):
            raise LedgerVerificationError(
                path, e.seq, "signature is not valid for this node's public key (forged or re-signed?)"
            ) from None
        try:
            _validate_fields(e)
            ts = e.when
        except (PrivacyError, ValueError) as exc:
            raise LedgerVerificationError(path, e.seq, f"invalid entry: {exc}") from exc
        if prev_ts is not None and ts < prev_ts:
            raise LedgerVerificationError(path, e.seq, "timestamp earlier than the previous entry's (backdated?)")
        prev_hash, prev_ts = e.entry_hash, ts
        entries.append(e)
    _check_reservations(path, entries)
    if "genesis" in meta:
        try:
            genesis = json.loads(meta["genesis"])
            public_key.verify(bytes.fromhex(meta.get("genesis_signature", "")), _GENESIS_DOMAIN + _canonical(genesis))
        except (InvalidSignature, ValueError):
            raise LedgerVerificationError(path, 0, "genesis record is not signed by this node's key (edited?)") from None
        if genesis.get("ledger_id") != ledger_id or genesis.get("public_key_fingerprint") != public_key_fingerprint(public_key):
            raise LedgerVerificationError(path, 0, "genesis record names another ledger id or key")
    n = len(entries)
    head_seq = int(meta["head_seq"]) if meta.get("head_seq", "").isdigit() else 0
    if head_seq != n or (n and meta.get("head_hash") != entries[-1].entry_hash):
        bad = min(head_seq, n) + 1 if head_seq != n else n
        raise LedgerVerificationError(
            path, bad, f"signed head says seq={head_seq}, but the ledger ends at seq={n} (truncated or rolled back?)"
        )
    if n:
        try:
            public_key.verify(
                bytes.fromhex(meta.get("head_signature", "")), _head_bytes(ledger_id, n, entries[-1].entry_hash)
            )
        except (InvalidSignature, ValueError):
            raise LedgerVerificationError(path, n, "signed head is not valid for this node's public key") from None
    return entries


def _check_reservations(path: Path, entries: Sequence[LedgerEntry]) -> None:
    """Every commit/release names an earlier, still open reservation of the same partner, run and round, and
    a commit releases exactly the reserved mechanism and delta."""
    open_: dict[int, LedgerEntry] = {}
    for e in entries:
        if ENTRY_KINDS[e.kind].reservation:
            open_[e.seq] = e
            continue
        ref = (e.extra or {}).get("reservation_seq") if e.kind in COMMIT_KINDS + ("reservation_release",) else None
        if ref is None:
            continue
        r = open_.pop(ref, None)
        if r is None or (r.partner, r.run_id, r.round) != (e.partner, e.run_id, e.round):
            raise LedgerVerificationError(path, e.seq, f"closes reservation seq={ref!r}, which is not open here")
        if e.kind != "reservation_release" and (
            e.kind != (r.extra or {}).get("commits_as") or e.mechanism != r.mechanism or e.delta != r.delta
        ):
            raise LedgerVerificationError(path, e.seq, f"releases something else than reservation seq={ref} reserved")


def _pinned_key(path: Path, conn: sqlite3.Connection, public_key, fingerprint: str | None) -> tuple[Ed25519PublicKey, str]:
    meta = _meta(conn)
    try:
        stored = load_public_key(meta.get("public_key", "").encode())
    except PrivacyError:
        raise LedgerVerificationError(path, 0, "the ledger's public key is unreadable") from None
    if public_key is None and fingerprint is None:
        raise PrivacyError("verify needs a pinned public key or fingerprint (obtained out of band, never from "
                           "the ledger's folder).")
    if public_key is not None:
        key, how = load_public_key(public_key), "public key"
        if fingerprint is not None and public_key_fingerprint(key) != fingerprint:
            raise PrivacyError(f"the public key given has fingerprint {public_key_fingerprint(key)}, not {fingerprint}.")
    else:
        key, how = stored, "fingerprint"
        if public_key_fingerprint(stored) != fingerprint:
            raise LedgerVerificationError(
                path, 0, f"the ledger's key {public_key_fingerprint(stored)} is not the pinned key {fingerprint}"
            )
    if _raw_public(key) != _raw_public(stored):
        raise LedgerVerificationError(
            path, 0, f"the ledger was created for key {public_key_fingerprint(stored)}, not the pinned key "
            f"{public_key_fingerprint(key)} (replaced or re-signed?)"
        )
    return key, how


def verify(
    path: str | os.PathLike[str],
    public_key: Ed25519PublicKey | str | os.PathLike[str] | bytes | None = None,
    *,
    fingerprint: str | None = None,
    expected_head: tuple[int, str] | None = None,
    accountants: Sequence[str] | None = None,
) -> VerificationResult:
    """Check the hash chain, every signature against the PINNED ``public_key`` or ``fingerprint`` (obtained
    out of band; a key found next to the ledger proves nothing), seq contiguity, schema versions, the signed
    genesis and head (and ``expected_head`` if given), reservations, then recompute every release's epsilon
    with every registered accountant (and check any ``reported_epsilon``).

    Raises ``LedgerVerificationError`` (a ``LedgerIntegrityError``) naming the first bad entry."""
    path = Path(path)
    if not path.exists():
        raise LedgerVerificationError(path, 0, "file does not exist")
    conn = _connect(path, readonly=True)
    try:
        public_key, pinned_by = _pinned_key(path, conn, public_key, fingerprint)
        entries = _check_chain(path, conn, public_key)
        meta = _meta(conn)
    finally:
        conn.close()
    if expected_head is not None:
        seq, h = expected_head
        if seq > len(entries):
            raise LedgerVerificationError(
                path, len(entries) + 1, f"externally recorded head seq={seq} is missing (truncated?)"
            )
        if seq >= 1 and entries[seq - 1].entry_hash != h:
            raise LedgerVerificationError(path, seq, "does not match the externally recorded head hash")
    names = tuple(accountants) if accountants is not None else available_accountants()
    accs = {name: get_accountant(name) for name in names}
    eps: dict[int, dict[str, float]] = {}
    memo: dict[tuple, dict[str, float]] = {}  # identical mechanisms (most rounds of a run) are computed once
    for e in entries:
        if e.layer is None:
            continue
        event = e.event
        key = (event.composition_key(), event.count, e.delta)
        row = dict(memo.get(key, {}))
        for name, acc in accs.items():
            if name in row:
                continue
            try:
                row[name] = acc.epsilon([event], delta=e.delta)
            except PrivacyError as exc:
                raise LedgerVerificationError(path, e.seq, f"accountant {name!r} cannot account it: {exc}") from exc
        memo[key] = row
        if e.reported_epsilon is not None:
            recomputed = (
                row[e.reported_accountant]
                if e.reported_accountant in row
                else get_accountant(e.reported_accountant).epsilon([event], delta=e.delta)
            )
            if not math.isclose(recomputed, e.reported_epsilon, rel_tol=1e-6, abs_tol=1e-9):
                raise LedgerVerificationError(
                    path, e.seq,
                    f"reported_epsilon {e.reported_epsilon!r} differs from the recomputed {recomputed!r} "
                    f"({e.reported_accountant})",
                )
        eps[e.seq] = row
    head = (entries[-1].seq, entries[-1].entry_hash) if entries else (0, "")
    spending = {e.seq for e in spending_entries(entries)}
    return VerificationResult(
        path=str(path), entries=len(entries), head_seq=head[0], head_hash=head[1],
        public_key_fingerprint=public_key_fingerprint(public_key), accountants=names, entry_epsilons=eps,
        ledger_id=meta.get("ledger_id", ""), genesis=json.loads(meta["genesis"]) if "genesis" in meta else None,
        pinned_by=pinned_by,
        open_reservations=tuple(e.seq for e in entries if ENTRY_KINDS[e.kind].reservation and e.seq in spending),
    )


@dataclass(frozen=True)
class AgainstResult:
    """``verify_against``: the partner ledger matches every head the server recorded for it."""

    partner: str
    ledger_id: str
    heads_checked: int
    last_recorded_head: tuple[int, str] | None
    resets_seen: tuple[str, ...]  # ledger ids the server saw for this partner before this one
    #: heads recorded under this partner's name that this ledger's key did not sign (not evidence either way:
    #: a hostile partner or coordinator claiming the name, or a client too old to sign), one line each
    heads_ignored: tuple[str, ...] = ()


def verify_against(
    path: str | os.PathLike[str],
    federation_ledger: str | os.PathLike[str],
    *,
    public_key=None,
    fingerprint: str | None = None,
    federation_public_key=None,
    federation_fingerprint: str | None = None,
    partner: str | None = None,
) -> AgainstResult:
    """Compare a partner's ledger with the heads (ledger id, seq, entry hash) the server recorded for that
    partner in its federation ledger (``partner_heads`` entries, one per round). Both ledgers are verified
    against their pinned keys first. Raises LedgerVerificationError naming what the partner's ledger lost:

    * a recorded seq beyond the ledger's end: truncated or rolled back to an older copy;
    * a recorded hash that differs from the ledger's entry at that seq: rewritten or replaced;
    * a recorded ledger id that is not this ledger's, and this ledger does not declare a reset of it:
      replaced. An explicit reset (``fedprop budget init --reason``) is reported in ``resets_seen`` (the spend
      of the old ledger is then outside this one: the report must be read with the old ledger).

    Only heads signed by this ledger's (pinned) key count: the node signs each head it sends (``Ledger.sign_head``),
    so neither another partner claiming this partner's name nor the coordinator can forge one (and frame the
    partner), and several claims under one name are all kept by the server (``conflicts``), so none can hide a
    genuine head. Unsigned or wrongly signed heads are listed in ``heads_ignored``."""
    path = Path(path)
    result = verify(path, public_key, fingerprint=fingerprint, accountants=())
    verify(federation_ledger, federation_public_key, fingerprint=federation_fingerprint, accountants=())
    with Ledger.open(path, signing_key=None) as led:
        entries = led.entries()
        key = led.public_key  # the pinned key: verify() above checked that it is
    with Ledger.open(federation_ledger, signing_key=None) as fed:
        fed_entries = fed.entries()
    partners = sorted({e.partner for e in entries if e.kind not in ("partner_heads",)})
    if partner is None:
        if len(partners) != 1:
            raise PrivacyError(f"{path}: holds partners {partners}; pass partner=.")
        partner = partners[0]
    heads, ignored = [], []
    for fe in fed_entries:
        if fe.kind != "partner_heads":
            continue
        extra = fe.extra or {}
        claims = [(extra.get("heads") or {}).get(partner)] + [
            c for c in extra.get("conflicts") or () if isinstance(c, Mapping) and c.get("partner") == partner]
        for h in claims:
            if not isinstance(h, Mapping):
                continue
            try:
                signed = verify_head_signature(key, ledger_id=h.get("ledger_id") or result.ledger_id, seq=int(h["seq"]),
                                               entry_hash=str(h["entry_hash"]), signature=h.get("signature"))
            except (KeyError, TypeError, ValueError):
                signed = False
            if signed:  # only this node's key can have made it: evidence about this ledger
                heads.append((fe, h))
            else:
                ignored.append(f"server round {fe.round} of run {fe.run_id} (federation ledger seq {fe.seq}): "
                               f"a head for {partner!r} from node {h.get('node', '?')} not signed by this ledger's key")
    chain = [result.ledger_id]
    g = result.genesis or {}
    resets: list[str] = []
    for fe, h in heads:
        seq, hh, lid = int(h["seq"]), str(h["entry_hash"]), h.get("ledger_id")
        where = f"server round {fe.round} of run {fe.run_id} (federation ledger seq {fe.seq})"
        if lid is not None and lid != result.ledger_id:
            if g.get("reset") and lid not in chain and lid == g.get("reset_of"):
                resets.append(lid)
                continue
            if lid in resets:
                continue
            raise LedgerVerificationError(
                path, 0, f"{where} recorded ledger {lid}, this is ledger {result.ledger_id} and declares no reset "
                "of it: the ledger was replaced"
            )
        if seq > len(entries):
            raise LedgerVerificationError(
                path, len(entries) + 1, f"{where} recorded head seq={seq}, the ledger ends at seq={len(entries)}: "
                "truncated or rolled back"
            )
        if seq >= 1 and entries[seq - 1].entry_hash != hh:
            raise LedgerVerificationError(
                path, seq, f"{where} recorded another entry hash at seq={seq}: rewritten or replaced"
            )
    last = (int(heads[-1][1]["seq"]), str(heads[-1][1]["entry_hash"])) if heads else None
    return AgainstResult(partner=partner, ledger_id=result.ledger_id, heads_checked=len(heads),
                         last_recorded_head=last, resets_seen=tuple(dict.fromkeys(resets)), heads_ignored=tuple(ignored))
