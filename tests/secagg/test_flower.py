"""The Message-API driver: in-process against a fake Grid (fast), and once on Flower's simulation engine."""
from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from federation.secagg.flower import RECORD_KEY, STATE_KEY, handle_secagg, register_secagg, secure_sum
from federation.secagg.primitives import InsufficientSurvivorsError, QuantizationSpec, SecAggError
from federation.secagg.protocol import ClientState

D = 257
SPEC = QuantizationSpec(clip=1.0)


def update_of(pid: int) -> np.ndarray:
    return np.random.default_rng(pid).uniform(-1, 1, D)


class InProcessGrid:
    """Delivers each message to the ClientApp in this process; a raised exception becomes an error reply,
    as Flower does. Records every reply the server receives."""

    def __init__(self, app: ClientApp, n: int, *, fail: dict[int, str] | None = None) -> None:
        self.app = app
        self.fail = fail or {}  # partition id -> stage at which the node vanishes (no reply at all)
        self.contexts = {
            7_000_000_000_000_000_000 + i: Context(run_id=1, node_id=7_000_000_000_000_000_000 + i,
                                                   node_config={"partition-id": i}, state=RecordDict(), run_config={})
            for i in range(n)
        }
        self.replies: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        out = []
        for m in messages:
            ctx = self.contexts[m.metadata.dst_node_id]
            if self.fail.get(int(ctx.node_config["partition-id"])) == m.content[RECORD_KEY]["stage"]:
                continue  # timed out
            try:
                out.append(self.app(m, ctx))
            except Exception as exc:  # noqa: BLE001 - mirrors Flower's error replies
                out.append(Message(Error(code=1, reason=repr(exc)), reply_to=m))
        self.replies.extend(out)
        return out


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity):
    """Flower's run identity for messages built in-process (tests/conftest.py)."""


def make_app(seen: list[int] | None = None) -> ClientApp:
    app = ClientApp()

    def update_fn(message: Message, context: Context) -> np.ndarray:
        pid = int(context.node_config["partition-id"])
        if seen is not None:
            seen.append(int(message.content["round-config"]["server-round"]))
        if "fail" in message.content and pid == int(message.content["fail"]["partition"]):
            raise RuntimeError("training failed")
        return update_of(pid)

    register_secagg(app, update_fn=update_fn)
    return app


def run(grid: InProcessGrid, *, threshold: int = 3, degree: int | None = None, fail_partition: int = -1):
    extra = RecordDict({"round-config": ConfigRecord({"server-round": 4}),
                        "fail": ConfigRecord({"partition": fail_partition})})
    return secure_sum(grid, node_ids=grid.get_node_ids(), vector_length=D, threshold=threshold,  # type: ignore[arg-type]
                      quantization=SPEC, degree=degree, timeout=5.0, extra_content=extra)


def expected(pids: Iterable[int]) -> np.ndarray:
    return np.sum([update_of(p) for p in pids], axis=0)


def test_secure_sum_over_messages_equals_plain_sum() -> None:
    seen: list[int] = []
    grid = InProcessGrid(make_app(seen), 5)
    result = run(grid)
    assert len(result.survivors) == 5 and result.dropped == ()
    assert np.abs(result.total - expected(range(5))).max() <= result.error_bound
    assert seen == [4] * 5  # extra_content reached update_fn at the masked-input stage


@pytest.mark.parametrize("fail", [{1: "share_keys"}, {1: "masked_input", 3: "masked_input"}, {0: "unmask", 4: "unmask"},
                                  {2: "advertise", 0: "unmask"}])
def test_dropouts_at_every_stage(fail: dict[int, str]) -> None:
    grid = InProcessGrid(make_app(), 6, fail=fail)
    result = run(grid, threshold=4)
    contributed = {p for p in range(6) if fail.get(p) not in ("advertise", "share_keys", "masked_input")}
    assert {int(grid.contexts[u].node_config["partition-id"]) for u in result.survivors} == contributed
    assert np.abs(result.total - expected(contributed)).max() <= result.error_bound


