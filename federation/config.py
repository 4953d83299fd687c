"""Typed configuration: dataclass schemas (registered in Hydra's ConfigStore by ``simulations``),
validation with errors that name the full key, and the one bridge to Flower's flat run config.

This module knows nothing of Hydra or Flower: it works on plain dicts so that the same config can
come from Hydra (simulation), from ``context.run_config`` (deployment) or from a test.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from federation.errors import ConfigError

TASKS = ("churn", "propensity", "both")
MODELS = ("logreg", "mlp")
STRATEGIES = ("fedavg", "fedprox", "fedadam")
ENGINES = ("auto", "opacus", "fast")
NOISE_MODES = ("secure", "fast", "reproducible")
# What nodes calibrate and check their run with: "tight" = the larger of dp-accounting's PLD and the PRV accountant
# (each pessimistic); "rdp" (Opacus's RDP bound) is valid but looser, so it wastes budget. Reports show all.
ACCOUNTANTS = ("tight", "rdp")


@dataclass
class ModelConfig:
    kind: str = "logreg"  # robust under DP at epsilon 0.5-8 (benchmarks/bench_utility.py); "mlp" for more capacity
    hidden: list[int] = field(default_factory=list)
    # "two_head": one model with a churn head and a propensity head, trained in one federation
    # (one privacy spend for both tasks). "separate": one federation per task.
    heads: str = "two_head"


@dataclass
class PrivacyConfig:
    enabled: bool = True
    epsilon: float = 3.0  # target for the whole run, per partner, privacy unit = one customer
    delta: float = 1e-5
    # DP-SGD clipping bound C (L2, per customer per step). 0 = auto: from privacy.epsilon, see AUTO_SCHEDULE.
    max_grad_norm: float = 0.0
    accountant: str = "tight"
    # Per-partner privacy ledgers (clients/ledger_hooks.py). Simulation: <ledger_dir>/<data.name>/partner-<i>.sqlite, kept
    # ACROSS runs so a partner's budget is cumulative per policy period (relative paths: to the CWD).
    # Deployment nodes use their node config (ledger-path, node-key, budget-policy) instead.
    # The default can be moved with the FEDPROP_LEDGER_DIR environment variable (tests use a temp dir).
    # "" (default): a simulation keeps this run's ledgers in <run_dir>/ledgers; name a folder shared by several runs to
    # simulate a partner's year. Deployment nodes never read it (their node config names their ledger).
    ledger_dir: str = field(default_factory=lambda: os.environ.get("FEDPROP_LEDGER_DIR", ""))
    policy: str = ""  # budget policy YAML (federation/privacy/policy.py); "" = record only, no policy enforced
    # Where DP noise and Poisson sampling come from (clients/noise.py): "secure" (ChaCha20 keyed from the OS
    # CSPRNG per release + floating-point hardened Gaussian), "fast" (torch generator seeded from the OS CSPRNG),
    # "reproducible" (seeded from `seed`: NO guarantee against anyone who knows the seed; tests/research only).
    noise: str = "secure"


@dataclass
class TrainConfig:
    batch_size: int = 256  # expected Poisson batch size: sampling rate q = batch_size / public size
    local_epochs: float = 2.0  # expected passes over local data per round: steps = ceil(epochs / q)
    lr: float = 1.0  # same defaults as conf/config.yaml (lr 2.0 with the MLP diverged at epsilon <= 1)
    momentum: float = 0.0
    engine: str = "auto"  # auto: fast fused DP-SGD when the model supports it, else Opacus
    test_fraction: float = 0.2


@dataclass
class StrategyConfig:
    name: str = "fedavg"
    proximal_mu: float = 0.01  # fedprox
    server_lr: float = 0.05  # fedadam eta
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    # Liveness: a round starts once this many partners are online and proceeds with whoever answers within
    # round_timeout seconds, so one dead partner does not stall the federation. 0 = max(1, ceil(partners / 2)).
    min_partners: int = 0
    round_timeout: float = 600.0


@dataclass
class DataConfig:
    name: str = "synthetic"
    kind: str = "synthetic"  # synthetic | events | table
    # synthetic generator
    min_customers: int = 600
    max_customers: int = 6000
    history_days: int = 365
    # synthetic: the generator's cutoff / label horizon (empty / 0 = SYNTHETIC_CUTOFF / SYNTHETIC_HORIZON_DAYS);
    # kind=events: override the contract's events.cutoff / events.horizon_days only when set (empty / 0 = the
    # contract's, so a user's contract is not silently moved to the synthetic demo's dates)
    horizon_days: int = 0
    cutoff: str = ""
    # real data (events / table): a contract and a partitioning, see conf/data/*.yaml.
    contract: str = ""  # path of a contract YAML (conf/contracts/<name>.yaml), relative to conf/ or the repo
    path: str = ""  # overrides the contract's source file (relative: $FEDPROP_DATA_DIR, else ../shared/data)
    partitioner: str = "natural"  # natural (the dataset's own groups) | dirichlet | iid
    partition_by: str = ""  # natural scheme name (simulations/realdata.py); "" = the dataset's default
    dirichlet_alpha: float = 0.5  # dirichlet: label/size skew (smaller = more skewed)
    min_positives: int = 10  # real data: refuse a split that leaves a partner fewer positives (and negatives) per task
    # an event-log node's DuckDB engine (federation/engine_duckdb.py) stays under this and spills to disk beyond it;
    # a node overrides it with node config duckdb-memory-limit (or FEDPROP_DUCKDB_MEMORY)
    engine_memory_limit: str = "2GB"


@dataclass
class BaselineConfig:
    enabled: bool = True
    epochs: int = 30
    lr: float = 0.01


@dataclass
class SecureAggConfig:
    # Secure aggregation (SecAgg / SecAgg+, federation/secagg): the server learns only the sum of the partners'
    # updates. See docs/secure-aggregation.md.
    enabled: bool = False
    threshold_fraction: float = 0.6  # t = max(2, ceil(fraction * sampled partners)); n - t dropouts tolerated
    degree: int = 0  # neighbours per partner (SecAgg+, even); 0 = complete graph (SecAgg)
    clip: float = 4.0  # per-coordinate clip of a partner's update delta (quantization range)
    modulus_bits: int = 48  # integer arithmetic modulo 2**modulus_bits
    rounding: str = "stochastic"  # stochastic (unbiased) | nearest
    weight_cap: int = 100000  # FedAvg weight min(n, cap) / cap, summed securely; central_dp uses equal weights
    timeout: float = 600.0  # seconds per protocol stage (the masked-input stage includes local training)


@dataclass
class CentralDPConfig:
    # Partner-level DP with distributed noise: each partner clips its delta to clipping_norm (L2) and adds
    # N(0, (noise_multiplier * clipping_norm)^2 / t) before masking; the securely summed aggregate carries at
    # least noise_multiplier * clipping_norm if t partners are honest. Needs secagg.enabled.
    enabled: bool = False
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    delta: float = 1e-5  # partner-level delta (privacy unit: one partner's whole contribution)


@dataclass
class EvaluationConfig:
    # Federated evaluation is a DP release inside the partner's budget: per task head, per-class counts of its
    # held-out customers in `bins` public logit-spaced bins plus exact discrete Gaussian noise
    # (federation/metrics.py:release_histogram). privacy.epsilon is the TOTAL for the run: training is
    # calibrated to (1 - epsilon_share) x epsilon alone, then the evaluation noise is the smallest that keeps
    # training + evaluation composed within epsilon. Recorded in the ledger before release.
    enabled: bool = True
    epsilon_share: float = 0.1
    rounds: int = 1  # evaluated rounds, evenly spaced and ending with the last (the released model); each costs
    bins: int = 20  # public bins per class (0, sigmoid(-6..6 in bins-1 steps), 1)


@dataclass
class ReleaseConfig:
    # The server's Ed25519 model-signing key lives here (server.key 0600, server.pub), created on first use
    # and kept ACROSS runs (relative paths: to the CWD); each run dir gets a copy of the public key.
    # The default can be moved with the FEDPROP_KEY_DIR environment variable (tests use a temp dir).
    key_dir: str = field(default_factory=lambda: os.environ.get("FEDPROP_KEY_DIR", "runs/keys"))
    # A federation releases (saves, signs, writes model cards) only if at least this many rounds aggregated a
    # partner's update; otherwise it releases nothing and the run exits non-zero.
    min_rounds: int = 1


@dataclass
class FedpropConfig:
    partners: int = 5
    rounds: int = 0  # server rounds; 0 = auto: from privacy.epsilon, see AUTO_SCHEDULE
    task: str = "both"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)
    secagg: SecureAggConfig = field(default_factory=SecureAggConfig)
    central_dp: CentralDPConfig = field(default_factory=CentralDPConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    num_cpus_per_client: float = 1.0
    verbose: bool = False


# ``rounds: 0`` and ``privacy.max_grad_norm: 0`` mean "choose from privacy.epsilon": (epsilon from, C, rounds), the
# last row whose threshold the epsilon of one federation reaches (privacy.epsilon; half of it with task=both and
# model.heads=separate, which train two federations). It reads only the declared (public) config, never data, so it
# costs no privacy and the server and every node resolve the same numbers (they travel in the config hash).
# Measured with benchmarks/bench_utility.py on the four bundled datasets over fixed splits (README "Utility at
# epsilon 1 and 3", the rule-choice table): at epsilon < 2 the noise multiplier is large and C=1 with 10 rounds
# keeps the noise per step lowest; from epsilon 2 a larger clip bound clips less signal, and from epsilon 3 more
# rounds add accuracy.
# Without DP (privacy.enabled=false) the first row applies. An explicit non-zero value always wins.
AUTO_SCHEDULE: tuple[tuple[float, float, int], ...] = ((0.0, 1.0, 10), (2.0, 2.0, 10), (3.0, 2.0, 20))


def auto_schedule(epsilon: float | None) -> tuple[float, int]:
    """(max_grad_norm, rounds) that ``0 = auto`` resolves to for a target epsilon (None: no DP)."""
    row = AUTO_SCHEDULE[0]
    for r in AUTO_SCHEDULE:
        if epsilon is not None and epsilon >= r[0]:
            row = r
    return row[1], row[2]


def _resolve_auto(cfg: FedpropConfig) -> None:
    """Fill ``rounds`` / ``privacy.max_grad_norm`` left at 0 (auto) in place; explicit values are kept."""
    pv = cfg.privacy
    eps = float(pv.epsilon) if pv.enabled and isinstance(pv.epsilon, (int, float)) and pv.epsilon > 0 else None
    if eps is not None and cfg.task == "both" and cfg.model.heads == "separate":
        eps /= 2  # two federations on the same customers, each at half the budget (clients/node.py:run_share)
    clip, rounds = auto_schedule(eps)
    if type(cfg.rounds) is int and cfg.rounds == 0:
        cfg.rounds = rounds
    if type(pv.max_grad_norm) in (int, float) and pv.max_grad_norm == 0:
        pv.max_grad_norm = clip


def min_partners(cfg: FedpropConfig) -> int:
    """Partners that must be online for a round to start (``strategy.min_partners``, 0 = half, at least 1)."""
    return cfg.strategy.min_partners or max(1, -(-cfg.partners // 2))


def evaluation_rounds(cfg: FedpropConfig) -> tuple[int, ...]:
    """The server rounds whose global model is evaluated: ``evaluation.rounds`` of them, evenly spaced, last = final."""
    if not cfg.evaluation.enabled:
        return ()
    k, r = cfg.evaluation.rounds, cfg.rounds
    return tuple(sorted({r - (i * r) // k for i in range(k)}))


def _allowed(key: str, value: Any, allowed: tuple[str, ...]) -> list[str]:
    if value not in allowed:
        return [f"{key}={value!r} is not allowed; use one of {', '.join(allowed)}"]
    return []


def validate(cfg: FedpropConfig) -> FedpropConfig:
    """Resolve ``0 = auto`` keys (AUTO_SCHEDULE), collect every invalid value, then raise one ConfigError naming
    each full key. Validate after setting privacy.epsilon: auto values are fixed by the first validation."""
    p: list[str] = []
    _resolve_auto(cfg)
    if cfg.partners < 1:
        p.append(f"partners={cfg.partners} must be >= 1 (number of partner nodes)")
    if type(cfg.rounds) is not int or cfg.rounds < 1:
        p.append(f"rounds={cfg.rounds!r} must be an integer >= 1 (or 0: chosen from privacy.epsilon)")
    p += _allowed("task", cfg.task, TASKS)
    p += _allowed("model.kind", cfg.model.kind, MODELS)
    p += _allowed("model.heads", cfg.model.heads, ("two_head", "separate"))
    if any(int(h) < 1 for h in cfg.model.hidden):
        p.append(f"model.hidden={list(cfg.model.hidden)} must be positive layer widths")
    pv = cfg.privacy
    if pv.enabled:
        if not 0 < pv.epsilon < float("inf"):  # inf = no guarantee at all: use privacy.enabled=false to say so
            p.append(f"privacy.epsilon={pv.epsilon} must be a finite number > 0 (target epsilon for the whole run; "
                     "privacy.enabled=false runs without DP)")
        if not 0 < pv.delta < 1:
            p.append(f"privacy.delta={pv.delta} must be in (0, 1); use well below 1/n customers, e.g. 1e-5")
        if not 0 < pv.max_grad_norm < float("inf"):
            p.append(f"privacy.max_grad_norm={pv.max_grad_norm} must be a finite number > 0 (or 0: chosen from "
                     "privacy.epsilon)")
        p += _allowed("privacy.accountant", pv.accountant, ACCOUNTANTS)
        if not isinstance(pv.ledger_dir, str) or (pv.ledger_dir and not pv.ledger_dir.strip()):
            p.append(f"privacy.ledger_dir={pv.ledger_dir!r} must be \"\" (per-run ledgers) or a directory path")
        if not isinstance(pv.policy, str) or (pv.policy and not pv.policy.endswith((".yaml", ".yml"))):
            p.append(f"privacy.policy={pv.policy!r} must be \"\" (no policy) or the path of a budget policy .yaml file")
    t = cfg.train
    if t.batch_size < 1:
        p.append(f"train.batch_size={t.batch_size} must be >= 1")
    if not t.local_epochs > 0:
        p.append(f"train.local_epochs={t.local_epochs} must be > 0")
    if not t.lr > 0:
        p.append(f"train.lr={t.lr} must be > 0")
    if not 0 <= t.momentum < 1:
        p.append(f"train.momentum={t.momentum} must be in [0, 1)")
    if not 0 < t.test_fraction < 1:
        p.append(f"train.test_fraction={t.test_fraction} must be in (0, 1)")
    p += _allowed("train.engine", t.engine, ENGINES)
    ev = cfg.evaluation
    if ev.enabled and not 0 < ev.epsilon_share < 1:
        p.append(f"evaluation.epsilon_share={ev.epsilon_share} must be in (0, 1): the share of privacy.epsilon "
                 "for evaluation releases")
    if not 1 <= ev.rounds <= max(1, cfg.rounds):
        p.append(f"evaluation.rounds={ev.rounds} must be in [1, rounds={cfg.rounds}] (evaluated rounds, ending with the last)")
    if ev.bins < 2 or ev.bins > 1000:
        p.append(f"evaluation.bins={ev.bins} must be in [2, 1000] (public score bins per class)")
    p += _allowed("privacy.noise", cfg.privacy.noise, NOISE_MODES)
    p += _allowed("strategy.name", cfg.strategy.name, STRATEGIES)
    if not 0 < cfg.strategy.fraction_train <= 1:
        p.append(f"strategy.fraction_train={cfg.strategy.fraction_train} must be in (0, 1]")
    if not 0 <= cfg.strategy.min_partners <= cfg.partners:
        p.append(f"strategy.min_partners={cfg.strategy.min_partners} must be in [0, partners={cfg.partners}] (0 = half)")
    if not cfg.strategy.round_timeout > 0:
        p.append(f"strategy.round_timeout={cfg.strategy.round_timeout} must be > 0 seconds")
    if not 0 <= cfg.strategy.fraction_evaluate <= 1:
        p.append(f"strategy.fraction_evaluate={cfg.strategy.fraction_evaluate} must be in [0, 1]")
    p += _allowed("data.kind", cfg.data.kind, ("synthetic", "events", "table"))
    p += _allowed("data.partitioner", cfg.data.partitioner, ("natural", "dirichlet", "iid"))
    if cfg.data.kind in ("events", "table") and not cfg.data.contract:
        p.append(f"data.contract is empty: data.kind={cfg.data.kind!r} needs a contract YAML (conf/contracts/)")
    if not (isinstance(cfg.data.min_positives, int) and cfg.data.min_positives >= 0):
        p.append(f"data.min_positives={cfg.data.min_positives!r} must be an integer >= 0")
    if not cfg.data.dirichlet_alpha > 0:
        p.append(f"data.dirichlet_alpha={cfg.data.dirichlet_alpha} must be > 0")
    if not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", str(cfg.data.engine_memory_limit), re.I):
        p.append(f"data.engine_memory_limit={cfg.data.engine_memory_limit!r} must be a size such as '2GB' or '512MiB'")
    if cfg.data.horizon_days < 0:
        p.append(f"data.horizon_days={cfg.data.horizon_days} must be >= 1 (or 0: the contract's / the generator's)")
    if cfg.data.cutoff:
        import datetime

        try:
            datetime.date.fromisoformat(str(cfg.data.cutoff))
        except ValueError:
            p.append(f"data.cutoff={cfg.data.cutoff!r} must be a date YYYY-MM-DD (or empty: the contract's)")
    if cfg.data.kind == "synthetic" and not 1 <= cfg.data.min_customers <= cfg.data.max_customers:
        p.append(
            f"data.min_customers={cfg.data.min_customers}, data.max_customers={cfg.data.max_customers}:"
            " need 1 <= min_customers <= max_customers"
        )
    if not 1 <= cfg.release.min_rounds <= max(1, cfg.rounds):
        p.append(f"release.min_rounds={cfg.release.min_rounds} must be in [1, rounds={cfg.rounds}]")
    if not isinstance(cfg.release.key_dir, str) or not cfg.release.key_dir.strip():
        p.append(f"release.key_dir={cfg.release.key_dir!r} must be a directory path (the server's signing key)")
    sa, cd = cfg.secagg, cfg.central_dp
    if sa.enabled:
        if not 0.5 < sa.threshold_fraction <= 1:
            p.append(f"secagg.threshold_fraction={sa.threshold_fraction} must be in (0.5, 1]: a minority must never unmask")
        if sa.degree != 0 and (sa.degree < 2 or sa.degree % 2):
            p.append(f"secagg.degree={sa.degree} must be 0 (complete graph) or an even number >= 2")
        elif 0.5 < sa.threshold_fraction <= 1 and cfg.partners >= 2:  # t from the neighbourhood: h/2 < t <= h
            from federation.secagg.protocol import SecAggError, holders_count, threshold_from_neighbourhood

            n = cfg.partners
            try:
                threshold_from_neighbourhood(fraction=sa.threshold_fraction, holders=holders_count(
                    participants=n, degree=sa.degree if 0 < sa.degree < n - 1 else None))
            except SecAggError as exc:
                p.append(str(exc))
        if not sa.clip > 0:
            p.append(f"secagg.clip={sa.clip} must be > 0 (per-coordinate range of an update delta)")
        if not 16 <= sa.modulus_bits <= 64:
            p.append(f"secagg.modulus_bits={sa.modulus_bits} must be in [16, 64]")
        p += _allowed("secagg.rounding", sa.rounding, ("stochastic", "nearest"))
        if sa.weight_cap < 1:
            p.append(f"secagg.weight_cap={sa.weight_cap} must be >= 1 (examples)")
        if not sa.timeout > 0:
            p.append(f"secagg.timeout={sa.timeout} must be > 0 seconds")
        if cfg.strategy.name not in ("fedavg", "fedprox"):
            p.append(f"strategy.name={cfg.strategy.name!r} with secagg.enabled: use fedavg or fedprox (server "
                     "optimisers on a securely summed update are not implemented)")
    if cd.enabled:
        if not sa.enabled:
            p.append("central_dp.enabled needs secagg.enabled: partners add noise shares that only the secure sum hides")
        if not cd.noise_multiplier > 0:
            p.append(f"central_dp.noise_multiplier={cd.noise_multiplier} must be > 0")
        if not cd.clipping_norm > 0:
            p.append(f"central_dp.clipping_norm={cd.clipping_norm} must be > 0 (L2 bound of a partner's delta)")
        if not 0 < cd.delta < 1:
            p.append(f"central_dp.delta={cd.delta} must be in (0, 1)")
    if p:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {x}" for x in p))
    return cfg


def _typed(key: str, value: Any, default: Any) -> Any:
    """``value`` checked against the type of the key's default (bool, int, float, str), so a wrong type is one
    ConfigError naming the key, not a TypeError later (or a string epsilon silently read as "no DP"). An integral
    float is accepted for an integer key (20.0 -> 20); True / False are not numbers here."""
    kind = type(default)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is str:
        ok = isinstance(value, str)
    else:
        return value
    if not ok:
        what = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
        raise ConfigError(f"{key}={value!r} must be {what} (default {default!r})")
    return value


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = [k for k in data if k not in known]
    if unknown:
        full = ", ".join(prefix + k for k in unknown)
        raise ConfigError(f"unknown configuration key(s): {full}; known: {', '.join(prefix + k for k in known)}")
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            continue
        value = data[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{prefix + name} must be a group of keys, got {value!r}")
            value = _build(type(default), value, prefix + name + ".")
        else:
            value = _typed(prefix + name, value, default)
        kwargs[name] = value
    return cls(**kwargs)


def from_dict(data: Mapping[str, Any]) -> FedpropConfig:
    """Nested plain dict (e.g. OmegaConf.to_container) -> validated FedpropConfig."""
    data = {k: v for k, v in data.items() if k != "hydra"}
    return validate(_build(FedpropConfig, data, ""))


def to_dict(cfg: FedpropConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_hash(cfg: FedpropConfig) -> str:
    """SHA-256 over the canonical JSON of the resolved config (recorded with every release)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


# ---- The bridge to Flower's flat run config (values: int/float/bool/str; nested keys joined by ".").
def to_run_config(cfg: FedpropConfig) -> dict[str, int | float | bool | str]:
    flat: dict[str, int | float | bool | str] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in fields(obj):
            v = getattr(obj, f.name)
            key = prefix + f.name
            if dataclasses.is_dataclass(v):
                walk(v, key + ".")
            elif isinstance(v, list):
                flat[key] = ",".join(str(x) for x in v)
            else:
                flat[key] = v

    walk(cfg, "fedprop.")
    return flat


def from_run_config(run_config: Mapping[str, Any]) -> FedpropConfig:
    """Inverse of ``to_run_config``; unknown ``fedprop.*`` keys fail with their full name."""
    nested: dict[str, Any] = {}
    for key, value in run_config.items():
        if not key.startswith("fedprop."):
            continue
        parts = key[len("fedprop."):].split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    if isinstance(nested.get("model", {}).get("hidden"), str):
        raw = nested["model"]["hidden"]
        nested["model"]["hidden"] = [int(x) for x in raw.split(",") if x.strip()]
    return from_dict(nested)
