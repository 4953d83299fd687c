"""Every real dataset loads through its contract, validates clean and partitions into partners."""
from __future__ import annotations

import numpy as np
import pytest
import yaml

from federation.config import DataConfig, FedpropConfig, validate
from federation.contract import REPO_ROOT, load_contract
from federation.errors import ConfigError
from simulations.realdata import dirichlet_assignment, load_partner_features, num_natural_partners

DATASETS = {  # name -> (customers, positive rate of the contract's task, partners)
    "online_retail": (3370, 0.430, 4),
    "bank_marketing": (41188, 0.113, 4),
    "telco_churn": (7043, 0.265, 4),
    "iranian_churn": (2850, 0.156, 3),
}


def _cfg(name: str) -> DataConfig:
    return DataConfig(**yaml.safe_load((REPO_ROOT / "conf" / "data" / f"{name}.yaml").read_text()))


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_dataset_partitions_cover_every_customer_once(shared_data, name):
    n, rate, k = DATASETS[name]
    cfg = _cfg(name)
    validate(FedpropConfig(data=cfg))
    assert num_natural_partners(cfg) == k
    parts = [load_partner_features(cfg, partition_id=i, num_partitions=k, seed=0) for i in range(k)]
    ids = np.concatenate([p.customer_ids.astype(str) for p in parts])
    assert len(ids) == n and len(set(ids)) == n  # each customer at exactly one partner
    task = "churn" if name != "bank_marketing" else "propensity"
    y = np.concatenate([p.y[task] for p in parts])
    assert abs(y.mean() - rate) < 1e-3
    names = {p.feature_names for p in parts}
    assert len(names) == 1  # the same encoding everywhere
    for p in parts:
        assert p.X.dtype == np.float32 and 0 <= p.X.min() and p.X.max() <= 1 and p.max_rows_per_customer == 1
    again = load_partner_features(cfg, partition_id=0, num_partitions=k, seed=0)
    np.testing.assert_array_equal(again.X, parts[0].X)
    if name == "online_retail":
        assert set(parts[0].y) == {"churn", "propensity"}
    if name == "bank_marketing":
        assert not any(f.startswith("duration") for f in parts[0].feature_names)


def test_natural_partition_count_is_enforced_and_dirichlet_is_any_count(shared_data):
    cfg = _cfg("telco_churn")
    with pytest.raises(ConfigError, match="set partners=4"):
        load_partner_features(cfg, partition_id=0, num_partitions=6, seed=0)
    cfg.partitioner = "dirichlet"
    assert num_natural_partners(cfg) is None
    parts = [load_partner_features(cfg, partition_id=i, num_partitions=6, seed=3) for i in range(6)]
    assert sum(len(p) for p in parts) == 7043
    rates = [p.y["churn"].mean() for p in parts]
    assert max(rates) - min(rates) > 0.05  # label skew


def test_dirichlet_is_deterministic_and_skewed():
    labels = np.r_[np.zeros(900), np.ones(100)]
    a = dirichlet_assignment(labels, 5, alpha=0.3, seed=1)
    assert (a == dirichlet_assignment(labels, 5, alpha=0.3, seed=1)).all()
    assert not (a == dirichlet_assignment(labels, 5, alpha=0.3, seed=2)).all()
    sizes = np.bincount(a, minlength=5)
    assert sizes.min() >= 10 and sizes.max() > 2 * sizes.min()


def test_contract_hash_ignores_file_location_but_not_semantics():
    c = load_contract("contracts/telco_churn.yaml")
    moved = c.replace(source=c.source.__class__(files=("/elsewhere/x.csv",)))
    assert moved.contract_hash() == c.contract_hash()
    assert c.replace(min_customers=5).contract_hash() != c.contract_hash()
    r = load_contract("data/online_retail.yaml")  # a Hydra data config that points at its contract
    assert r.with_events(cutoff="2011-06-30").contract_hash() != r.contract_hash()
