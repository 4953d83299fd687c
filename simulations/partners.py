"""Where a simulated partner's data comes from: the seeded synthetic generator or a real table split into
partners (simulations/realdata.py). Each call builds one partner's features only."""
from __future__ import annotations

import os

from federation.config import FedpropConfig
from federation.features import FeatureSet, build_event_features
from federation.featurespec import SYNTHETIC_CATEGORICAL
from simulations.synthetic import generate_partner, partner_profile, partner_sizes, synthetic_dates


def synthetic_partner(cfg: FedpropConfig, partition_id: int, num_partitions: int) -> FeatureSet:
    d = cfg.data
    sizes = partner_sizes(num_partitions, min_customers=d.min_customers, max_customers=d.max_customers, seed=cfg.seed)
    profile = partner_profile(partition_id, sizes[partition_id], seed=cfg.seed)
    cutoff, horizon = synthetic_dates(d)
    events, customers = generate_partner(
        profile, seed=cfg.seed, cutoff=cutoff, history_days=d.history_days, horizon_days=horizon
    )
    return build_event_features(
        events, cutoff=cutoff, horizon_days=horizon, static=customers, categorical=SYNTHETIC_CATEGORICAL
    )


def load_partner(cfg: FedpropConfig, node_config: dict) -> FeatureSet:
    """Simulation loader: Flower's simulation engine sets partition-id / num-partitions per node."""
    partition_id, num_partitions = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if cfg.data.kind == "synthetic":
        return synthetic_partner(cfg, partition_id, num_partitions)
    from simulations.realdata import load_partner_features

    return load_partner_features(cfg.data, partition_id=partition_id, num_partitions=num_partitions, seed=cfg.seed)


def resolve_for_data(cfg: FedpropConfig) -> FedpropConfig:
    """Fit the run to a real dataset: natural partitions fix the partner count; a customer table has one task."""
    import dataclasses

    from federation.contract import load_contract
    from federation.errors import ConfigError
    from simulations.realdata import num_natural_partners

    if cfg.data.kind == "synthetic":
        return cfg
    natural = num_natural_partners(cfg.data)
    tasks = load_contract(cfg.data.contract).tasks()
    changes: dict = {}
    if natural is not None and natural != cfg.partners:
        print(f"fedprop: data={cfg.data.name} has {natural} natural partners; using partners={natural} "
              f"(data.partitioner=dirichlet or iid allows any number)", flush=True)
        changes["partners"] = natural
    if cfg.task == "both" and len(tasks) == 1:
        print(f"fedprop: data={cfg.data.name} provides only the {tasks[0]} label; using task={tasks[0]}", flush=True)
        changes["task"] = tasks[0]
    elif cfg.task != "both" and cfg.task not in tasks:
        raise ConfigError(f"task={cfg.task!r} is not available for data={cfg.data.name}: it provides {', '.join(tasks)}")
    return dataclasses.replace(cfg, **changes)


CACHE_PREFIX = "fedprop-partner-cache-"


def new_cache_dir(base: str | None = None) -> str:
    """A private (0700, ``tempfile.mkdtemp``) folder for one run's partner caches, outside the run folder, named
    with this process id. Caches left by runs that died (kill -9) are deleted first; they are unreadable anyway
    (encrypted with a key that lived only in that run's memory)."""
    import tempfile

    purge_stale_caches(base)
    return tempfile.mkdtemp(prefix=f"{CACHE_PREFIX}{os.getpid()}-", dir=base)


def purge_stale_caches(base: str | None = None) -> list[str]:
    """Delete this user's partner-cache folders whose owning process is gone; return what was deleted."""
    import shutil
    import tempfile
    from pathlib import Path

    gone = []
    for p in Path(base or tempfile.gettempdir()).glob(CACHE_PREFIX + "*"):
        try:
            pid = int(p.name[len(CACHE_PREFIX):].split("-")[0])
            if p.stat().st_uid != os.getuid() or _alive(pid):
                continue
        except (ValueError, OSError):
            continue
        shutil.rmtree(p, ignore_errors=True)
        gone.append(str(p))
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cached_partner(cfg: FedpropConfig, node_config: dict, *, cache_dir: str, key: bytes) -> FeatureSet:
    """``load_partner`` with a per-run disk cache, so each partner's features are built once per run even
    when several Ray workers (and the driver's baselines) serve that partner. Simulation only. Each file is
    AES-256-GCM encrypted with ``key``, a per-run key from the OS CSPRNG held only in memory (the driver's and
    the Ray workers'), so a cache that outlives its run (kill -9) holds no readable customer data; the driver
    deletes the folder when the run ends, on SIGTERM too (simulations/simulate.py)."""
    import io
    import tempfile
    from pathlib import Path

    import numpy as np
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from federation.config import config_hash

    pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    path = Path(cache_dir) / f"{config_hash(cfg)[:16]}-partner{pid}-of{n}.npz.enc"
    aad = path.name.encode()
    if path.exists():
        blob = path.read_bytes()
        plain = AESGCM(key).decrypt(blob[:12], blob[12:], aad)
        with np.load(io.BytesIO(plain), allow_pickle=False) as z:
            heads = [k[2:] for k in z.files if k.startswith("y_")]
            return FeatureSet(customer_ids=z["ids"].astype(object), X=z["X"], y={h: z[f"y_{h}"] for h in heads},
                              feature_names=tuple(str(x) for x in z["names"]),
                              max_rows_per_customer=int(z["max_rows"]))
    fs = load_partner(cfg, node_config)
    buf = io.BytesIO()
    np.savez(buf, ids=np.asarray([str(c) for c in fs.customer_ids]), X=fs.X, names=np.asarray(fs.feature_names),
             max_rows=np.asarray(fs.max_rows_per_customer), **{f"y_{h}": v for h, v in fs.y.items()})
    nonce = os.urandom(12)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(nonce + AESGCM(key).encrypt(nonce, buf.getvalue(), aad))
    os.replace(tmp, path)  # atomic: a concurrent worker reads either nothing or the whole file
    return fs
