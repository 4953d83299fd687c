"""A coordinator that bends the round plan, through the real ClientApp (DP-SGD train handler) and the real
server loop: partners recompute the plan from their own config and refuse; nothing aggregates, and the run
reports rounds_aggregated == 0 so that nothing is released."""
from __future__ import annotations

from dataclasses import replace

import pytest

import server.secure_fedavg as SF
from clients.client_app import make_client_app
from federation.secagg.primitives import QuantizationSpec
from federation.secure_fedavg import plan_round
from flwr.app import ArrayRecord
from server.secure_fedavg import run_secure_fedavg
from simulations.partners import load_partner

from .conftest import InProcessGrid, tiny_config


def _run(cfg, tmp_path, monkeypatch, bend=None):
    if bend is not None:
        monkeypatch.setattr(SF, "plan_round", lambda c, **kw: bend(plan_round(c, **kw)))
    import torch

    from federation.featurespec import feature_names
    from federation.models import build_model

    model = build_model(cfg.model, n_features=len(feature_names(cfg.data)), n_outputs=2)
    grid = InProcessGrid(make_client_app(config=cfg, loader=load_partner), cfg.partners)
    rounds = []
    result = run_secure_fedavg(grid, cfg, heads=("churn", "propensity"), initial=ArrayRecord(model.state_dict()),
                               run_dir=tmp_path, run_id="t", on_round=rounds.append, checkpoint=lambda r, a: None)
    del torch
    return result, rounds


@pytest.mark.parametrize("bend", ["tiny-clip", "low-threshold", "more-bits"])
def test_partners_refuse_a_plan_that_differs_from_their_config(tmp_path, monkeypatch, caplog, bend):
    off = {"enabled": False, "ledger_dir": str(tmp_path / "ledgers")}  # plan checks happen before any training
    cfg = tiny_config(tmp_path, partners=5, rounds=1, privacy=off, secagg={"enabled": True, "threshold_fraction": 0.9})
    change = {
        "tiny-clip": lambda p: replace(p, quantization=replace(p.quantization, clip=1e-6)),
        "low-threshold": lambda p: replace(p, threshold=3),  # still a majority of 5 holders, below the config's 5
        "more-bits": lambda p: replace(p, quantization=QuantizationSpec(
            clip=p.quantization.clip, modulus_bits=60, max_summands=p.quantization.max_summands,
            rounding=p.quantization.rounding)),
    }[bend]
    result, rounds = _run(cfg, tmp_path, monkeypatch, change)
    assert result.rounds_aggregated == 0 and set(result.rounds_aborted) == {1}
    assert len(rounds[0]["refusals"]) == 5 and all(e["stage"] == "masked_input" for e in rounds[0]["refusals"])
    # the reply carries only a code; the node's own log says why
    logged = [str(r.exc_info[1]) for r in caplog.records if r.exc_info]
    assert len(logged) == 5 and all("differs from this node's run config" in m for m in logged)


def test_an_honest_plan_aggregates(tmp_path, monkeypatch):
    off = {"enabled": False, "ledger_dir": str(tmp_path / "ledgers")}
    cfg = tiny_config(tmp_path, partners=3, rounds=1, privacy=off)
    result, rounds = _run(cfg, tmp_path, monkeypatch)
    assert result.rounds_aggregated == 1 and rounds[0]["secagg"]["survivors"] == 3
    assert rounds[0]["secagg"]["excluded"] == {}
