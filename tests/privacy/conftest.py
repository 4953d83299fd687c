"""Shared fixtures: node keys generated per test in tmp_path (no key material is committed)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from federation.privacy import Ledger, PoissonSampledGaussian, generate_node_key

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=timezone.utc)
ROUND_EVENT = PoissonSampledGaussian(sampling_rate=0.02, noise_multiplier=1.1, steps=50)


@pytest.fixture
def node_key(tmp_path):
    path = tmp_path / "node.key"
    generate_node_key(path)
    return path


def append_round(ledger: Ledger, *, run_id: str, rnd: int, when: datetime, event=ROUND_EVENT, partner="acme"):
    return ledger.append(
        kind="dpsgd_round", partner=partner, run_id=run_id, round=rnd, delta=1e-5, mechanism=event,
        clipping_norm=1.0, config_hash="c" * 64, update_hash=f"{rnd:064x}", timestamp=when,
    )


@pytest.fixture
def filled_ledger(tmp_path, node_key):
    """A ledger with 6 entries: run_start + 3 rounds + run_start + 1 round (seq 1..6)."""
    path = tmp_path / "ledger.db"
    with Ledger.open(path, signing_key=node_key) as ledger:
        t = T0
        for run_id, rounds in (("r1", 3), ("r2", 1)):
            ledger.append(kind="run_start", partner="acme", run_id=run_id, timestamp=t)
            for rnd in range(1, rounds + 1):
                t += timedelta(minutes=10)
                append_round(ledger, run_id=run_id, rnd=rnd, when=t)
    return path
