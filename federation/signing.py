"""Ed25519 signatures on released model files (uses ``cryptography`` only).

The server signs each released global model; a partner's ``score`` refuses a model whose signature does not
verify against the federation's public key. ``sign_file(model)`` writes ``model + ".sig"``, a JSON document::

    {"manifest": {"format": "fedprop-signature", "version": 1, "algorithm": "ed25519",
                  "file": "<base name>", "size": <bytes>, "sha256": "<hex of the file bytes>",
                  "key_fingerprint": "sha256:<hex of the raw public key>"},
     "signature": "<base64 Ed25519 signature over the canonical JSON of manifest>"}

The signature covers the file's SHA-256, its size and its base name, so a signed churn model cannot be
passed off under another model's name. Canonical JSON: sorted keys, no whitespace, ASCII.

Keys: private key PEM PKCS#8 (unencrypted, so protect the file), written with mode 0600 from the first
byte and refused if group/other can read it; public key PEM SubjectPublicKeyInfo. Keys are never printed.
Every file is written atomically (temp file, fsync, ``os.replace``).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from federation.atomicio import atomic_write_bytes
from federation.errors import FedpropError

SIG_SUFFIX = ".sig"
SIG_FORMAT = "fedprop-signature"
SIG_VERSION = 1
_MANIFEST_KEYS = {"format", "version", "algorithm", "file", "size", "sha256", "key_fingerprint"}


class SignatureError(FedpropError):
    """A file's signature is missing, malformed, or does not verify; the message names the file."""


class SigningKeyError(FedpropError):
    """A signing key file is missing, malformed, of the wrong type, or readable by others."""


