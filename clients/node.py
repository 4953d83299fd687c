"""What a partner node does each round, as plain functions (no Flower): split, train, evaluate.

Data is prepared once per node process and cached; every round reuses the tensors.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from clients.privacy_state import PrivacyState
from clients.training import DPSGDParams, mean_loss, sampling_plan, train_dp, train_nonprivate
from federation.config import FedpropConfig, config_hash
from federation.features import FeatureSet
from federation.models import build_model, predict_proba

# (typed run config, this node's node_config) -> this partner's FeatureSet
PartnerLoader = Callable[[FedpropConfig, dict], FeatureSet]


@dataclass(frozen=True)
class PartnerData:
    partition_id: int
    heads: tuple[str, ...]
    X_train: torch.Tensor
    Y_train: torch.Tensor
    X_test: torch.Tensor
    Y_test: torch.Tensor
    feature_names: tuple[str, ...]

    @property
    def n_train(self) -> int:
        return len(self.X_train)

    @property
    def n_test(self) -> int:
        return len(self.X_test)


def split_partner(fs: FeatureSet, *, heads: tuple[str, ...], test_fraction: float, seed: int, partition_id: int) -> PartnerData:
    """Deterministic per-partner train/test split of customers (one row per customer)."""
    n = len(fs)
    rng = np.random.default_rng([seed, partition_id, 99])
    perm = rng.permutation(n)
    n_test = max(1, int(round(test_fraction * n))) if n > 1 else 0
    test, train = perm[:n_test], perm[n_test:]
    Y = np.stack([fs.y[h] for h in heads], axis=1).astype(np.float32)
    X = fs.X.astype(np.float32)
    t = torch.from_numpy
    return PartnerData(
        partition_id, heads, t(X[train]).contiguous(), t(Y[train]).contiguous(),
        t(X[test]).contiguous(), t(Y[test]).contiguous(), tuple(fs.feature_names),
    )


@dataclass
class PhaseTimes:
    """Seconds one message spends in each phase of fedprop's own client code, reported with the reply as
    aggregate metrics: ``time.<phase>-s`` (wall clock) and ``time.<phase>-cpu-s`` (CPU time of this process,
    the robust figure on a shared machine). Phases: data-prep, deserialize, train, ledger, serialize, evaluate."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w0
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0

    def metrics(self) -> dict[str, float]:
        out = {f"time.{k}-s": float(v) for k, v in self.wall.items()}
        out.update({f"time.{k}-cpu-s": float(v) for k, v in self.cpu.items()})
        return out


_CACHE: dict[tuple, PartnerData] = {}
LOADS: dict[tuple, int] = {}  # cache key -> number of times this process prepared that partner's data


def load_partner(cfg: FedpropConfig, *, node_config: dict, loader: PartnerLoader, heads_key: str) -> PartnerData:
    """Prepare this partner's tensors once per process (cached by config hash and node config)."""
    key = (config_hash(cfg), tuple(sorted(node_config.items())), heads_key)
    if key not in _CACHE:
        LOADS[key] = LOADS.get(key, 0) + 1
        fs = loader(cfg, dict(node_config))
        if getattr(fs, "max_rows_per_customer", 1) != 1:
            from federation.errors import PrivacyError

            # DP-SGD clips per row; with k rows per customer the customer-level guarantee needs group privacy
            # (k-fold) or per-customer clipping, neither of which fedprop's accounting applies yet.
            raise PrivacyError(
                f"the data contract allows {fs.max_rows_per_customer} rows per customer, but fedprop's DP "
                "accounting states a guarantee per customer only for one row per customer; set "
                "max_rows_per_customer: 1 in the contract (one snapshot per customer)"
            )
        heads = tuple(heads_key.split(","))
        missing = [h for h in heads if h not in fs.y]
        if missing:
            raise ValueError(f"task head(s) {missing} have no label in this partner's data (labels: {sorted(fs.y)}); "
                             "set task= to one of those")
        _CACHE[key] = split_partner(
            fs, heads=heads, test_fraction=cfg.train.test_fraction, seed=cfg.seed,
            partition_id=int(node_config.get("partition-id", 0)),
        )
    return _CACHE[key]


