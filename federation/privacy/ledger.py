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
from federation.privacy.policy import Period

__all__ = [
    "SCHEMA_VERSION",
    "EntryKind",
    "ENTRY_KINDS",
    "LedgerEntry",
    "Ledger",
    "LedgerVerificationError",
    "VerificationResult",
    "verify",
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


@dataclass(frozen=True)
class EntryKind:
    """What an entry kind means. ``layer`` is the privacy unit its mechanism protects (None: no release)."""

    name: str
    layer: str | None
    mechanisms: frozenset[str]
    requires_update_hash: bool
    requires_clipping_norm: bool
    description: str


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
    )
}
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


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    else:
        conn = sqlite3.connect(str(path), isolation_level=None)
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

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        signing_key: Ed25519PrivateKey | str | os.PathLike[str] | None,
    ) -> "Ledger":
        """Open (creating if absent) the ledger at ``path``. ``signing_key`` None opens read-only.

        The chain and signatures are checked on open; a tampered ledger is never appended to."""
        path = Path(path)
        key = signing_key if isinstance(signing_key, Ed25519PrivateKey) or signing_key is None else load_signing_key(signing_key)
        if key is None:
            if not path.exists():
                raise PrivacyError(f"{path}: no ledger here (and no signing key to create one).")
            conn = _connect(path, readonly=True)
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
                    conn.executemany(
                        "INSERT INTO meta(key, value) VALUES (?, ?)",
                        [
                            ("schema_version", str(SCHEMA_VERSION)),
                            ("ledger_id", ledger_id),
                            ("public_key", pub),
                            ("created_at", datetime.now(timezone.utc).isoformat()),
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
        """Validate, sign, append and COMMIT one entry (durable when this returns)."""
        if self._key is None:
            raise PrivacyError(f"{self.path}: opened read-only (no signing key); cannot append.")
        if mechanism is not None and not isinstance(mechanism, Mapping):
            if type(mechanism) not in EVENT_KINDS.values():
                raise PrivacyError(f"mechanism must be an event record or its dict, got {type(mechanism).__name__}.")
            mechanism = mechanism.to_dict()
        elif mechanism is not None:
            mechanism = event_from_dict(mechanism).to_dict()
        when = datetime.now(timezone.utc) if timestamp is None else timestamp
        if when.tzinfo is None:
            raise PrivacyError("timestamp must be timezone-aware.")
        extra_dict = None if extra is None else json.loads(_canonical(dict(extra)))
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            last = conn.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM entries ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            if last is None:
                seq, prev_hash, prev_ts = 1, _genesis_hash(self.ledger_id), None
            else:
                prev = _row_to_entry(last)
                if prev.compute_hash() != prev.entry_hash:
                    raise LedgerIntegrityError(
                        f"{self.path}: last entry seq={prev.seq} does not match its hash; refusing to append."
                    )
                seq, prev_hash, prev_ts = prev.seq + 1, prev.entry_hash, prev.when
            when_utc = when.astimezone(timezone.utc)
            if prev_ts is not None and when_utc < prev_ts:
                raise PrivacyError(
                    f"timestamp {when_utc.isoformat()} is earlier than the previous entry's {prev_ts.isoformat()}."
                )
            entry = LedgerEntry(
                schema_version=SCHEMA_VERSION, seq=seq, kind=kind, partner=partner, run_id=run_id,
                round=round, timestamp=when_utc.isoformat(timespec="microseconds"), privacy_unit=privacy_unit,
                delta=None if delta is None else float(delta), mechanism=mechanism,
                clipping_norm=None if clipping_norm is None else float(clipping_norm),
                config_hash=config_hash, update_hash=update_hash,
                reported_epsilon=None if reported_epsilon is None else float(reported_epsilon),
                reported_accountant=reported_accountant, extra=extra_dict, prev_hash=prev_hash,
            )
            _validate_fields(entry)
            entry_hash = entry.compute_hash()
            signature = self._key.sign(entry.signed_bytes()).hex()
            entry = LedgerEntry(**{**asdict(entry), "entry_hash": entry_hash, "signature": signature})
            conn.execute(
                f"INSERT INTO entries({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                _entry_to_row(entry),
            )
            head_sig = self._key.sign(_head_bytes(self.ledger_id, seq, entry_hash)).hex()
            conn.executemany(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                [("head_seq", str(seq)), ("head_hash", entry_hash), ("head_signature", head_sig)],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return entry

    def events(
        self,
        *,
        partner: str | None = None,
        layer: str = "customer",
        period: Period | None = None,
        at: datetime | None = None,
    ) -> list:
        """Mechanism records of the releases protecting ``layer`` (optionally one partner, one period)."""
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


def select_events(
    entries: Iterable[LedgerEntry],
    *,
    partner: str | None = None,
    layer: str = "customer",
    period: Period | None = None,
    at: datetime | None = None,
) -> list:
    out = []
    for e in entries:
        if e.layer != layer or (partner is not None and e.partner != partner):
            continue
        if period is not None and not period.contains(e.when, at=at):
            continue
        out.append(e.event)
    return out


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


def verify(
    path: str | os.PathLike[str],
    public_key: Ed25519PublicKey | str | os.PathLike[str] | bytes,
    *,
    expected_head: tuple[int, str] | None = None,
    accountants: Sequence[str] | None = None,
) -> VerificationResult:
    """Check the hash chain, every signature against ``public_key`` (trusted, obtained out of band), seq
    contiguity, schema versions, the signed head (and ``expected_head`` if given), then recompute every
    release's epsilon with every registered accountant (and check any ``reported_epsilon``).

    Raises ``LedgerVerificationError`` (a ``LedgerIntegrityError``) naming the first bad entry."""
    path = Path(path)
    if not path.exists():
        raise LedgerVerificationError(path, 0, "file does not exist")
    public_key = load_public_key(public_key)
    conn = _connect(path, readonly=True)
    try:
        entries = _check_chain(path, conn, public_key)
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
    return VerificationResult(
        path=str(path), entries=len(entries), head_seq=head[0], head_hash=head[1],
        public_key_fingerprint=public_key_fingerprint(public_key), accountants=names, entry_epsilons=eps,
    )
