"""Long-term partner identities for SecAgg key adverts (pinned at onboarding, never found).

Each partner holds a dedicated Ed25519 identity key (``secagg-key`` in its node config: an OpenSSH or PEM
private key, e.g. made with ``ssh-keygen -t ed25519 -N "" -f keys/acme-secagg``) and a file of the partners'
pinned public identity keys (``secagg-peers``: one OpenSSH public key per line, ``ssh-ed25519 AAAA... name``,
exchanged out of band when the federation is set up). A client signs its advert (round, node id, both X25519
keys, self-mask commitment, config digest) and verifies every neighbour's advert against the pinned keys, so a
coordinator that substitutes its own keys for a partner's is caught before any share is sent.

The SuperNode authentication key (EC, OpenSSH) stays with the SuperNode process: the ClientApp process is not
given it, hence a dedicated key. Without ``secagg-peers`` nothing is verified and the coordinator can swap keys.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from federation.secagg.primitives import SecAggError

__all__ = ["KEY_NODE_CONFIG", "PEERS_NODE_CONFIG", "Identity", "load_identity", "load_peers", "public_of", "sign", "verify"]

log = logging.getLogger(__name__)

KEY_NODE_CONFIG = "secagg-key"
PEERS_NODE_CONFIG = "secagg-peers"
_MAX_PEERS_BYTES = 1 << 20


class Identity:
    """This node's signing key and the pinned partner keys (``pinned`` is None when no peers file is set)."""

    def __init__(self, private: bytes | None, pinned: Mapping[bytes, str] | None) -> None:
        self.private = private
        self.pinned = dict(pinned) if pinned is not None else None

    @property
    def public(self) -> bytes:
        return b"" if self.private is None else public_of(self.private)

    def __repr__(self) -> str:
        return f"Identity(public={self.public.hex()[:16]}, pinned={None if self.pinned is None else len(self.pinned)})"


def public_of(private: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def sign(private: bytes, message: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(private).sign(message)


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    if len(public) != 32 or len(signature) != 64:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _load_private(path: str) -> bytes:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise SecAggError(f"node config {KEY_NODE_CONFIG}={path!r}: cannot read the SecAgg identity key "
                          f"({exc.strerror}); create one with `ssh-keygen -t ed25519 -N \"\" -f {path}`") from exc
    try:
        key = (serialization.load_ssh_private_key(data, password=None) if b"OPENSSH PRIVATE KEY" in data
               else serialization.load_pem_private_key(data, password=None))
    except (ValueError, TypeError) as exc:
        raise SecAggError(f"node config {KEY_NODE_CONFIG}={path!r}: not an unencrypted OpenSSH/PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SecAggError(f"node config {KEY_NODE_CONFIG}={path!r}: the SecAgg identity key must be Ed25519, "
                          f"got {type(key).__name__}")
    return key.private_bytes_raw()


def load_peers(path: str) -> dict[bytes, str]:
    """Read a pinned-keys file: {raw Ed25519 public key: partner name}. Refuses duplicates and other key types."""
    p = Path(path)
    try:
        if p.stat().st_size > _MAX_PEERS_BYTES:
            raise SecAggError(f"node config {PEERS_NODE_CONFIG}={path!r}: file larger than 1 MiB")
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SecAggError(f"node config {PEERS_NODE_CONFIG}={path!r}: cannot read the pinned partner keys "
                          f"({exc.strerror})") from exc
    out: dict[bytes, str] = {}
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            key = serialization.load_ssh_public_key(" ".join(parts[:2]).encode())
        except (ValueError, TypeError, IndexError) as exc:
            raise SecAggError(f"node config {PEERS_NODE_CONFIG}={path!r} line {i}: not an OpenSSH public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise SecAggError(f"node config {PEERS_NODE_CONFIG}={path!r} line {i}: only ssh-ed25519 keys are accepted")
        raw = key.public_bytes_raw()
        if raw in out:
            raise SecAggError(f"node config {PEERS_NODE_CONFIG}={path!r} line {i}: duplicate key")
        out[raw] = parts[2] if len(parts) > 2 else f"line-{i}"
    if len(out) < 2:
        raise SecAggError(f"node config {PEERS_NODE_CONFIG}={path!r}: needs the keys of at least 2 partners")
    return out


_warned: set[str] = set()


def load_identity(node_config: Mapping[str, object]) -> Identity:
    """This node's identity from its own node config (set at onboarding, never from the coordinator)."""
    key_path = str(node_config.get(KEY_NODE_CONFIG, "") or "")
    peers_path = str(node_config.get(PEERS_NODE_CONFIG, "") or "")
    if peers_path and not key_path:
        raise SecAggError(f"node config {PEERS_NODE_CONFIG} is set but {KEY_NODE_CONFIG} is not: pinned peers "
                          "verify this node's advert too; set the path of this node's Ed25519 identity key")
    private = _load_private(key_path) if key_path else None
    pinned = load_peers(peers_path) if peers_path else None
    if pinned is not None and private is not None:
        if public_of(private) not in pinned:
            raise SecAggError(f"node config {PEERS_NODE_CONFIG}={peers_path!r} does not list this node's own "
                              f"identity key ({KEY_NODE_CONFIG}); fix the onboarding files")
    if pinned is None and "unpinned" not in _warned:
        _warned.add("unpinned")
        log.warning("SECURE AGGREGATION WITHOUT PINNED PEER KEYS (node config %s unset): neighbours' key adverts "
                    "are not authenticated, so a coordinator that substitutes its own keys can unmask this node's "
                    "update. Set %s and %s (docs/secure-aggregation.md).", PEERS_NODE_CONFIG, KEY_NODE_CONFIG,
                    PEERS_NODE_CONFIG)
    return Identity(private, pinned)
