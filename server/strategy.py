"""Strategy composition for the server: a Flower Message-API strategy (FedAvg / FedProx / FedAdam)
wrapped by ``RecordingStrategy``, which sorts replies before aggregation (determinism), records per-partner
train/eval metrics and refusals, and combines evaluation histograms into exact pooled metrics.
It wraps, it does not fork: every decision is delegated to the inner strategy. A resumed run
(``round_offset=k``) lets Flower's loop count 1..R-k and hands the inner strategy, the nodes and the records
the run's own rounds k+1..R.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable
from typing import Any, Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from federation import metrics as M
from federation.config import FedpropConfig, min_partners

HIST = ".hist."


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


HEAD_KEYS = ("auc_roc", "auc_tie_bound", "pr_auc", "log_loss", "brier", "ece", "top_decile_lift", "base_rate")


def _heads_in(flats: list[dict[str, Any]]) -> list[str]:
    suffix = f"{HIST}format_version"
    return sorted({k[: -len(suffix)] for f in flats for k in f if k.endswith(suffix)})


def summarize_head(flats: list[dict[str, Any]], head: str) -> dict[str, Any]:
    """Every metric of ``head`` from the partners' evaluation records: DP releases (noisy counts, format 2) are
    summed raw and then clipped, with 95% noise intervals; exact histograms (non-private runs) are combined."""
    prefix = f"{head}{HIST}"
    rows = [f for f in flats if f"{prefix}format_version" in f]
    if rows and all(M.is_release(f, prefix=prefix) for f in rows):
        return M.summarize_release(M.combine_releases(rows, prefix=prefix))
    return M.summarize(M.combine([M.from_flat(f, prefix=prefix) for f in rows]))


def aggregate_eval_metrics(heads: tuple[str, ...]) -> Callable[[list[RecordDict], str], MetricRecord]:
    """Pooled metrics per head from the partners' summed releases, with their noise half-widths."""

    def aggr(records: list[RecordDict], weight_key: str) -> MetricRecord:
        flats = [dict(next(iter(r.metric_records.values()))) for r in records]
        out: dict[str, Any] = {weight_key: len(flats)}
        for head in heads:
            if not any(f"{head}{HIST}format_version" in f for f in flats):
                continue
            s = summarize_head(flats, head)
            for k in HEAD_KEYS:
                out[f"{head}.{k}"] = float(s[k])
                if f"{k}_half_width" in s:
                    out[f"{head}.{k}_half_width"] = float(s[f"{k}_half_width"])
                    out[f"{head}.{k}_meaningful"] = int(bool(s[f"{k}_meaningful"]))
        return MetricRecord(out)

    return aggr


