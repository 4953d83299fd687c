"""Cryptographic and arithmetic building blocks of fedprop's secure aggregation.

Nothing here knows about Flower. Every primitive is domain-separated with a protocol label and the caller's
round id, so keys, masks and ciphertexts of one round are useless in any other round.

* Key agreement: X25519 (``cryptography``), the raw shared secret is never used directly: it goes through
  HKDF-SHA256 with an ``info`` naming the purpose (encryption key or mask seed) and the round id.
* Mask PRG: ChaCha20 keystream (256-bit key derived by HKDF from the seed and a domain string that includes
  the round id), read as little-endian uint64 words and reduced modulo ``2**modulus_bits``. Security rests on
  ChaCha20, not on a 32-bit seeded ``numpy.random`` generator.
* Authenticated encryption of Shamir shares: ChaCha20-Poly1305 with a fresh 96-bit nonce and associated data
  binding round id, sender and recipient; any tampering raises :class:`SecAggError`.
* Shamir t-of-n secret sharing over the Mersenne prime field GF(2**521 - 1) with Lagrange interpolation at 0.
* Quantization of clipped float vectors to integers in ``[0, levels]`` with head-room so that the sum of up to
  ``max_summands`` such integers never wraps modulo ``2**modulus_bits``; see :class:`QuantizationSpec`.
"""
from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from federation.errors import FedpropError

__all__ = [
    "PROTOCOL_LABEL",
    "SHAMIR_PRIME",
    "Entropy",
    "QuantizationSpec",
    "SecAggError",
    "AggregateRejectedError",
    "InsufficientSurvivorsError",
    "RoundAbortedError",
    "KeyPair",
    "agree",
    "decrypt_share",
    "dequantize_sum",
    "derive_key",
    "encrypt_share",
    "generate_keypair",
    "lagrange_at",
    "lagrange_at_zero",
    "prg_words",
    "public_key_of",
    "quantize",
    "shamir_reconstruct",
    "shamir_split",
]

PROTOCOL_LABEL = b"fedprop/secagg/v1"
SHAMIR_PRIME = (1 << 521) - 1  # Mersenne prime M521; secrets are 32-byte strings, far below it.
_SHARE_BYTES = 66  # ceil(521 / 8)
_NONCE_BYTES = 12

Entropy = Callable[[int], bytes]
"""A source of uniformly random bytes: ``entropy(n) -> n bytes``. Production code uses ``os.urandom``;
tests inject a seeded deterministic source so that statistical tests are reproducible."""


class SecAggError(FedpropError):
    """Secure aggregation cannot proceed safely: invalid parameters, a bad message, or a failed check."""


class RoundAbortedError(SecAggError):
    """This round of secure aggregation ends without an aggregate (nothing is released); the next may succeed."""


class InsufficientSurvivorsError(RoundAbortedError):
    """Too many participants dropped out: fewer than the threshold remain, so the round is aborted."""


class AggregateRejectedError(RoundAbortedError):
    """The unmasked aggregate fails a range check (a hostile client's input or share): it is not released."""


# ----------------------------------------------------------------------------------------------- keys
@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair as raw 32-byte strings. The private half must never leave the node."""

    private: bytes
    public: bytes

    def __repr__(self) -> str:  # never print private keys
        return f"KeyPair(public={self.public.hex()[:16]}..., private=<redacted>)"


def generate_keypair(*, entropy: Entropy = os.urandom) -> KeyPair:
    """Generate an X25519 key pair from 32 bytes of ``entropy`` (clamping is done by X25519 itself)."""
    sk = X25519PrivateKey.from_private_bytes(_take(entropy, 32))
    return KeyPair(private=sk.private_bytes_raw(), public=sk.public_key().public_bytes_raw())


def public_key_of(*, private_key: bytes) -> bytes:
    """The raw public key that belongs to a raw X25519 private key."""
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


def derive_key(*, secret: bytes, purpose: bytes, round_id: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256(secret) with info = label | purpose | round id (each length-prefixed)."""
    info = _encode_parts(PROTOCOL_LABEL, purpose, round_id)
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def agree(*, private_key: bytes, peer_public_key: bytes, purpose: bytes, round_id: bytes) -> bytes:
    """X25519 Diffie-Hellman followed by HKDF: a 32-byte key both parties derive identically.

    Raises SecAggError for a malformed or low-order peer key (an all-zero shared secret).
    """
    try:
        sk = X25519PrivateKey.from_private_bytes(private_key)
        shared = sk.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
    except ValueError as exc:
        raise SecAggError(
            f"X25519 key agreement failed ({exc}); the peer's public key is malformed or of low order. "
            "A party sending such a key must be excluded from the round."
        ) from exc
    return derive_key(secret=shared, purpose=purpose, round_id=round_id)


