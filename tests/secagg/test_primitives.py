"""Primitives: key agreement, mask PRG, share encryption, Shamir sharing, quantization."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from federation.errors import FedpropError
from federation.secagg.primitives import (
    SHAMIR_PRIME,
    InsufficientSurvivorsError,
    QuantizationSpec,
    SecAggError,
    agree,
    decrypt_share,
    dequantize_sum,
    encrypt_share,
    generate_keypair,
    lagrange_at_zero,
    prg_words,
    public_key_of,
    quantize,
    shamir_reconstruct,
    shamir_split,
)

ROUND = b"round-0001-abcdef"


def seeded_entropy(seed: int):
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


# ------------------------------------------------------------------------------------ key agreement
def test_agreement_is_symmetric_and_domain_separated() -> None:
    a, b = generate_keypair(), generate_keypair()
    k_ab = agree(private_key=a.private, peer_public_key=b.public, purpose=b"p", round_id=ROUND)
    k_ba = agree(private_key=b.private, peer_public_key=a.public, purpose=b"p", round_id=ROUND)
    assert k_ab == k_ba and len(k_ab) == 32
    assert k_ab != agree(private_key=a.private, peer_public_key=b.public, purpose=b"q", round_id=ROUND)
    assert k_ab != agree(private_key=a.private, peer_public_key=b.public, purpose=b"p", round_id=b"round-0002-abcdef")
    assert public_key_of(private_key=a.private) == a.public
    assert "private=<redacted>" in repr(a) and a.private.hex() not in repr(a)


def test_low_order_public_key_is_rejected() -> None:
    a = generate_keypair()
    with pytest.raises(SecAggError, match="low order"):
        agree(private_key=a.private, peer_public_key=b"\x00" * 32, purpose=b"p", round_id=ROUND)


# ---------------------------------------------------------------------------------------------- PRG
def test_prg_is_deterministic_and_separated() -> None:
    seed = bytes(range(32))
    w = prg_words(seed=seed, domain=b"pair", round_id=ROUND, length=1000, modulus_bits=32)
    assert w.dtype == np.uint64 and w.shape == (1000,)
    assert np.array_equal(w, prg_words(seed=seed, domain=b"pair", round_id=ROUND, length=1000, modulus_bits=32))
    others = [
        prg_words(seed=bytes(range(1, 33)), domain=b"pair", round_id=ROUND, length=1000, modulus_bits=32),
        prg_words(seed=seed, domain=b"self", round_id=ROUND, length=1000, modulus_bits=32),
        prg_words(seed=seed, domain=b"pair", round_id=b"round-0002-abcdef", length=1000, modulus_bits=32),
    ]
    for o in others:
        assert (o == w).mean() < 0.01  # independent streams: ~1000 * 2**-32 collisions expected
    # A prefix of a longer stream is the shorter stream.
    assert np.array_equal(prg_words(seed=seed, domain=b"pair", round_id=ROUND, length=10, modulus_bits=32), w[:10])


@pytest.mark.parametrize("bits", [8, 16, 32, 63, 64])
def test_prg_range_and_uniformity(bits: int) -> None:
    w = prg_words(seed=b"k" * 32, domain=b"pair", round_id=ROUND, length=40_000, modulus_bits=bits)
    if bits < 64:
        assert int(w.max()) < 2**bits
    top = (w >> np.uint64(bits - 8)).astype(np.int64)  # the 8 highest bits of each word
    _, p = stats.chisquare(np.bincount(top, minlength=256))
    assert p > 1e-3
    assert stats.kstest(w.astype(np.float64) / 2.0**bits, "uniform").pvalue > 1e-3


# --------------------------------------------------------------------------------------------- AEAD
def test_share_encryption_round_trip_and_tamper_rejection() -> None:
    key, ad, msg = b"\x01" * 32, b"round|1|2", b"share bytes" * 12
    ct = encrypt_share(key=key, plaintext=msg, associated_data=ad)
    assert decrypt_share(key=key, ciphertext=ct, associated_data=ad) == msg
    assert msg not in ct
    for i in (0, 13, len(ct) - 1):  # nonce, body, tag
        bad = bytearray(ct)
        bad[i] ^= 0x01
        with pytest.raises(SecAggError, match="failed authentication"):
            decrypt_share(key=key, ciphertext=bytes(bad), associated_data=ad)
    with pytest.raises(SecAggError):  # same ciphertext presented as coming from another sender
        decrypt_share(key=key, ciphertext=ct, associated_data=b"round|3|2")
    with pytest.raises(SecAggError):
        decrypt_share(key=b"\x02" * 32, ciphertext=ct, associated_data=ad)
    with pytest.raises(SecAggError, match="too short"):
        decrypt_share(key=key, ciphertext=ct[:20], associated_data=ad)


# ------------------------------------------------------------------------------------------- Shamir
@pytest.mark.parametrize("threshold,n", [(2, 3), (3, 5), (4, 7), (5, 5)])
def test_shamir_any_t_shares_reconstruct_and_t_minus_1_do_not(threshold: int, n: int) -> None:
    secret = bytes(range(100, 132))
    shares = shamir_split(secret=secret, threshold=threshold, xs=range(1, n + 1), entropy=seeded_entropy(threshold))
    assert all(len(s) == 66 for s in shares.values())
    for subset in itertools.combinations(shares, threshold):
        sub = {x: shares[x] for x in subset}
        assert shamir_reconstruct(shares=sub, threshold=threshold, secret_length=32) == secret
    target = int.from_bytes(secret, "big")
    for subset in itertools.combinations(shares, threshold - 1):
        assert lagrange_at_zero({x: shares[x] for x in subset}) != target
        with pytest.raises(InsufficientSurvivorsError):
            shamir_reconstruct(shares={x: shares[x] for x in subset}, threshold=threshold, secret_length=32)


def test_shamir_single_share_is_independent_of_secret() -> None:
    # With the same coefficients, two secrets' shares differ exactly by the secrets' difference...
    s1 = shamir_split(secret=b"\x00" * 32, threshold=3, xs=[1, 2, 3], entropy=seeded_entropy(7))
    s2 = shamir_split(secret=b"\x00" * 31 + b"\x01", threshold=3, xs=[1, 2, 3], entropy=seeded_entropy(7))
    assert all((int.from_bytes(s2[x], "big") - int.from_bytes(s1[x], "big")) % SHAMIR_PRIME == 1 for x in s1)
    # ...and fresh randomness gives unrelated shares for the same secret.
    s3 = shamir_split(secret=b"\x00" * 32, threshold=3, xs=[1, 2, 3], entropy=seeded_entropy(8))
    assert all(s1[x] != s3[x] for x in s1)


def test_shamir_inconsistent_shares_and_bad_parameters() -> None:
    shares = shamir_split(secret=b"s" * 32, threshold=3, xs=[1, 2, 3, 4])
    shares[2] = (int.from_bytes(seeded_entropy(3)(66), "big") % SHAMIR_PRIME).to_bytes(66, "big")  # garbage share
    with pytest.raises(SecAggError, match="inconsistent"):
        shamir_reconstruct(shares={x: shares[x] for x in (1, 2, 3)}, threshold=3, secret_length=32)
    with pytest.raises(SecAggError):
        shamir_split(secret=b"s", threshold=5, xs=[1, 2, 3])
    with pytest.raises(SecAggError):
        shamir_split(secret=b"s", threshold=2, xs=[1, 1, 3])
    with pytest.raises(SecAggError):
        shamir_split(secret=b"s", threshold=2, xs=[0, 1, 3])


# ------------------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("bits,n", [(16, 4), (32, 10), (32, 1000), (64, 100)])
def test_quantization_nearest_error_bound(bits: int, n: int) -> None:
    spec = QuantizationSpec(clip=0.5, modulus_bits=bits, max_summands=n)
    rng = np.random.default_rng(bits + n)
    xs = rng.uniform(-0.7, 0.7, size=(n, 500))
    q = [quantize(values=x, spec=spec) for x in xs]
    assert all(int(v.max()) <= spec.levels for v in q)
    total = np.zeros(500, dtype=np.uint64)
    for v in q:
        total += v
    assert int(total.max()) <= 2**bits - 1  # no wrap even at n = max_summands
    est = dequantize_sum(total=total, num_summands=n, spec=spec)
    err = np.abs(est - np.clip(xs, -0.5, 0.5).sum(axis=0)).max()
    assert err <= spec.sum_error_bound(n)


def test_quantization_extremes_never_wrap() -> None:
    spec = QuantizationSpec(clip=1.0, modulus_bits=16, max_summands=7)
    q = quantize(values=np.full(3, 5.0), spec=spec)
    assert int(q[0]) == spec.levels and 7 * spec.levels <= 2**16 - 1
    est = dequantize_sum(total=q * np.uint64(7), num_summands=7, spec=spec)
    assert np.allclose(est, 7.0)


def test_quantization_stochastic_is_unbiased_and_bounded() -> None:
    spec = QuantizationSpec(clip=1.0, modulus_bits=16, max_summands=4, rounding="stochastic")
    x = np.full(20_000, 0.123456)
    q = quantize(values=x, spec=spec, rng=np.random.default_rng(0))
    vals = q.astype(np.float64) * spec.step - spec.clip
    assert np.abs(vals - x).max() < spec.sum_error_bound(1)
    assert abs(vals.mean() - 0.123456) < 5 * spec.step / np.sqrt(x.size)
    with pytest.raises(SecAggError, match="needs an rng"):
        quantize(values=x, spec=spec)


def test_quantization_validation() -> None:
    with pytest.raises(SecAggError) as exc:
        QuantizationSpec(clip=-1.0, modulus_bits=70, max_summands=0, rounding="up")  # type: ignore[arg-type]
    assert isinstance(exc.value, FedpropError) and isinstance(exc.value, ValueError)
    for part in ("clip", "modulus_bits", "max_summands", "rounding"):
        assert part in str(exc.value)
    with pytest.raises(SecAggError, match="too small"):
        QuantizationSpec(clip=1.0, modulus_bits=8, max_summands=200)
    spec = QuantizationSpec(clip=1.0)
    with pytest.raises(SecAggError, match="finite"):
        quantize(values=np.array([0.0, np.nan]), spec=spec)
    with pytest.raises(SecAggError):
        dequantize_sum(total=np.zeros(2, dtype=np.uint64), num_summands=spec.max_summands + 1, spec=spec)
