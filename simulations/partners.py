"""Where a simulated partner's data comes from: the seeded synthetic generator or a real table split into
partners (simulations/realdata.py). Each call builds one partner's features only."""
from __future__ import annotations

from federation.config import FedpropConfig
from federation.features import FeatureSet, build_event_features
from federation.featurespec import SYNTHETIC_CATEGORICAL
from simulations.synthetic import generate_partner, partner_profile, partner_sizes


def synthetic_partner(cfg: FedpropConfig, partition_id: int, num_partitions: int) -> FeatureSet:
    d = cfg.data
    sizes = partner_sizes(num_partitions, min_customers=d.min_customers, max_customers=d.max_customers, seed=cfg.seed)
    profile = partner_profile(partition_id, sizes[partition_id], seed=cfg.seed)
    events, customers = generate_partner(
        profile, seed=cfg.seed, cutoff=d.cutoff, history_days=d.history_days, horizon_days=d.horizon_days
    )
    return build_event_features(
        events, cutoff=d.cutoff, horizon_days=d.horizon_days, static=customers, categorical=SYNTHETIC_CATEGORICAL
    )


def load_partner(cfg: FedpropConfig, partition_id: int, num_partitions: int) -> FeatureSet:
    if cfg.data.kind == "synthetic":
        return synthetic_partner(cfg, partition_id, num_partitions)
    from simulations.realdata import load_partner_features

    return load_partner_features(cfg.data, partition_id=partition_id, num_partitions=num_partitions, seed=cfg.seed)
