"""A hostile partner against the REAL server-side driver (``secure_sum`` over Flower messages).

Each attack rewrites one node's reply at one stage (after the honest ClientApp produced it). Every round must
either complete without that node (exactly the plain sum of the others), complete with it contributing what an
in-range input could (for attacks on its own masked vector), or abort cleanly with RoundAbortedError. Nothing
else may be raised, and no wrong aggregate may come out.
"""
from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict

from federation.secagg.flower import RECORD_KEY, secure_sum
from federation.secagg.primitives import AggregateRejectedError, InsufficientSurvivorsError, RoundAbortedError

from .test_flower import D, SPEC, InProcessGrid, expected, make_app, update_of

N = 5
HOSTILE = 4  # partition id of the hostile node (answers last, so it can copy the others' replies)
LEVELS = SPEC.levels

Mutation = Callable[[dict[str, Any], dict[int, dict[str, Any]], "HostileGrid"], dict[str, Any] | None]


class HostileGrid(InProcessGrid):
    """The honest app answers; then ``mutate`` rewrites the hostile node's reply at ``stage``."""

    def __init__(self, stage: str, mutate: Mutation) -> None:
        super().__init__(make_app(), N)
        self.stage, self.mutate = stage, mutate
        self.pid = {u: int(c.node_config["partition-id"]) for u, c in self.contexts.items()}
        self.node = {p: u for u, p in self.pid.items()}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        out, honest = [], {}
        for m in sorted(messages, key=lambda m: self.pid[m.metadata.dst_node_id]):
            ctx = self.contexts[m.metadata.dst_node_id]
            try:
                reply = self.app(m, ctx)
            except Exception as exc:  # noqa: BLE001 - mirrors Flower's error replies
                out.append(Message(Error(code=1, reason=repr(exc)), reply_to=m))
                continue
            stage = m.content[RECORD_KEY]["stage"]
            if self.pid[ctx.node_id] == HOSTILE and stage == self.stage and not reply.has_error():
                new = self.mutate(dict(reply.content[RECORD_KEY]), honest, self)
                if new is None:
                    continue
                reply = Message(RecordDict({RECORD_KEY: ConfigRecord(new)} if new else {}), reply_to=m)
            elif not reply.has_error():
                honest[ctx.node_id] = dict(reply.content[RECORD_KEY])
            out.append(reply)
        return out


# ------------------------------------------------------------------------------------------ mutations
def pj(rec: dict[str, Any]) -> Any:
    return json.loads(bytes(rec["payload"]))


def with_payload(rec: dict[str, Any], payload: Any) -> dict[str, Any]:
    return {**rec, "payload": json.dumps(payload).encode()}


def b64(x: bytes) -> str:
    return base64.b64encode(x).decode()


def advert(rec, fn):  # change the 5-field advert list [c, s, commitment, identity, signature]
    keys = pj(rec)["keys"]
    return with_payload(rec, {"keys": fn(keys)})


def set_key(i: int, raw: bytes):
    return lambda rec, honest, g: advert(rec, lambda k: k[:i] + [b64(raw)] + k[i + 1:])


def first_other(honest):
    return pj(next(iter(honest.values())))


def shares(rec, fn):
    return with_payload(rec, {"shares": fn(pj(rec)["shares"])})


def one_share(fn):  # rewrite the ciphertext for the lowest recipient
    def go(rec, honest, g):
        def edit(s):
            k = sorted(s)[0]
            return {**s, k: fn(s[k])}
        return shares(rec, edit)
    return go


def masked(rec, fn):
    y = np.frombuffer(bytes(rec["masked"]), dtype="<u8").copy()
    return {**rec, "masked": fn(y).astype("<u8").tobytes()}


def unmask(rec, fn):
    p = pj(rec)
    return with_payload(rec, fn(p["b"], p["s"]))


def flip_first_b_share_of_other(b, s):
    k = sorted(x for x in b)[0]
    raw = bytearray(base64.b64decode(b[k]))
    raw[-1] ^= 1
    return {"b": {**b, k: b64(bytes(raw))}, "s": s}


ORDER4 = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")  # low-order point
RNG = np.random.default_rng(5)