def pooled_summaries(flats: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per head, every metric (incl. gains/lift and reliability curve) of the partners' combined releases."""
    return {h: summarize_head(flats, h) for h in _heads_in(flats)}


def partner_summary(flat: dict[str, Any]) -> dict[str, Any]:
    """One partner's own metrics (from its own release), with noise half-widths: what the server may record."""
    out: dict[str, Any] = {}
    for head in _heads_in([flat]):
        s = summarize_head([flat], head)
        for k in ("auc_roc", "top_decile_lift", "ece", "base_rate"):
            out[f"{head}.{k}"] = float(s[k])
            if f"{k}_half_width" in s:
                out[f"{head}.{k}_half_width"] = float(s[f"{k}_half_width"])
                out[f"{head}.{k}_meaningful"] = bool(s[f"{k}_meaningful"])
    return out


def build_strategy(cfg: FedpropConfig, *, heads: tuple[str, ...], num_partners: int) -> Strategy:
    common = dict(
        fraction_train=cfg.strategy.fraction_train,
        fraction_evaluate=cfg.strategy.fraction_evaluate,
        # a round needs min_partners online (not all): one dead partner must not stall the federation
        min_train_nodes=max(1, min(min_partners(cfg), math.ceil(cfg.strategy.fraction_train * num_partners))),
        min_evaluate_nodes=max(0, min(min_partners(cfg), math.ceil(cfg.strategy.fraction_evaluate * num_partners))),
        min_available_nodes=min_partners(cfg),
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


def partner_id(msg: Message) -> str:
    """How the server names the partner of a reply: its onboarding name (``partner`` record) when it sends one,
    else its partition id (simulations)."""
    if "partner" in msg.content.config_records:
        return str(msg.content["partner"]["name"])
    return str(partition_id(next(iter(msg.content.metric_records.values()), {})))


def partition_id(metrics) -> int:
    """The partition id a reply reports, -1 when absent or not an integer (a hostile reply must not raise here)."""
    v = metrics.get("partition-id", -1) if hasattr(metrics, "get") else -1
    return int(v) if _scalar(v) and math.isfinite(v) and int(v) == v else -1


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
    return (0, partner_id(msg), digest.hexdigest())


INVALID_UPDATE = "invalid-update"


def screen_update(msg: Message, reference: ArrayRecord | None) -> str | None:
    """Why a plain train reply cannot be aggregated, or None. One hostile partner must not crash the server (a
    shape FedAvg cannot broadcast), poison the global model (NaN / inf weights) or stall the round: such a reply is
    set aside like a refusal. ``reference``: the global model sent this round (names, shapes and dtypes; public).
    The reason names keys and shapes only, never a value."""
    records = list(msg.content.array_records.values())
    if len(records) != 1:
        return f"{len(records)} array records (expected 1: the model)"
    arrays = records[0]
    if reference is not None:
        if list(arrays.keys()) != list(reference.keys()):
            return f"parameter names {sorted(arrays.keys())} differ from the global model's {sorted(reference.keys())}"
        for k in reference.keys():
            got, want = arrays[k], reference[k]
            if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
                return f"parameter {k!r} is {got.dtype}{list(got.shape)}, the global model's {want.dtype}{list(want.shape)}"
    for k in arrays.keys():
        if not np.all(np.isfinite(arrays[k].numpy())):
            return f"parameter {k!r} holds NaN or infinite values"
    n = next(iter(msg.content.metric_records.values()), {}).get("num-examples")
    if not _scalar(n) or not math.isfinite(n) or n < 1 or int(n) != n:
        return "num-examples (the FedAvg weight) is missing or not a positive integer"
    return None


def set_aside(refusals: list, *, node: int, partner: str, why: str, stage: str, server_round: int) -> None:
    """Record a reply that ``screen_update`` / ``screen_evaluation`` rejected with the round's refusals, and say so."""
    refusals.append({"node": node, "partner": partner, "code": INVALID_UPDATE, "reason": why})
    what = "update" if stage == "training" else "release"
    done = "aggregated" if stage == "training" else "pooled"
    print(f"fedprop: round {server_round} {stage}: the {what} of partner {partner} (node {node}) is not {done}: {why}",
          flush=True)


MAX_RELEASED_COUNT = 2 ** 40  # a noisy per-bin count beyond this is not a customer count (and overflows int64 sums)


def screen_evaluation(flat: dict[str, Any], edges: tuple[float, ...] | None) -> str | None:
    """Why one partner's evaluation reply cannot be pooled, or None: every head it reports must be a well-formed
    release on the federation's public bin ``edges`` with finite, bounded counts, and summarise on its own. A
    hostile partner's malformed histogram is set aside instead of failing the whole round's evaluation. The reason
    names keys only, never a value."""
    for head in _heads_in([flat]):
        prefix = f"{head}{HIST}"
        if M.is_release(flat, prefix=prefix):
            try:
                same = edges is None or tuple(float(x) for x in flat[f"{prefix}edges"]) == tuple(edges)
                counts = [np.asarray(flat[f"{prefix}{k}"], dtype=np.float64) for k in ("pos", "neg")]
            except (KeyError, TypeError, ValueError):
                return f"{prefix}edges / pos / neg are missing or not numbers"
            if not same:
                return f"{prefix}edges are not the federation's public bin edges"
            bins = len(edges) - 1 if edges is not None else counts[0].shape[0]
            if any(c.shape != (bins,) or not np.all(np.isfinite(c)) or np.any(np.abs(c) > MAX_RELEASED_COUNT)
                   for c in counts):
                return f"{prefix}pos / neg are not {bins} finite counts"
        try:
            summarize_head([flat], head)
        except Exception:  # noqa: BLE001 -- a partner's reply must never raise in the server
            return f"{prefix}* is not a valid evaluation record"
    return None


def ledger_head(led, node: int) -> dict[str, Any]:
    """A partner's reported ledger head (a plain train reply's ``ledger`` record, or a secure round's witness) as the
    round record keeps it: the server's witness against a later rollback of that ledger."""
    sig = led["head-signature"] if "head-signature" in led else ""
    return {"entry-seq": int(led["entry-seq"]), "entry-hash": str(led["entry-hash"]),
            "update-hash": str(led["update-hash"]) if "update-hash" in led else "", "node": int(node),
            **{k: str(led[k]) for k in ("ledger-id", "ledger-partner") if k in led},
            **({"head-signature": sig} if isinstance(sig, str) and len(sig) == 128 else {})}


def record_key(partners: dict[str, Any], name: str, node: int) -> str:
    """The round record's key for a reply from ``node`` naming itself ``name``: the name, unless another node
    already used it this round (then the name with the node id, and a warning): a hostile node that claims another
    partner's name must not overwrite that partner's record (its ledger head is the server's witness)."""
    if name not in partners or (partners[name].get("ledger") or {}).get("node", node) == node:
        return name
    print(f"fedprop: WARNING: two nodes reply as partner {name!r} this round (node {partners[name]['ledger']['node']} "
          f"and node {node}); both are recorded, and only heads signed by the partner's own ledger key count as "
          "its witness", flush=True)
    return f"{name} (node {node})"


class RecordingStrategy(Strategy):
    """Delegating wrapper: deterministic aggregation order + per-partner records + progress output."""

    def __init__(self, inner: Strategy, *, on_round: Callable[[dict[str, Any]], None] | None = None,
                 evaluate_rounds: Iterable[int] | None = None, round_offset: int = 0,
                 on_aggregate: Callable[[int, ArrayRecord], None] | None = None,
                 eval_edges: tuple[float, ...] | None = None) -> None:
        self.inner = inner
        self.eval_edges = eval_edges  # the federation's public score-bin edges (evaluation.bins): replies must use them
        self.on_aggregate = on_aggregate  # (round, new global model): the checkpoint, written before the round's record
        self._arrays: ArrayRecord | None = None  # the global model sent this round (kept when nothing aggregates)
        self.round_offset = int(round_offset)  # rounds done before a resume: loop round r is the run's round r + offset
        self.evaluate_rounds = None if evaluate_rounds is None else frozenset(evaluate_rounds)
        self.on_round = on_round
        self.rounds: list[dict[str, Any]] = []
        self._current: dict[str, Any] = {}
        self._mark = time.perf_counter()  # when the last configure_* returned (Flower then sends and waits)
        self.pooled: dict[str, dict[str, Any]] = {}  # head -> full summary (gains, reliability) of the last evaluation
        self.names: dict[int, str] = {}  # node id -> partner name, learned from its earlier replies
        self._sent: list[int] = []  # node ids asked in the current stage

    def _missing(self, msg: Message) -> dict[str, Any]:
        """An error reply (refusal, dead node, timeout), as recorded. Flower's reply for a dead node does not carry
        that node's id, so who is missing is found by ``_announce_missing``."""
        return {"node": msg.metadata.src_node_id, "code": msg.error.code, "reason": msg.error.reason}

    def _announce_missing(self, replies: list[Message], stage: str, server_round: int) -> None:
        """Name every partner that was asked this round, or took part in an earlier round, and sent no usable reply
        now (names learned from earlier replies: a dead node sends nothing, and once its heartbeat is lost Flower no
        longer asks it), in the round record and a log line."""
        ok = {int(m.metadata.src_node_id) for m in replies if not m.has_error()}
        every = float(getattr(self.inner, "fraction_train" if stage == "training" else "fraction_evaluate", 1.0)) >= 1.0
        known = list(self.names) if every else []  # sampling a fraction: an unasked partner is not missing
        gone = [n for n in dict.fromkeys([*self._sent, *known]) if n not in ok]
        if not gone:
            return
        names = [self.names.get(n, f"node {n}") for n in gone]
        self._current.setdefault("missing", {})[stage] = names
        why = sorted({str(m.error.reason).splitlines()[0][:160] for m in replies if m.has_error() and m.error.reason})
        print(f"fedprop: round {server_round} {stage}: no usable reply from {', '.join(names)}"
              + (f" ({'; '.join(why)})" if why else " (no reply before strategy.round_timeout)")
              + f"; the round continues with {len(ok)} partner(s)", flush=True)

    def _remember(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        self._sent = [int(m.metadata.dst_node_id) for m in messages]
        return messages

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self._arrays = arrays
        self._current = {"round": server_round, "partners": {}, "refusals": [], "server": {}}
        messages = self._remember(self.inner.configure_train(server_round, arrays, config, grid))
        self._mark = time.perf_counter()
        return messages

    def _timed(self, name: str, t0: float) -> None:
        """Server-side seconds of this round (wall clock): ``*-wait-s`` is Flower's send-and-receive (clients
        compute + engine overhead), the others are this server's own work."""
        self._current.setdefault("server", {})[name] = time.perf_counter() - t0

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        t0 = time.perf_counter()
        self._timed("train-wait-s", self._mark)
        result = self._aggregate_train(server_round + self.round_offset, replies)
        self._timed("aggregate-train-s", t0)
        if self.on_aggregate is not None:
            arrays = result[0] if result[0] is not None else self._arrays
            if arrays is not None:
                self.on_aggregate(server_round + self.round_offset, arrays)
        return result

    def _aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies, screened = sorted(replies, key=_reply_key), []
        for msg in replies:
            if msg.has_error():
                self._current["refusals"].append(self._missing(msg))
                continue
            name = self.names[int(msg.metadata.src_node_id)] = partner_id(msg)
            why = screen_update(msg, self._arrays)
            if why is not None:  # set aside: recorded with the refusals, not aggregated, not counted as trained
                set_aside(self._current["refusals"], node=msg.metadata.src_node_id, partner=name, why=why,
                          stage="training", server_round=server_round)
                continue
            screened.append(msg)
            m = dict(next(iter(msg.content.metric_records.values())))
            rec: dict[str, Any] = {"train": m}
            if "ledger" in msg.content.config_records:  # the partner's ledger head after recording this release:
                rec["ledger"] = ledger_head(msg.content["ledger"], msg.metadata.src_node_id)
            parts = self._current["partners"]
            parts[record_key(parts, name, int(msg.metadata.src_node_id))] = rec
        self._announce_missing(replies, "training", server_round)
        return self.inner.aggregate_train(server_round, screened)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        if self.evaluate_rounds is not None and server_round not in self.evaluate_rounds:
            self._mark = time.perf_counter()  # evaluation is a DP release: only the scheduled rounds ask for it
            self._sent = []
            return []
        messages = self._remember(self.inner.configure_evaluate(server_round, arrays, config, grid))
        self._mark = time.perf_counter()
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        t0 = time.perf_counter()
        server_round += self.round_offset
        self._timed("evaluate-wait-s", self._mark)
        replies, usable = sorted(replies, key=_reply_key), []
        for msg in replies:
            if msg.has_error():
                self._current.setdefault("evaluate_refusals", []).append(self._missing(msg))
                usable.append(msg)  # Flower's strategy counts the failures
                continue
            m = dict(next(iter(msg.content.metric_records.values()), {}))
            pid = partner_id(msg)
            why = screen_evaluation(m, self.eval_edges)
            if why is not None:
                set_aside(self._current.setdefault("evaluate_refusals", []), node=msg.metadata.src_node_id,
                          partner=pid, why=why, stage="evaluation", server_round=server_round)
                continue
            usable.append(msg)
            self.names[int(msg.metadata.src_node_id)] = pid
            ev = {k: v for k, v in m.items() if HIST not in k and k != "partition-id"}
            ev.update(partner_summary(m))
            parts, node = self._current["partners"], int(msg.metadata.src_node_id)
            # under the record of the node that trained as this partner this round (a node claiming another's name
            # gets its own record: it must not overwrite that partner's evaluation nor its witnessed head)
            rec = parts.setdefault(record_key(parts, pid, node), {})
            rec["evaluate"] = ev
            if "ledger" in msg.content.config_records:  # the head after recording the evaluation releases: witnessed
                rec["evaluation-ledger"] = ledger_head(msg.content["ledger"], node)
        if self.evaluate_rounds is None or server_round in self.evaluate_rounds:
            self._announce_missing(replies, "evaluation", server_round)  # unscheduled rounds asked nobody
        ok = [dict(next(iter(m.content.metric_records.values()))) for m in usable if not m.has_error()]
        if ok:
            self.pooled = pooled_summaries(ok)
        agg = self.inner.aggregate_evaluate(server_round, usable) if ok else None
        self._current["evaluate"] = dict(agg) if agg is not None else {}
        self._timed("aggregate-evaluate-s", t0)
        self.rounds.append(self._current)
        if self.on_round:
            self.on_round(self._current)
        return agg
