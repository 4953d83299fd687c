"""A deployed partner node's data: its own file (CSV/Parquet/SQL), read and validated through the data
contract named in the node config, never leaving the node.

Node config keys (``flower-supernode --node-config``):
  data-path   file or SQLAlchemy URL of the partner's data
  contract    path to the data contract YAML (the same contract at every partner)
  data-query  optional SQL query when data-path is a database URL
  duckdb-memory-limit  event logs: the DuckDB engine's memory limit (default: run config data.engine_memory_limit)
Without ``data-path`` and with a synthetic run config the node generates its synthetic partner
(``partition-id`` / ``num-partitions``): a demo mode for loopback federations.
"""
from __future__ import annotations

from federation.config import FedpropConfig
from federation.errors import ConfigError
from federation.features import FeatureSet


def load_node_features(cfg: FedpropConfig, node_config: dict) -> FeatureSet:
    if "data-path" in node_config:
        from federation.contract import build_features, load_contract
        from federation.validation import read_validated

        contract_path = node_config.get("contract") or cfg.data.contract
        if not contract_path:
            raise ConfigError("node config key 'contract' (path to the data contract YAML) is required with data-path")
        contract = load_contract(contract_path)
        if contract.kind == "events":  # out of core: validation + features in one DuckDB pass (same result, report)
            from federation.engine_duckdb import default_settings, read_event_features

            settings = default_settings(cfg.data.engine_memory_limit, node_config)
            return read_event_features(contract, str(node_config["data-path"]), delta=cfg.privacy.delta,
                                       settings=settings).features
        validated = read_validated(contract, str(node_config["data-path"]), delta=cfg.privacy.delta)
        return build_features(validated.frame, contract)
    if cfg.data.kind == "synthetic" and "partition-id" in node_config:
        from simulations.partners import load_partner  # demo nodes only: generate this partner's synthetic log

        node_config = {"num-partitions": cfg.partners, **node_config}
        return load_partner(cfg, node_config)
    raise ConfigError(
        "this node has no data: start the SuperNode with --node-config \"data-path='...' contract='...'\" "
        f"(node config keys present: {sorted(node_config)})"
    )