# kind -> (stage, mutation, expected outcome); outcomes: "excluded" (round completes without the hostile node),
# "ignored" (its unmask reply is dropped, its valid masked input still counts), "bounded" (its own masked vector
# was altered: no protocol can bound one input without range proofs; the sum stays inside what N in-range
# inputs could give, and the FedAvg step check bounds it further), "abort" (RoundAbortedError).
ATTACKS: dict[str, tuple[str, Mutation, str]] = {
    "adv-json-int-for-base64": ("advertise", lambda r, h, g: advert(r, lambda k: [12345] + k[1:]), "excluded"),
    "adv-deep-nesting": ("advertise", lambda r, h, g: {**r, "payload": b"[" * 100_000 + b"]" * 100_000}, "excluded"),
    "adv-not-json": ("advertise", lambda r, h, g: {**r, "payload": b"\xff\xfe{not json"}, "excluded"),
    "adv-nan-constant": ("advertise", lambda r, h, g: {**r, "payload": b'{"keys": NaN}'}, "excluded"),
    "adv-unknown-field": ("advertise", lambda r, h, g: with_payload(r, {**pj(r), "extra": 1}), "excluded"),
    "adv-missing-field": ("advertise", lambda r, h, g: with_payload(r, {}), "excluded"),
    "adv-payload-as-str": ("advertise", lambda r, h, g: {**r, "payload": "keys"}, "excluded"),
    "adv-extra-record-entry": ("advertise", lambda r, h, g: {**r, "junk": b"x"}, "excluded"),
    "adv-no-secagg-record": ("advertise", lambda r, h, g: {}, "excluded"),
    "adv-oversized": ("advertise", lambda r, h, g: with_payload(r, {"keys": ["A" * 100_000] * 5}), "excluded"),
    "adv-all-zero-x25519": ("advertise", set_key(0, bytes(32)), "excluded"),
    "adv-low-order-x25519": ("advertise", set_key(1, ORDER4), "excluded"),
    "adv-short-key": ("advertise", set_key(0, bytes(range(31))), "excluded"),
    "adv-c-equals-s": ("advertise", lambda r, h, g: advert(r, lambda k: [k[0], k[0]] + k[2:]), "excluded"),
    "adv-replayed-public-key": ("advertise", lambda r, h, g: advert(r, lambda k: [first_other(h)["keys"][0]] + k[1:]),
                                "excluded-and-victim"),
    "adv-bad-signature": ("advertise", lambda r, h, g: advert(r, lambda k: k[:3] + [b64(bytes(32) + b"\x01"),
                                                                                 b64(bytes(64))]), "excluded"),
    "adv-wrong-list-length": ("advertise", lambda r, h, g: advert(r, lambda k: k[:4]), "excluded"),
    # (the node's own app then refuses the echo of its altered advert; test_protocol_hostile plays a consistent liar)
    "adv-false-commitment": ("advertise", lambda r, h, g: advert(r, lambda k: k[:2] + [b64(bytes(32))] + k[3:]),
                             "excluded"),
    "sh-omit-recipient": ("share_keys", lambda r, h, g: shares(r, lambda s: dict(sorted(s.items())[1:])), "excluded"),
    "sh-extra-recipient": ("share_keys", lambda r, h, g: shares(r, lambda s: {**s, "12345": next(iter(s.values()))}),
                           "excluded"),
    "sh-non-numeric-node-id": ("share_keys", lambda r, h, g: shares(r, lambda s: {("x" + k if i == 0 else k): v for i, (k, v)
                                                                                in enumerate(sorted(s.items()))}),
                               "excluded"),
    "sh-int-ciphertext": ("share_keys", one_share(lambda v: 7), "excluded"),
    "sh-truncated-ciphertext": ("share_keys", one_share(lambda v: b64(base64.b64decode(v)[:-1])), "excluded"),
    "sh-garbage-ciphertext": ("share_keys", one_share(lambda v: b64(RNG.bytes(len(base64.b64decode(v))))), "excluded"),
    "sh-swapped-ciphertexts": ("share_keys", lambda r, h, g: shares(r, lambda s: dict(zip(sorted(s), reversed(
        [s[k] for k in sorted(s)])))), "excluded"),
    "sh-deep-nesting": ("share_keys", lambda r, h, g: {**r, "payload": b'{"shares":' + b"[" * 5000 + b"]" * 5000 + b"}"},
                        "excluded"),
    "mk-word-at-2^k": ("masked_input", lambda r, h, g: masked(r, lambda y: np.where(np.arange(D) == 0,
                                                                                  np.uint64(1 << 32), y)), "excluded"),
    "mk-short-vector": ("masked_input", lambda r, h, g: {**r, "masked": bytes(r["masked"])[:-8]}, "excluded"),
    "mk-masked-as-str": ("masked_input", lambda r, h, g: {**r, "masked": "AAAA"}, "excluded"),
    "mk-missing-payload": ("masked_input", lambda r, h, g: {"masked": r["masked"]}, "excluded"),
    "mk-accuse-non-neighbour": ("masked_input", lambda r, h, g: with_payload(r, {"rejected": ["999"]}), "excluded"),
    # a lying accuser did add the pair mask it disowns: the unmasked sum is garbage and rejected
    "mk-accuse-honest-neighbour": ("masked_input", lambda r, h, g: with_payload(r, {"rejected": [str(g.node[0])]}),
                                   "abort"),
    "mk-small-offset": ("masked_input", lambda r, h, g: masked(r, lambda y: (y + np.uint64(12345)) & np.uint64(2**32 - 1)),
                        "bounded"),
    "mk-uniform-garbage": ("masked_input", lambda r, h, g: masked(r, lambda y: RNG.integers(0, 2**32, D, dtype=np.uint64)),
                           "abort"),
    "um-flipped-b-share": ("unmask", lambda r, h, g: unmask(r, flip_first_b_share_of_other), "ignored"),
    "um-both-share-kinds": ("unmask", lambda r, h, g: unmask(r, lambda b, s: {"b": b, "s": {sorted(b)[0]: b[sorted(b)[0]]}}),
                            "ignored"),
    "um-share-wrong-length": ("unmask", lambda r, h, g: unmask(r, lambda b, s: {"b": {k: b64(b"\x01" * 65) for k in b},
                                                                                "s": s}), "ignored"),
    "um-share-for-stranger": ("unmask", lambda r, h, g: unmask(r, lambda b, s: {"b": {**b, "31337": next(iter(b.values()))},
                                                                                "s": s}), "ignored"),
    "um-all-shares-garbage": ("unmask", lambda r, h, g: unmask(r, lambda b, s: {"b": {k: b64(RNG.bytes(66)) for k in b},
                                                                                "s": s}), "ignored"),
    "um-deep-nesting": ("unmask", lambda r, h, g: {**r, "payload": b"{" * 3000}, "ignored"),
    "um-unknown-field": ("unmask", lambda r, h, g: with_payload(r, {**pj(r), "z": []}), "ignored"),
}