def test_update_fn_error_is_a_dropout_and_too_many_abort() -> None:
    grid = InProcessGrid(make_app(), 4)
    result = run(grid, fail_partition=2)
    assert np.abs(result.total - expected([0, 1, 3])).max() <= result.error_bound
    grid = InProcessGrid(make_app(), 4, fail={0: "unmask", 1: "unmask"})
    with pytest.raises(InsufficientSurvivorsError, match="aborted"):
        run(grid)


def test_secaggplus_over_messages() -> None:
    grid = InProcessGrid(make_app(), 10, fail={3: "masked_input"})
    result = run(grid, threshold=3, degree=4)
    assert np.abs(result.total - expected(set(range(10)) - {3})).max() <= result.error_bound


def test_private_keys_and_updates_never_leave_the_node() -> None:
    grid = InProcessGrid(make_app(), 4)
    run(grid)
    wire = b"".join(
        bytes(v) for r in grid.replies for rec in r.content.values() for v in rec.values()  # type: ignore[union-attr]
    )
    for ctx in grid.contexts.values():
        # After the round the state is wiped of shares, but the private keys are still there to compare.
        state = ClientState.from_bytes(bytes(ctx.state[STATE_KEY]["state"]))  # type: ignore[arg-type]
        assert state.stage == "done"
        for secret in (state.c_private, state.s_private):
            assert secret not in wire
        xq = update_of(int(ctx.node_config["partition-id"]))
        assert xq.astype("<f8").tobytes() not in wire


def test_client_refuses_message_from_another_round() -> None:
    grid = InProcessGrid(make_app(), 4)
    run(grid)
    ctx = next(iter(grid.contexts.values()))
    stray = Message(
        RecordDict({RECORD_KEY: ConfigRecord({"stage": "unmask", "payload": b'{"round": "00", "survivors": [], '
                                                                            b'"dropped": []}'})}),
        dst_node_id=ctx.node_id, message_type="query.secagg",
    )
    with pytest.raises(SecAggError, match="another SecAgg round"):
        handle_secagg(stray, ctx, update_fn=lambda m, c: np.zeros(D))


@pytest.mark.slow
def test_secure_sum_on_flower_simulation_engine() -> None:
    from flwr.simulation import run_simulation

    results = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        deadline = time.monotonic() + 60
        nodes: list[int] = []
        while len(nodes) < 4 and time.monotonic() < deadline:
            nodes = sorted(grid.get_node_ids())
            time.sleep(0.1)
        for fail in (-1, 3):
            extra = RecordDict({"round-config": ConfigRecord({"server-round": 4}),
                                "fail": ConfigRecord({"partition": fail})})
            results.append(secure_sum(grid, node_ids=nodes, vector_length=D, threshold=3, quantization=SPEC,
                                      timeout=120.0, extra_content=extra))

    run_simulation(server_app=server_app, client_app=make_app(), num_supernodes=4,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    assert len(results) == 2, "the ServerApp did not complete both secure sums"
    full, partial = results
    assert len(full.survivors) == 4 and np.abs(full.total - expected(range(4))).max() <= full.error_bound
    assert len(partial.survivors) == 3 and len(partial.dropped) == 1
    assert np.abs(partial.total - expected(range(3))).max() <= partial.error_bound


def test_a_witness_record_is_small_public_metadata_or_ignored():
    """The masked-input reply may carry a witness record in the clear (a partner's ledger head). The server keeps
    only small int / short-str entries; anything else is ignored without dropping the node's masked input."""
    import pytest
    from flwr.app import ConfigRecord

    from federation.secagg.flower import _parse_witness
    from federation.secagg.primitives import SecAggError

    head = {"entry-seq": 7, "entry-hash": "ab" * 32, "update-hash": "cd" * 32, "ledger-id": "x", "ledger-partner": "acme"}
    assert _parse_witness(ConfigRecord(head)) == head
    for bad in ({f"k{i}": 1 for i in range(9)}, {"entry-hash": "a" * 129}, {"entry-seq": True},
                {"entry-hash": b"raw bytes"}, {"entry-seq": 1.5}):
        with pytest.raises(SecAggError):
            _parse_witness(ConfigRecord(bad))
