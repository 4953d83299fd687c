"""Where a partner node's privacy randomness comes from: DP-SGD noise and Poisson sampling.

Three modes (``privacy.noise`` in the config; the ledger records which one ran):

``secure`` (default)
    A ChaCha20 keystream (``cryptography``, OpenSSL) keyed with 256 bits from the OS CSPRNG
    (``os.urandom``) for every release: nobody, the coordinator included, can predict or replay it. Uniforms
    carry 53 random bits; Gaussians come from Box-Muller in float64, and each noise coordinate is the sum of
    four such Gaussians divided by two (Opacus ``secure_mode``, following Holohan and Braghin 2021,
    arXiv:2107.10138 section 5.1): this raises the cost of the floating-point attacks on Gaussian noise
    (Jin et al. 2022, arXiv:2112.05307) from about 2^53 to about 2^159 guesses. It does not make the
    floating-point Gaussian exact; evaluation releases, which are integer counts, use the exact discrete
    Gaussian instead (``federation/privacy/discrete.py``).
``fast``
    torch's Mersenne Twister, seeded per release with 63 bits from ``secrets``: unpredictable seed, but not a
    cryptographic generator and no floating-point hardening. Opacus's secure-RNG warning is shown.
``reproducible``
    torch's generator seeded from the run config's ``seed``, partner and round. Anyone who knows the seed
    (the coordinator chooses it) can replay the noise and remove it: **no privacy guarantee** against them.
    For tests and research only; every report and model card says so in its first lines.
"""
from __future__ import annotations

import math
import os
import secrets
import warnings

import numpy as np
import torch

NOISE_MODES = ("secure", "fast", "reproducible")

REPRODUCIBLE_WARNING = (
    "privacy.noise=reproducible: DP noise and sampling are derived from the run config's seed. Anyone who knows "
    "the seed (the coordinator chose it) can replay the noise: this run gives NO differential-privacy guarantee "
    "against them. Use it for tests and research only."
)

_U53 = 2.0 ** -53


class ChaChaNoise:
    """Cryptographic randomness for DP: a ChaCha20 keystream from a fresh 256-bit OS key.

    ``rand(n)`` gives float64 uniforms on [0, 1) with 53 random bits; ``gaussian(shape, std)`` gives
    N(0, std^2) noise as the sum of four Box-Muller Gaussians over two (see the module docstring).
    """

    _CHUNK = 1 << 20  # keystream bytes drawn at a time

    def __init__(self, key: bytes | None = None) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        key = os.urandom(32) if key is None else key
        if len(key) != 32:
            raise ValueError("ChaChaNoise needs a 32-byte key")
        # 16-byte ChaCha20 "nonce" = 4-byte block counter + 12-byte nonce; a fresh key per source, so zeros.
        self._enc = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
        self.device = torch.device("cpu")

    def _words(self, n: int) -> np.ndarray:
        return np.frombuffer(self._enc.update(bytes(8 * n)), dtype=np.uint64)

    def uniform(self, n: int) -> np.ndarray:
        """n float64 uniforms on [0, 1), 53 random bits each."""
        return (self._words(n) >> np.uint64(11)).astype(np.float64) * _U53

    def rand(self, n: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.from_numpy(self.uniform(n)).to(dtype=dtype, device=device or "cpu")

    def standard_normal(self, n: int) -> np.ndarray:
        """n float64 N(0, 1) draws by Box-Muller (u1 on (0, 1], so the log is finite)."""
        m = (n + 1) // 2
        w = self._words(2 * m) >> np.uint64(11)
        u1 = (w[:m].astype(np.float64) + 1.0) * _U53
        u2 = w[m:].astype(np.float64) * _U53
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.empty(2 * m)
        z[:m] = r * np.cos(2.0 * math.pi * u2)
        z[m:] = r * np.sin(2.0 * math.pi * u2)
        return z[:n]

    def gaussian(self, shape: torch.Size | tuple[int, ...], std: float, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """N(0, std^2) per coordinate: (z1 + z2 + z3 + z4) / 2 with z_i ~ N(0, 1), times std."""
        n = math.prod(shape)
        acc = self.standard_normal(4 * n).reshape(4, n).sum(axis=0)
        acc *= 0.5 * float(std)
        return torch.from_numpy(acc.reshape(tuple(shape))).to(dtype=dtype, device=device or "cpu")


    def normal(self, loc: float, scale: float, size) -> np.ndarray:
        """numpy Generator.normal's signature (float64), from the keystream: for code written against numpy."""
        shape = (size,) if isinstance(size, int) else tuple(size)
        return loc + self.gaussian(shape, scale, dtype=torch.float64).numpy()


NoiseSource = "torch.Generator | ChaChaNoise"


def make_noise_source(mode: str, *, seed_material: tuple[int, ...] = ()) -> torch.Generator | ChaChaNoise:
    """A fresh randomness source for one release (one round of one partner)."""
    if mode == "secure":
        return ChaChaNoise()
    if mode == "fast":
        return torch.Generator().manual_seed(secrets.randbits(63))
    if mode == "reproducible":
        warnings.warn(REPRODUCIBLE_WARNING, UserWarning, stacklevel=2)
        return torch.Generator().manual_seed(int(np.random.default_rng(list(seed_material)).integers(2**62)))
    raise ValueError(f"privacy.noise={mode!r} is not allowed; use one of {', '.join(NOISE_MODES)}")


def uniform(source: torch.Generator | ChaChaNoise | None, n: int, *, device: torch.device | str,
            dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """n uniforms on [0, 1) from either kind of source (Poisson sampling)."""
    if isinstance(source, ChaChaNoise):
        return source.rand(n, dtype=dtype, device=device)
    return torch.rand(n, generator=source, device=device, dtype=dtype)


def source_device(source: torch.Generator | ChaChaNoise | None) -> torch.device:
    return source.device if source is not None else torch.device("cpu")
