"""Strategy composition for the server: a Flower Message-API strategy (FedAvg / FedProx / FedAdam)
wrapped by ``RecordingStrategy``, which sorts replies before aggregation (determinism), records per-partner
train/eval metrics and refusals, and combines evaluation histograms into exact pooled metrics.
It wraps, it does not fork: every decision is delegated to the inner strategy.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable
from typing import Any, Callable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from federation import metrics as M
from federation.config import FedpropConfig

HIST = ".hist."


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def aggregate_eval_metrics(heads: tuple[str, ...]) -> Callable[[list[RecordDict], str], MetricRecord]:
    """Pooled metrics per head from summed histograms; example-weighted means of the scalar metrics."""

    def aggr(records: list[RecordDict], weight_key: str) -> MetricRecord:
        flats = [next(iter(r.metric_records.values())) for r in records]
        out: dict[str, Any] = {}
        total = sum(float(f[weight_key]) for f in flats)
        for key in sorted({k for f in flats for k in f.keys()}):
            if HIST in key or key in (weight_key, "partition-id"):
                continue
            vals = [(float(f[key]), float(f[weight_key])) for f in flats if key in f and _scalar(f[key])]
            vals = [(v, w) for v, w in vals if not math.isnan(v)]
            if vals:
                out[f"mean.{key}"] = sum(v * w for v, w in vals) / max(1e-12, sum(w for _, w in vals))
        for head in heads:
            hists = [M.from_flat(f, prefix=f"{head}{HIST}") for f in flats if f"{head}{HIST}bins" in f]
            if not hists:
                continue
            s = M.summarize(M.combine(hists))
            for k in ("auc_roc", "auc_tie_bound", "pr_auc", "log_loss", "brier", "ece", "top_decile_lift", "base_rate"):
                out[f"{head}.{k}"] = float(s[k])
        out[weight_key] = int(total)
        return MetricRecord(out)

    return aggr


def pooled_summaries(flats: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per head, every metric (incl. gains/lift and reliability curve) of the partners' combined histograms."""
    suffix = f"{HIST}bins"
    heads = sorted({k[: -len(suffix)] for f in flats for k in f if k.endswith(suffix)})
    return {h: M.summarize(M.combine([M.from_flat(f, prefix=f"{h}{HIST}") for f in flats if f"{h}{suffix}" in f]))
            for h in heads}


def build_strategy(cfg: FedpropConfig, *, heads: tuple[str, ...], num_partners: int) -> Strategy:
    common = dict(
        fraction_train=cfg.strategy.fraction_train,
        fraction_evaluate=cfg.strategy.fraction_evaluate,
        min_train_nodes=max(1, min(num_partners, math.ceil(cfg.strategy.fraction_train * num_partners))),
        min_evaluate_nodes=max(0, min(num_partners, math.ceil(cfg.strategy.fraction_evaluate * num_partners))),
        min_available_nodes=num_partners,
        evaluate_metrics_aggr_fn=aggregate_eval_metrics(heads),
        train_metrics_aggr_fn=lambda records, key: MetricRecord({key: sum(int(next(iter(r.metric_records.values()))[key]) for r in records)}),
    )
    name = cfg.strategy.name
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(proximal_mu=cfg.strategy.proximal_mu, **common)
    if name == "fedadam":
        return FedAdam(eta=cfg.strategy.server_lr, **common)
    raise ValueError(f"strategy.name={name!r} is not allowed; use one of fedavg, fedprox, fedadam")


def _reply_key(msg: Message) -> tuple:
    """Order-independent sort key: partition id reported by the partner, then a digest of its arrays."""
    if msg.has_error():
        return (1, msg.metadata.src_node_id, "")
    metrics = next(iter(msg.content.metric_records.values()), {})
    digest = hashlib.sha256()
    for rec in msg.content.array_records.values():
        for name in sorted(rec.keys()):
            digest.update(name.encode())
            digest.update(rec[name].data)
    return (0, int(metrics.get("partition-id", -1)), digest.hexdigest())


class RecordingStrategy(Strategy):
    """Delegating wrapper: deterministic aggregation order + per-partner records + progress output."""

    def __init__(self, inner: Strategy, *, on_round: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.inner = inner
        self.on_round = on_round
        self.rounds: list[dict[str, Any]] = []
        self._current: dict[str, Any] = {}
        self._mark = time.perf_counter()  # when the last configure_* returned (Flower then sends and waits)
        self.pooled: dict[str, dict[str, Any]] = {}  # head -> full summary (gains, reliability) of the last evaluation

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._current = {"round": server_round, "partners": {}, "refusals": [], "server": {}}
        messages = self.inner.configure_train(server_round, arrays, config, grid)
        self._mark = time.perf_counter()
        return messages

    def _timed(self, name: str, t0: float) -> None:
        """Server-side seconds of this round (wall clock): ``*-wait-s`` is Flower's send-and-receive (clients
        compute + engine overhead), the others are this server's own work."""
        self._current.setdefault("server", {})[name] = time.perf_counter() - t0

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        t0 = time.perf_counter()
        self._timed("train-wait-s", self._mark)
        result = self._aggregate_train(server_round, replies)
        self._timed("aggregate-train-s", t0)
        return result

    def _aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = sorted(replies, key=_reply_key)
        for msg in replies:
            if msg.has_error():
                self._current["refusals"].append({"node": msg.metadata.src_node_id, "code": msg.error.code, "reason": msg.error.reason})
                continue
            m = dict(next(iter(msg.content.metric_records.values())))
            self._current["partners"][str(int(m.get("partition-id", -1)))] = {"train": m}
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = self.inner.configure_evaluate(server_round, arrays, config, grid)
        self._mark = time.perf_counter()
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        t0 = time.perf_counter()
        self._timed("evaluate-wait-s", self._mark)
        replies = sorted(replies, key=_reply_key)
        for msg in replies:
            if msg.has_error():
                continue
            m = dict(next(iter(msg.content.metric_records.values())))
            pid = str(int(m.get("partition-id", -1)))
            scalars = {k: v for k, v in m.items() if HIST not in k}
            self._current["partners"].setdefault(pid, {})["evaluate"] = scalars
        self.pooled = pooled_summaries([dict(next(iter(m.content.metric_records.values()))) for m in replies if not m.has_error()])
        agg = self.inner.aggregate_evaluate(server_round, replies)
        self._current["evaluate"] = dict(agg) if agg is not None else {}
        self._timed("aggregate-evaluate-s", t0)
        self.rounds.append(self._current)
        if self.on_round:
            self.on_round(self._current)
        return agg