def _canonical(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _fingerprint(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def signature_path(path: str | Path) -> Path:
    """Where the signature of ``path`` lives: ``path + ".sig"``."""
    p = Path(path)
    return p.with_name(p.name + SIG_SUFFIX)


def generate_keypair(private_path: str | Path, public_path: str | Path) -> str:
    """Create an Ed25519 key pair; return the public key's fingerprint (``sha256:<hex>``).

    Refuses to overwrite existing files: replacing a federation's signing key silently would make every
    partner refuse the next model (or, worse, accept models from whoever replaced it).
    """
    priv, pub = Path(private_path), Path(public_path)
    existing = [str(p) for p in (priv, pub) if p.exists()]
    if existing:
        raise SigningKeyError(
            f"refusing to overwrite existing key file(s): {', '.join(existing)}; "
            "delete them yourself or choose other paths"
        )
    key = Ed25519PrivateKey.generate()
    for p in (priv, pub):
        p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(
        priv,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
        mode=0o600,
    )
    public_key = key.public_key()
    atomic_write_bytes(
        pub,
        public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        mode=0o644,
    )
    return _fingerprint(public_key)


def _load_private(path: str | Path) -> Ed25519PrivateKey:
    p = Path(path)
    if not p.is_file():
        raise SigningKeyError(f"private signing key {p} not found; create one with generate_keypair()")
    if os.name == "posix" and p.stat().st_mode & 0o077:
        raise SigningKeyError(
            f"private signing key {p} is accessible to group/other (mode {p.stat().st_mode & 0o777:04o}); "
            f"anyone who can read it can sign models for the federation. Run: chmod 600 {p}"
        )
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{p} is not an unencrypted PEM private key ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{p} holds a {type(key).__name__}, fedprop signs models with Ed25519 keys only")
    return key


def _load_public(path: str | Path) -> Ed25519PublicKey:
    p = Path(path)
    if not p.is_file():
        raise SigningKeyError(f"federation public key {p} not found; ask the coordinator for it")
    try:
        key = serialization.load_pem_public_key(p.read_bytes())
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{p} is not a PEM public key ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{p} holds a {type(key).__name__}, fedprop verifies Ed25519 signatures only")
    return key


def public_key_fingerprint(public_key_path: str | Path) -> str:
    """``sha256:<hex>`` of the raw public key, for comparing keys out of band."""
    return _fingerprint(_load_public(public_key_path))


def sign_file(path: str | Path, private_key_path: str | Path) -> Path:
    """Sign ``path`` and write ``path + ".sig"`` atomically; return the signature's path."""
    p = Path(path)
    if not p.is_file():
        raise SignatureError(f"cannot sign {p}: file not found")
    key = _load_private(private_key_path)
    data = p.read_bytes()
    manifest = {
        "format": SIG_FORMAT,
        "version": SIG_VERSION,
        "algorithm": "ed25519",
        "file": p.name,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "key_fingerprint": _fingerprint(key.public_key()),
    }
    doc = {"manifest": manifest, "signature": base64.b64encode(key.sign(_canonical(manifest))).decode("ascii")}
    out = signature_path(p)
    atomic_write_bytes(out, (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode("ascii"))
    return out


def _parse_signature(p: Path, sig: Path) -> tuple[dict[str, Any], bytes]:
    if not sig.is_file():
        raise SignatureError(
            f"refusing {p}: signature file {sig} is missing. Only models signed by the federation's "
            "coordinator may be used; fetch the model together with its .sig file"
        )
    try:
        doc = json.loads(sig.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SignatureError(f"refusing {p}: signature file {sig} is not valid JSON (malformed)") from None
    problems = []
    manifest = doc.get("manifest") if isinstance(doc, dict) else None
    if not isinstance(manifest, dict):
        problems.append("no 'manifest' object")
    else:
        if set(manifest) != _MANIFEST_KEYS:
            problems.append(f"manifest keys {sorted(manifest)} differ from {sorted(_MANIFEST_KEYS)}")
        if manifest.get("format") != SIG_FORMAT or manifest.get("version") != SIG_VERSION:
            problems.append(f"unsupported format/version {manifest.get('format')!r}/{manifest.get('version')!r}")
        if manifest.get("algorithm") != "ed25519":
            problems.append(f"unsupported algorithm {manifest.get('algorithm')!r}")
    raw = b""
    sig_b64 = doc.get("signature") if isinstance(doc, dict) else None
    if not isinstance(sig_b64, str):
        problems.append("no 'signature' string")
    else:
        try:
            raw = base64.b64decode(sig_b64, validate=True)
        except (binascii.Error, ValueError):
            problems.append("signature is not base64")
        if raw and len(raw) != 64:
            problems.append(f"signature is {len(raw)} bytes, Ed25519 signatures are 64")
    if problems:
        raise SignatureError(f"refusing {p}: signature file {sig} is malformed: " + "; ".join(problems))
    return manifest, raw


def _verify_bytes(p: Path, data: bytes, public_key_path: str | Path) -> dict[str, Any]:
    sig = signature_path(p)
    manifest, raw = _parse_signature(p, sig)
    key = _load_public(public_key_path)
    try:
        key.verify(raw, _canonical(manifest))
    except InvalidSignature:
        raise SignatureError(
            f"refusing {p}: signature {sig} does not verify against the federation public key "
            f"{public_key_path} ({_fingerprint(key)}); the signature file was altered or made with another "
            "key. Do not use this model; ask the coordinator for a correctly signed copy"
        ) from None
    if manifest["file"] != p.name:
        raise SignatureError(
            f"refusing {p}: its signature {sig} was made for a file named {manifest['file']!r}; "
            "a signed model may not be renamed or swapped for another"
        )
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != manifest["size"] or digest != manifest["sha256"]:
        raise SignatureError(
            f"refusing {p}: its contents changed after signing (sha256 {digest} but signed "
            f"{manifest['sha256']}); the model was tampered with or corrupted"
        )
    return dict(manifest)


def verify_file(path: str | Path, public_key_path: str | Path) -> dict[str, Any]:
    """Verify ``path`` against ``path + ".sig"``; return the verified manifest or raise SignatureError.

    To avoid a check-then-use race, load the model from the bytes :func:`read_verified_bytes` returns.
    """
    p = Path(path)
    if not p.is_file():
        raise SignatureError(f"cannot verify {p}: file not found")
    return _verify_bytes(p, p.read_bytes(), public_key_path)


def read_verified_bytes(path: str | Path, public_key_path: str | Path) -> bytes:
    """Read ``path`` once, verify those exact bytes, and return them (raise SignatureError otherwise)."""
    p = Path(path)
    if not p.is_file():
        raise SignatureError(f"cannot verify {p}: file not found")
    data = p.read_bytes()
    _verify_bytes(p, data, public_key_path)
    return data


# ------------------------------------------------------------------------------------- app (FAB) signing
# Flower 1.41 SuperNodes started with ``--trusted-entities FILE`` run an app package (FAB) only if its
# ``verifications`` hold a record ``{key_id: '{"signature": <b64url>, "signed_at": <int>}'}`` whose Ed25519
# signature over ``signed_at.to_bytes(8, "big") + sha256(fab)`` verifies against the key FILE maps ``key_id``
# to (flwr/supernode/start_client_internal.py: _verify_fab; flwr/supercore/primitives/asymmetric_ed25519.py:
# create_message_to_sign). fedprop's app-signing key is an Ed25519 key in the same files as a model-signing
# key (generate_keypair); the key id is derived from its fingerprint, so a partner pins both at once.

APP_KEY_ID_PREFIX = "fpk_"


def app_key_id(public_key_path: str | Path) -> str:
    """The trusted-entity id of an app-signing public key: ``fpk_`` + the first 32 hex digits of its SHA-256."""
    return APP_KEY_ID_PREFIX + public_key_fingerprint(public_key_path).split(":", 1)[1][:32]


def trusted_entities_yaml(public_key_path: str | Path, *, expected_fingerprint: str | None = None) -> str:
    """The ``--trusted-entities`` YAML for exactly one pinned app-signing key (OpenSSH ``ssh-ed25519`` line).

    With ``expected_fingerprint`` the key must have that fingerprint (compared out of band at onboarding),
    else SigningKeyError: a partner never trusts a key file only because it was handed one.
    """
    key = _load_public(public_key_path)
    got = _fingerprint(key)
    if expected_fingerprint is not None and got != expected_fingerprint.strip():
        raise SigningKeyError(
            f"app-signing key {public_key_path} has fingerprint {got}, not the pinned {expected_fingerprint.strip()}; "
            "do not start the node with it: ask the coordinator for the key over a channel you trust"
        )
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode("ascii")
    return f"{app_key_id(public_key_path)}: '{line} fedprop-app-signing'\n"


def sign_fab(fab: bytes, private_key_path: str | Path, *, signed_at: int | None = None) -> dict[str, str]:
    """Flower ``Fab.verifications`` entries signing ``fab`` (the exact bytes submitted) with the app key."""
    import time

    key = _load_private(private_key_path)
    when = int(time.time()) if signed_at is None else int(signed_at)
    message = when.to_bytes(8, byteorder="big") + hashlib.sha256(fab).digest()
    signature = base64.urlsafe_b64encode(key.sign(message)).decode("ascii").rstrip("=")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key_id = APP_KEY_ID_PREFIX + hashlib.sha256(raw).hexdigest()[:32]
    return {key_id: json.dumps({"signature": signature, "signed_at": when}, sort_keys=True)}