def initial_privacy_state(cfg: FedpropConfig, data: PartnerData) -> PrivacyState:
    """Calibrate sigma for the whole run. With ``model.heads=separate`` and ``task=both`` the same customers
    feed two federations, so each gets half the target (basic composition: the total stays <= target)."""
    q, steps = sampling_plan(n_train=data.n_train, batch_size=cfg.train.batch_size, local_epochs=cfg.train.local_epochs)
    federations = 2 if (cfg.task == "both" and cfg.model.heads == "separate") else 1
    return PrivacyState.plan(
        target_epsilon=cfg.privacy.epsilon / federations,
        delta=cfg.privacy.delta,
        sample_rate=q,
        steps_per_round=steps,
        rounds=cfg.rounds,
        max_grad_norm=cfg.privacy.max_grad_norm,
    )


def train_round(
    cfg: FedpropConfig,
    data: PartnerData,
    state_dict: dict[str, torch.Tensor],
    privacy: PrivacyState | None,
    *,
    server_round: int,
    proximal_mu: float = 0.0,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], PrivacyState | None]:
    """One local round. With DP on, the caller must have run ``privacy.check_next_round()``."""
    model = build_model(cfg.model, n_features=data.X_train.shape[1], n_outputs=len(data.heads))
    model.load_state_dict(state_dict)
    gen = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, data.partition_id, server_round]).integers(2**62)))
    metrics: dict[str, Any] = {"num-examples": data.n_train, "partition-id": data.partition_id}
    if privacy is not None:
        params = DPSGDParams(
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            sample_rate=privacy.sample_rate,
            steps=privacy.steps_per_round,
        )
        loss = train_dp(
            model, data.X_train, data.Y_train, params=params, lr=cfg.train.lr, momentum=cfg.train.momentum,
            generator=gen, engine=cfg.train.engine, proximal_mu=proximal_mu,
        )
        privacy = privacy.after_round()
        metrics.update(
            {
                "train-loss": loss,
                "epsilon": privacy.epsilon(),
                "delta": privacy.delta,
                "noise-multiplier": privacy.noise_multiplier,
                "sample-rate": privacy.sample_rate,
                "steps": privacy.steps_per_round,
            }
        )
    else:
        _, steps = sampling_plan(n_train=data.n_train, batch_size=cfg.train.batch_size, local_epochs=cfg.train.local_epochs)
        train_nonprivate(model, data.X_train, data.Y_train, epochs=max(1, round(cfg.train.local_epochs)),
                         lr=cfg.baselines.lr, batch_size=cfg.train.batch_size, generator=gen)
        metrics["train-loss"] = mean_loss(model, data.X_train, data.Y_train)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, metrics, privacy


def evaluate(
    cfg: FedpropConfig, data: PartnerData, state_dict: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics of the global model on this partner's held-out customers (aggregates only), and the DP
    mechanisms of this release (empty unless ``evaluation.dp_epsilon`` > 0: then one per head)."""
    import secrets

    from clients.evaluation import evaluation_metrics

    model = build_model(cfg.model, n_features=data.X_test.shape[1], n_outputs=len(data.heads))
    model.load_state_dict(state_dict)
    P = predict_proba(model, data.X_test).numpy()
    Y = data.Y_test.numpy()
    out: dict[str, Any] = {"num-examples": data.n_test, "partition-id": data.partition_id}
    mechanisms: list[dict[str, Any]] = []
    rng = np.random.default_rng(secrets.randbits(128)) if cfg.evaluation.dp_epsilon > 0 else None
    for j, head in enumerate(data.heads):
        m, mech = evaluation_metrics(Y[:, j], P[:, j], prefix=f"{head}.", bins=cfg.evaluation.bins,
                                     dp_epsilon=cfg.evaluation.dp_epsilon, rng=rng)
        out.update(m)
        if mech is not None:
            mechanisms.append(mech)
    if mechanisms:  # the exact test-set size is private too: weight by the noisy histogram's count
        first = data.heads[0]
        out["num-examples"] = max(1, int(sum(out[f"{first}.hist.pos"]) + sum(out[f"{first}.hist.neg"])))
    return out, mechanisms