# ------------------------------------------------------------------------------------------------ PRG
def prg_words(*, seed: bytes, domain: bytes, round_id: bytes, length: int, modulus_bits: int) -> np.ndarray:
    """Expand ``seed`` into ``length`` uniform integers modulo ``2**modulus_bits`` (uint64 array).

    The ChaCha20 key is HKDF(seed, info=label|"mask"|domain|round_id), so distinct domains (self mask, pair
    mask) and distinct rounds give independent streams even for the same seed. Reducing a uniform 64-bit
    word modulo a power of two keeps it exactly uniform.
    """
    _check_modulus_bits(modulus_bits)
    if length < 0:
        raise SecAggError(f"PRG length must be >= 0, got {length}.")
    key = derive_key(secret=seed, purpose=b"mask|" + domain, round_id=round_id)
    encryptor = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    stream = encryptor.update(b"\x00" * (8 * length))
    words = np.frombuffer(stream, dtype="<u8").astype(np.uint64)
    return words & _modulus_mask(modulus_bits)


# ------------------------------------------------------------------------------------------------ AEAD
def encrypt_share(*, key: bytes, plaintext: bytes, associated_data: bytes, entropy: Entropy = os.urandom) -> bytes:
    """ChaCha20-Poly1305 encryption: ``nonce || ciphertext+tag``. ``associated_data`` is authenticated."""
    nonce = _take(entropy, _NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data)


def decrypt_share(*, key: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """Decrypt and authenticate; raises SecAggError if the ciphertext or its context was tampered with."""
    if len(ciphertext) < _NONCE_BYTES + 16:
        raise SecAggError(f"Encrypted share is {len(ciphertext)} bytes, too short to be valid.")
    try:
        return ChaCha20Poly1305(key).decrypt(ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:], associated_data)
    except InvalidTag as exc:
        raise SecAggError(
            "An encrypted share failed authentication: it was tampered with, misrouted, or belongs to another "
            "round. The share is rejected; its sender is treated as untrustworthy for this round."
        ) from exc


# ---------------------------------------------------------------------------------------------- Shamir
def shamir_split(
    *, secret: bytes, threshold: int, xs: Sequence[int], entropy: Entropy = os.urandom
) -> dict[int, bytes]:
    """Split ``secret`` (at most 64 bytes) into shares at the points ``xs`` (distinct, 1 <= x < p).

    Any ``threshold`` shares reconstruct the secret; fewer reveal nothing about it (information-theoretic).
    Returns ``{x: share_bytes}``, each share the 66-byte big-endian field element f(x).
    """
    if len(secret) > 64:
        raise SecAggError(f"Shamir secret must be at most 64 bytes, got {len(secret)}.")
    xs = list(xs)
    if len(set(xs)) != len(xs) or any(not 0 < x < SHAMIR_PRIME for x in xs):
        raise SecAggError("Shamir share points must be distinct integers in [1, p).")
    if not 1 <= threshold <= len(xs):
        raise SecAggError(f"Shamir threshold must be in [1, {len(xs)}] for {len(xs)} shares, got {threshold}.")
    coeffs = [int.from_bytes(secret, "big")]
    for _ in range(threshold - 1):
        # 82 random bytes reduced mod p: statistical distance from uniform < 2**-130.
        coeffs.append(int.from_bytes(_take(entropy, 82), "big") % SHAMIR_PRIME)
    shares: dict[int, bytes] = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % SHAMIR_PRIME
        shares[x] = acc.to_bytes(_SHARE_BYTES, "big")
    return shares


def lagrange_at(shares: dict[int, bytes], at: int) -> int:
    """Interpolate the polynomial through ``shares`` and evaluate it at ``at`` (no threshold check)."""
    points = [(x, int.from_bytes(y, "big")) for x, y in shares.items()]
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (at - xj) % SHAMIR_PRIME
                den = den * (xi - xj) % SHAMIR_PRIME
        total = (total + yi * num * pow(den, -1, SHAMIR_PRIME)) % SHAMIR_PRIME
    return total


def lagrange_at_zero(shares: dict[int, bytes]) -> int:
    """Interpolate the polynomial through ``shares`` and evaluate it at 0 (no threshold check)."""
    return lagrange_at(shares, 0)


def shamir_reconstruct(*, shares: dict[int, bytes], threshold: int, secret_length: int) -> bytes:
    """Reconstruct a ``secret_length``-byte secret from at least ``threshold`` shares.

    Raises InsufficientSurvivorsError with fewer than ``threshold`` shares, and SecAggError if the result is
    not a valid ``secret_length``-byte value (inconsistent shares).
    """
    if len(shares) < threshold:
        raise InsufficientSurvivorsError(
            f"Shamir reconstruction needs {threshold} shares, only {len(shares)} available."
        )
    value = lagrange_at_zero(dict(list(shares.items())[:threshold]))
    if value >> (8 * secret_length):
        raise SecAggError("Shamir reconstruction produced an out-of-range value: the shares are inconsistent.")
    return value.to_bytes(secret_length, "big")


