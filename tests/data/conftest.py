from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from federation.contract import data_dir

DATA = data_dir()


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (DATA / "telco_churn").is_dir():
        pytest.skip(f"real datasets not found at {DATA} (set FEDPROP_DATA_DIR or place ../shared/data beside the checkout)")
    return DATA
