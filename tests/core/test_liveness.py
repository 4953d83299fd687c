"""A round needs only strategy.min_partners online (default: half), and waits at most strategy.round_timeout."""
from federation.config import from_dict, min_partners
from server.strategy import build_strategy


def test_default_keeps_going_without_one_of_three_partners():
    cfg = from_dict({"partners": 3})
    s = build_strategy(cfg, heads=("churn", "propensity"), num_partners=3)
    assert min_partners(cfg) == 2 and s.min_available_nodes == 2 and s.min_train_nodes == 2


def test_explicit_minimum_and_timeout():
    cfg = from_dict({"partners": 5, "strategy": {"min_partners": 5, "round_timeout": 30.0}})
    assert build_strategy(cfg, heads=("churn",), num_partners=5).min_available_nodes == 5
    assert min_partners(from_dict({"partners": 1})) == 1