# ---------------------------------------------------------------------------------------- quantization
@dataclass(frozen=True)
class QuantizationSpec:
    """How float updates become integers modulo ``2**modulus_bits`` and back.

    Each coordinate is clipped to ``[-clip, clip]`` and mapped affinely onto the integer grid ``{0..levels}``
    with ``levels = min((2**modulus_bits - 1) // max_summands, 2**44)``, so the sum of up to ``max_summands``
    quantized vectors is at most ``2**modulus_bits - 1`` and never wraps. The grid step is
    ``step = 2 * clip / levels``; the ``2**44`` cap keeps float64 rounding in ``quantize`` below ``step / 256``.

    Error bound (per coordinate, against the sum of the *clipped* inputs, for ``n`` summands)::

        n * (r * step + step / 64) + n * clip * 2**-49,   r = 1/2 for "nearest", r = 1 for "stochastic"

    ``r * step`` is the rounding error (stochastic rounding is unbiased); the two small terms bound float64
    arithmetic in ``quantize`` and ``dequantize_sum``. :meth:`sum_error_bound` returns this figure.
    """

    clip: float
    modulus_bits: int = 32
    max_summands: int = 1024
    rounding: Literal["nearest", "stochastic"] = "nearest"

    def __post_init__(self) -> None:
        problems = []
        if not (np.isfinite(self.clip) and self.clip > 0):
            problems.append(f"clip must be a finite positive float, got {self.clip!r}")
        if not (isinstance(self.modulus_bits, int) and 8 <= self.modulus_bits <= 64):
            problems.append(f"modulus_bits must be an int in [8, 64], got {self.modulus_bits!r}")
        if not (isinstance(self.max_summands, int) and self.max_summands >= 1):
            problems.append(f"max_summands must be a positive int, got {self.max_summands!r}")
        if self.rounding not in ("nearest", "stochastic"):
            problems.append(f"rounding must be 'nearest' or 'stochastic', got {self.rounding!r}")
        if not problems and self.levels < 2:
            problems.append(
                f"2**{self.modulus_bits} is too small for {self.max_summands} summands; raise modulus_bits"
            )
        if problems:
            raise SecAggError("Invalid QuantizationSpec: " + "; ".join(problems))

    @property
    def levels(self) -> int:
        return min(((1 << self.modulus_bits) - 1) // self.max_summands, 1 << 44)

    @property
    def step(self) -> float:
        return 2.0 * self.clip / self.levels

    def sum_error_bound(self, num_summands: int) -> float:
        """Worst-case per-coordinate error of a dequantized sum of ``num_summands`` clipped vectors."""
        rounding = self.step / 2 if self.rounding == "nearest" else self.step
        return num_summands * (rounding + self.step / 64) + num_summands * self.clip * 2.0**-49


def quantize(*, values: np.ndarray, spec: QuantizationSpec, rng: np.random.Generator | None = None) -> np.ndarray:
    """Clip and quantize a float vector to uint64 integers in ``[0, spec.levels]``.

    ``rng`` is required for ``rounding="stochastic"`` and must be None for ``"nearest"``.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise SecAggError(f"quantize expects a 1-D vector, got shape {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise SecAggError("quantize got NaN or infinite values; a client update must be finite.")
    scaled = (np.clip(x, -spec.clip, spec.clip) + spec.clip) * (spec.levels / (2.0 * spec.clip))
    if spec.rounding == "nearest":
        if rng is not None:
            raise SecAggError("rng must be None for rounding='nearest'.")
        q = np.floor(scaled + 0.5)
    else:
        if rng is None:
            raise SecAggError("rounding='stochastic' needs an rng (np.random.Generator).")
        low = np.floor(scaled)
        q = low + (rng.random(x.shape) < (scaled - low))
    return np.clip(q, 0, spec.levels).astype(np.uint64)


def dequantize_sum(*, total: np.ndarray, num_summands: int, spec: QuantizationSpec) -> np.ndarray:
    """Map the integer sum of ``num_summands`` quantized vectors back to floats (removes the n*clip offset)."""
    if not 1 <= num_summands <= spec.max_summands:
        raise SecAggError(f"num_summands must be in [1, {spec.max_summands}], got {num_summands}.")
    t = np.asarray(total, dtype=np.uint64)
    return t.astype(np.float64) * spec.step - num_summands * spec.clip


# ------------------------------------------------------------------------------------------- helpers
def _modulus_mask(modulus_bits: int) -> np.uint64:
    return np.uint64((1 << modulus_bits) - 1)


def _check_modulus_bits(modulus_bits: int) -> None:
    if not (isinstance(modulus_bits, int) and 1 <= modulus_bits <= 64):
        raise SecAggError(f"modulus_bits must be an int in [1, 64], got {modulus_bits!r}.")


def _take(entropy: Entropy, n: int) -> bytes:
    out = entropy(n)
    if len(out) != n:
        raise SecAggError(f"entropy source returned {len(out)} bytes, {n} requested.")
    return out


def _encode_parts(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def constant_time_equal(a: bytes, b: bytes) -> bool:
    """Compare secrets without a timing side channel."""
    return hmac.compare_digest(a, b)