def test_at_least_thirty_kinds() -> None:
    assert len(ATTACKS) >= 30


@pytest.mark.parametrize("kind", sorted(ATTACKS))
def test_hostile_reply_never_breaks_the_round(kind: str) -> None:
    stage, mutate, outcome = ATTACKS[kind]
    grid = HostileGrid(stage, mutate)
    try:
        result = secure_sum(grid, node_ids=grid.get_node_ids(), vector_length=D, threshold=3,  # type: ignore[arg-type]
                            quantization=SPEC, timeout=5.0)
    except RoundAbortedError as exc:
        assert outcome == "abort", f"{kind}: aborted ({exc}) but expected {outcome}"
        assert "No aggregate is released" in str(exc) or isinstance(exc, AggregateRejectedError)
        return
    assert outcome != "abort", f"{kind}: expected a clean abort, the round completed"
    summed = {grid.pid[u] for u in result.survivors}
    eb = result.error_bound
    if outcome in ("excluded", "excluded-and-victim"):
        assert HOSTILE not in summed
        assert grid.node[HOSTILE] in result.excluded or grid.node[HOSTILE] in result.dropped
        if outcome == "excluded":
            assert summed == set(range(N)) - {HOSTILE}
        else:  # a replayed key excludes both adverts carrying it: the hostile node and the copied one
            assert len(summed) == N - 2
    elif outcome == "ignored":  # its valid masked input counts; its unmask reply was dropped (or its bad shares)
        assert summed == set(range(N)) and result.excluded[grid.node[HOSTILE]] in ("unmask-malformed", "unmask-bad-share")
    if outcome == "bounded":
        assert HOSTILE in summed and np.all(np.abs(result.total) <= len(summed) * SPEC.clip + eb)
        rest = result.total - expected(summed - {HOSTILE})
        assert np.abs(rest - update_of(HOSTILE)).max() > eb  # the attack did change its input
    else:
        assert np.abs(result.total - expected(summed)).max() <= eb, f"{kind}: wrong aggregate"


def test_sum_outside_the_quantization_range_is_rejected_not_released() -> None:
    """A masked vector whose unmasked value exceeds the range (as a wrap-around would) is caught by the
    integer range check: n * levels < 2**k leaves room that honest sums never reach."""
    top = np.uint64((1 << 32) - 1)
    grid = HostileGrid("masked_input", lambda r, h, g: masked(r, lambda y: (y + np.uint64(2**31)) & top))
    with pytest.raises(AggregateRejectedError, match="outside the quantization range"):
        secure_sum(grid, node_ids=grid.get_node_ids(), vector_length=D, threshold=3, quantization=SPEC, timeout=5.0)


def test_replies_from_unknown_or_repeated_sources_are_not_trusted() -> None:
    class Doubling(HostileGrid):
        def send_and_receive(self, messages, *, timeout=None):
            out = super().send_and_receive(messages, timeout=timeout)
            return out + [r for r in out if self.pid[r.metadata.src_node_id] == HOSTILE]

    grid = Doubling("advertise", lambda r, h, g: r)
    result = secure_sum(grid, node_ids=grid.get_node_ids(), vector_length=D, threshold=3, quantization=SPEC, timeout=5.0)
    assert {grid.pid[u] for u in result.survivors} == set(range(N)) - {HOSTILE}


def test_too_many_hostile_nodes_abort_cleanly() -> None:
    class Many(HostileGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            return [Message(RecordDict({RECORD_KEY: ConfigRecord({"payload": b"[]"})}), reply_to=m)
                    if self.pid[m.metadata.dst_node_id] >= 2 else r for m, r in zip(
                        sorted(messages, key=lambda m: self.pid[m.metadata.dst_node_id]), replies)]

    grid = Many("advertise", lambda r, h, g: r)
    with pytest.raises(InsufficientSurvivorsError, match="aborted"):
        secure_sum(grid, node_ids=grid.get_node_ids(), vector_length=D, threshold=3, quantization=SPEC, timeout=5.0)


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity):
    """Flower's run identity for messages built in-process (tests/conftest.py)."""
