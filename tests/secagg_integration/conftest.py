"""Shared pieces: a tiny config, and a Grid that delivers messages to a ClientApp in this process."""
from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from federation.config import FedpropConfig, from_dict


def tiny_config(tmp_path, **over) -> FedpropConfig:
    base = {
        "partners": 3, "rounds": 2, "privacy": {"epsilon": 4.0, "ledger_dir": str(tmp_path / "ledgers")},
        "model": {"kind": "logreg", "hidden": []}, "data": {"min_customers": 400, "max_customers": 900},
        "baselines": {"enabled": False}, "release": {"key_dir": str(tmp_path / "keys")},
        "secagg": {"enabled": True},
    }
    for key, value in over.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return from_dict(base)


class InProcessGrid:
    """Delivers each message to ``app`` in this process; an exception becomes an error reply (as Flower
    does); nodes in ``vanish`` never answer secagg stages at and after the named stage (a timeout)."""

    def __init__(self, app: ClientApp, n: int, *, vanish: dict[int, str] | None = None) -> None:
        self.app = app
        self.vanish = vanish or {}
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i, node_config={"partition-id": i, "num-partitions": n},
                              state=RecordDict(), run_config={})
            for i in range(n)
        }
        self.received: list[Message] = []  # every reply the server process receives

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        out = []
        for m in messages:
            ctx = self.contexts[m.metadata.dst_node_id]
            stage = m.content["secagg"]["stage"] if "secagg" in m.content else None
            if stage is not None and self.vanish.get(int(ctx.node_config["partition-id"])) == stage:
                continue
            try:
                out.append(self.app(m, ctx))
            except Exception as exc:  # noqa: BLE001 - mirrors Flower's error replies
                out.append(Message(Error(code=1, reason=repr(exc)), reply_to=m))
        self.received.extend(out)
        return out


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity):
    """Flower's run identity for messages built in-process (tests/conftest.py)."""
