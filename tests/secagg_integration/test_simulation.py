"""Secure FedAvg on Flower's real simulation engine (Ray), through simulations/simulate.py:run_simulation."""
from __future__ import annotations

import json
import time

import pytest

from simulations.simulate import run_simulation

from .conftest import tiny_config


@pytest.mark.slow  # ~75 s on 2 cores (Ray start, per-process data + DP calibration); in-process tests cover the loop
def test_secagg_federation_on_the_simulation_engine(tmp_path):
    cfg = tiny_config(tmp_path)  # 3 partners, 2 rounds, DP-SGD at every partner, secagg.enabled
    t0 = time.perf_counter()
    summary = run_simulation(cfg, tmp_path)
    rounds = json.loads((tmp_path / "federated_rounds.json").read_text())["churn+propensity"]
    assert [r["secagg"]["survivors"] for r in rounds] == [3, 3]
    assert summary["tasks"]["churn"]["federated_dp_auc"] > 0.6
    assert (tmp_path / "model_churn+propensity.pt").exists() and (tmp_path / "FEDERATION_DONE").exists()
    print(f"secagg simulation: {time.perf_counter() - t0:.1f} s; per round "
          f"{[round(r['wall_s'], 2) for r in rounds]} s (secure sum {[round(r['secagg']['secure_sum_s'], 2) for r in rounds]} s)")
