"""What a partner node does each round, as plain functions (no Flower): split, train, evaluate.

Data is prepared once per node process and cached; every round reuses the tensors.
"""
from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from clients.privacy_state import PrivacyState
from clients.training import DPSGDParams, mean_loss, sampling_plan, train_dp, train_nonprivate
from federation.config import FedpropConfig, config_hash, evaluation_rounds
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
    public_n_train: int = 0  # declared public (public_size or node config public-size); drives q and weights

    @property
    def n_train(self) -> int:
        return len(self.X_train)

    @property
    def n_test(self) -> int:
        return len(self.X_test)


def public_size(n: int) -> int:
    """The training-set size treated as PUBLIC: ``n`` rounded down to two significant digits (4,823 -> 4,800).

    The sampling rate q = batch_size / public_size, the steps per round, the divisor of the noisy gradient
    sum and the FedAvg weight all derive from it, so none of them reveals the exact private count; the bucket
    itself is revealed (declared public in the privacy statement, like the partner's participation). A node
    can declare its own value with the node config key ``public-size``."""
    if n < 1:
        return 0
    step = 10 ** max(0, len(str(int(n))) - 2)
    return max(1, (int(n) // step) * step)


def split_key_from_file(path: str) -> bytes:
    """A node's secret split key: the first 32 bytes of SHA-256 over a key file that never leaves the node."""
    from pathlib import Path

    from federation.errors import ConfigError

    f = Path(path)
    if not f.is_file():
        raise ConfigError(f"node config split-key={path!r}: no such file; create one with 32 random bytes "
                          "(e.g. `head -c 32 /dev/urandom > split.key; chmod 600 split.key`)")
    return hashlib.sha256(b"fedprop/split/v1\0" + f.read_bytes()).digest()


def test_membership(customer_ids: np.ndarray, *, key: bytes, test_fraction: float) -> np.ndarray:
    """True for held-out customers: keyed BLAKE2b of the customer id (a key that never leaves the node) mapped
    to [0, 1) and compared with ``test_fraction``. Each customer's side depends on its own id only, so adding
    or removing one customer moves nobody else between train and test."""
    if len(key) < 16:
        raise ValueError("split key must have at least 16 bytes")
    out = np.empty(len(customer_ids), dtype=bool)
    for i, cid in enumerate(customer_ids):
        h = hashlib.blake2b(str(cid).encode("utf-8"), key=key[:64], digest_size=8, person=b"fedprop-split").digest()
        out[i] = int.from_bytes(h, "big") < test_fraction * 2**64
    return out


def split_partner(fs: FeatureSet, *, heads: tuple[str, ...], test_fraction: float, split_key: bytes,
                  partition_id: int, public_n: int | None = None) -> PartnerData:
    """Train/test split of customers (one row per customer) by a keyed hash of the customer id."""
    test_mask = test_membership(fs.customer_ids, key=split_key, test_fraction=test_fraction)
    test, train = np.flatnonzero(test_mask), np.flatnonzero(~test_mask)
    Y = np.stack([fs.y[h] for h in heads], axis=1).astype(np.float32)
    X = fs.X.astype(np.float32)
    t = torch.from_numpy
    return PartnerData(
        partition_id, heads, t(X[train]).contiguous(), t(Y[train]).contiguous(),
        t(X[test]).contiguous(), t(Y[test]).contiguous(), tuple(fs.feature_names),
        public_n_train=int(public_n) if public_n else public_size(len(train)),
    )


@dataclass
class PhaseTimes:
    """Seconds one message spends in each phase of fedprop's own client code (wall clock and this process's CPU
    time). Only the wall-clock figures leave the node, rounded (``public_timings``); the CPU times stay local.
    Phases: data-prep, deserialize, train, ledger, serialize, evaluate."""

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


def public_timings(times: PhaseTimes) -> dict[str, float]:
    """Per-phase seconds rounded to 10 ms: operational metadata the coordinator observes anyway (reply latency),
    declared public in docs/release-inventory.md. The per-phase CPU times are not sent."""
    return {f"time.{k}-s": round(float(v), 2) for k, v in times.wall.items()}


_CACHE: dict[tuple, PartnerData] = {}
LOADS: dict[tuple, int] = {}  # cache key -> number of times this process prepared that partner's data


def load_partner(cfg: FedpropConfig, *, node_config: dict, loader: PartnerLoader, heads_key: str,
                 split_key: bytes) -> PartnerData:
    """Prepare this partner's tensors once per process (cached by config hash, node config and split key)."""
    key = (config_hash(cfg), tuple(sorted(node_config.items())), heads_key, hashlib.sha256(split_key).hexdigest())
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
        declared = node_config.get("public-size")
        _CACHE[key] = split_partner(
            fs, heads=heads, test_fraction=cfg.train.test_fraction, split_key=split_key,
            partition_id=int(node_config.get("partition-id", 0)), public_n=int(declared) if declared else None,
        )
    return _CACHE[key]


def run_share(cfg: FedpropConfig) -> tuple[float, float]:
    """(epsilon, delta) of ONE federation: with ``model.heads=separate`` and ``task=both`` the same customers feed
    two federations, so each gets half of both (basic composition: the run stays within (epsilon, delta))."""
    k = 2 if (cfg.task == "both" and cfg.model.heads == "separate") else 1
    return cfg.privacy.epsilon / k, cfg.privacy.delta / k


def initial_privacy_state(cfg: FedpropConfig, data: PartnerData, *, accountants: tuple[str, ...] = ()) -> PrivacyState:
    """Calibrate the DP-SGD noise and the evaluation noise of the whole run together (clients/privacy_state.py).
    q and the steps come from the PUBLIC training-set size (``public_size``), never from the exact count.
    ``accountants``: the node policy's enforcement accountants; the run is calibrated to meet its target under
    the largest of them and ``privacy.accountant``, so the policy never refuses a run for its accountant."""
    q, steps = sampling_plan(n_train=data.public_n_train, batch_size=cfg.train.batch_size, local_epochs=cfg.train.local_epochs)
    eps, delta = run_share(cfg)
    return PrivacyState.plan(
        target_epsilon=eps,
        delta=delta,
        sample_rate=q,
        steps_per_round=steps,
        rounds=cfg.rounds,
        max_grad_norm=cfg.privacy.max_grad_norm,
        eval_releases=len(data.heads) * len(evaluation_rounds(cfg)),
        eval_share=cfg.evaluation.epsilon_share,
        accountant="+".join(dict.fromkeys((cfg.privacy.accountant, *accountants))),
    )


def noise_source(cfg: FedpropConfig, data: PartnerData, *, server_round: int, purpose: int):
    """A fresh randomness source for one release (clients/noise.py); config-seeded only if reproducible."""
    from clients.noise import make_noise_source

    mode = cfg.privacy.noise if cfg.privacy.enabled else "fast"
    return make_noise_source(mode, seed_material=(cfg.seed, data.partition_id, server_round, purpose))


def train_round(
    cfg: FedpropConfig,
    data: PartnerData,
    state_dict: dict[str, torch.Tensor],
    privacy: PrivacyState | None,
    *,
    server_round: int,
    proximal_mu: float = 0.0,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], PrivacyState | None]:
    """One local round. With DP on, the caller must have run ``privacy.check_next_round()``.

    The metrics returned are what leaves the node with the update (docs/release-inventory.md): the public
    weight, the partner id, and the privacy parameters (functions of public quantities). No loss, no count."""
    model = build_model(cfg.model, n_features=data.X_train.shape[1], n_outputs=len(data.heads))
    model.load_state_dict(state_dict)
    metrics: dict[str, Any] = {"num-examples": data.public_n_train, "partition-id": data.partition_id}
    if privacy is not None:
        gen = noise_source(cfg, data, server_round=server_round, purpose=1)
        params = DPSGDParams(
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            sample_rate=privacy.sample_rate,
            steps=privacy.steps_per_round,
            expected_batch_size=max(1, int(data.public_n_train * privacy.sample_rate)),
        )
        train_dp(
            model, data.X_train, data.Y_train, params=params, lr=cfg.train.lr, momentum=cfg.train.momentum,
            generator=gen, engine=cfg.train.engine, proximal_mu=proximal_mu,
        )
        privacy = privacy.after_round()
        metrics.update(
            {
                "epsilon": privacy.epsilon(),
                "epsilon-with-evaluation": privacy.epsilon_with_evaluation(),
                "delta": privacy.delta,
                "noise-multiplier": privacy.noise_multiplier,
                "sample-rate": privacy.sample_rate,
                "steps": privacy.steps_per_round,
            }
        )
    else:  # a non-private run (privacy.enabled=false) makes no claim: exact count and loss are sent
        gen = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, data.partition_id, server_round]).integers(2**62)))
        train_nonprivate(model, data.X_train, data.Y_train, epochs=max(1, round(cfg.train.local_epochs)),
                         lr=cfg.baselines.lr, batch_size=cfg.train.batch_size, generator=gen)
        metrics["num-examples"] = data.n_train
        metrics["train-loss"] = mean_loss(model, data.X_train, data.Y_train)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, metrics, privacy


