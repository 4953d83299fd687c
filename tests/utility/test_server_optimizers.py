"""server/optimizers.py: FedAvgM and tail averaging are exactly the arithmetic they claim."""
from __future__ import annotations

import pytest
import torch

from server.optimizers import ServerOptimizer


def _sd(v):
    return {"w": torch.tensor([float(v)])}


def test_default_is_plain_fedavg_and_releases_the_last_model():
    opt = ServerOptimizer(rounds=3)
    for r, agg in enumerate([1.0, 2.0, 5.0]):
        new = opt.step(_sd(r), _sd(agg))
        assert float(new["w"]) == agg
    assert float(opt.released()["w"]) == 5.0


def test_fedavgm_momentum_accumulates_pseudo_gradients():
    opt = ServerOptimizer(rounds=2, momentum=0.5, lr=2.0)
    new = opt.step(_sd(0.0), _sd(1.0))  # v = 1, w = 0 + 2 * 1
    assert float(new["w"]) == 2.0
    new = opt.step(new, _sd(3.0))  # delta = 1, v = 0.5 + 1 = 1.5, w = 2 + 3
    assert float(new["w"]) == 5.0


def test_tail_average_is_the_mean_of_the_last_rounds():
    opt = ServerOptimizer(rounds=4, tail=0.5)
    g = _sd(0.0)
    for agg in (10.0, 20.0, 30.0, 50.0):
        g = opt.step(g, _sd(agg))
    assert float(opt.released()["w"]) == pytest.approx(40.0)
    assert float(g["w"]) == 50.0  # the next round still trains from the last global model


@pytest.mark.parametrize("kw", [{"momentum": 1.0}, {"lr": 0.0}, {"tail": 1.5}, {"rounds": 0}])
def test_bad_parameters_are_refused(kw):
    args = {"rounds": 3, **kw}
    with pytest.raises(ValueError):
        ServerOptimizer(**args)


def test_release_before_any_round_is_refused():
    with pytest.raises(ValueError, match="no round"):
        ServerOptimizer(rounds=2).released()