def evaluate(
    cfg: FedpropConfig, data: PartnerData, state_dict: dict[str, torch.Tensor], privacy: PrivacyState | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """This partner's evaluation release of the global model on its held-out customers, and its DP mechanisms.

    With DP on: per head, noisy per-class counts in public bins (federation/metrics.py:release_histogram) with
    the run's calibrated ``privacy.eval_sigma``; the mechanism list (one discrete Gaussian per head) is for the
    ledger. With DP off (a non-private run): exact histograms. The caller checks the budget first."""
    from federation import metrics as M
    from federation.privacy.discrete import sample_discrete_gaussian

    model = build_model(cfg.model, n_features=data.X_test.shape[1], n_outputs=len(data.heads))
    model.load_state_dict(state_dict)
    P = predict_proba(model, data.X_test).numpy()
    Y = data.Y_test.numpy()
    edges = M.logit_edges(cfg.evaluation.bins)
    out: dict[str, Any] = {"partition-id": data.partition_id}
    mechanisms: list[dict[str, Any]] = []
    for j, head in enumerate(data.heads):
        prefix = f"{head}.hist."
        if privacy is not None:
            out.update(M.release_histogram(Y[:, j], P[:, j], edges=edges, sigma=privacy.eval_sigma,
                                           sampler=sample_discrete_gaussian, prefix=prefix))
            mechanisms.append({"kind": "discrete_gaussian", "release": "evaluation_histogram", "head": head,
                               "bins": len(edges) - 1, "sigma": privacy.eval_sigma, "unit": "customer",
                               "adjacency": "add_remove", "sensitivity": 1,
                               "ledger_event": {"kind": "discrete_gaussian", "noise_multiplier": privacy.eval_sigma,
                                                "count": 1}})
        else:
            out.update(M.to_flat(M.histogram_from_scores(Y[:, j], P[:, j], bins=len(edges) - 1, edges=edges), prefix=prefix))
    out["num-examples"] = 1  # Flower needs a weight key; histograms are summed, not weighted (public constant)
    return out, mechanisms
