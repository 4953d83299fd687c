"""Run the SecAgg / SecAgg+ stages over Flower's Message API (flwr 1.41).

Server side (inside a ``ServerApp`` main)::

    result = secure_sum(grid, node_ids=list(grid.get_node_ids()), vector_length=d, threshold=3,
                        quantization=QuantizationSpec(clip=1.0), timeout=60.0)
    result.total            # float sum of the survivors' clipped updates; nothing else is revealed

Client side (one line in the ``ClientApp``)::

    app = ClientApp()
    register_secagg(app, update_fn=my_update)   # my_update(message, context) -> 1-D float numpy array

Every stage is one round of ``query.<action>`` messages (default ``query.secagg``) whose ``"secagg"``
ConfigRecord names the ``stage`` and carries a JSON ``payload``. The client keeps its protocol state, private
keys included, in ``context.state`` (node-local, never sent), serialised to bytes. A node that does not answer
within ``timeout``, answers with an error, or sends anything malformed or inconsistent (wrong types or
lengths, unknown fields, deep nesting, oversized payloads, replayed or low-order keys) is a dropout at that
stage: the driver never raises on a client's reply. ``secure_sum`` raises only RoundAbortedError (no
aggregate: too few survivors, or a sum that fails its range check) or SecAggError for its own bad parameters.

Identities (``federation.secagg.identity``): a node whose node config names ``secagg-key`` signs its advert;
with ``secagg-peers`` it verifies every neighbour's advert against the pinned partner keys.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from federation.secagg.identity import load_identity
from federation.secagg.primitives import Entropy, QuantizationSpec, SecAggError
from federation.secagg.protocol import (
    CIPHERTEXT_BYTES,
    AdvertisedKeys,
    ClientState,
    KeyBroadcast,
    SecAggConfig,
    SecAggResult,
    UnmaskRequest,
    UnmaskResponse,
    advert_from_json,
    advert_to_json,
    bytes_map_from_json,
    bytes_map_to_json,
    client_advertise,
    client_masked_input,
    client_share_keys,
    client_unmask,
    config_from_json,
    config_to_json,
    expect_fields,
    ints_from_json,
    ints_to_json,
    keys_from_json,
    keys_to_json,
    load_json,
    server_collect_keys,
    server_collect_masked,
    server_route_shares,
    server_unmask,
)

__all__ = ["RECORD_KEY", "STAGES", "STATE_KEY", "UpdateFn", "handle_secagg", "register_secagg", "secure_sum"]

log = logging.getLogger(__name__)

RECORD_KEY = "secagg"  # ConfigRecord in every SecAgg message and reply
STATE_KEY = "secagg-state"  # ConfigRecord in context.state holding the serialised ClientState
STAGES = ("advertise", "share_keys", "masked_input", "unmask")
_SHARE_BYTES = 66
_PER_NODE_JSON = 512  # generous bound on one node's entry in a payload (a ciphertext is ~220 base64 chars)

UpdateFn = Callable[[Message, Context], "np.ndarray | tuple[np.ndarray, ConfigRecord]"]
"""Returns the client's update as a 1-D float array, called once per round at the masked-input stage; or
(array, witness): a small public ConfigRecord sent in the clear beside the masked input (``WITNESS_KEY``)."""

WITNESS_KEY = "witness"  # optional reply record at the masked-input stage: public metadata, never part of the sum
_WITNESS_MAX_ENTRIES, _WITNESS_MAX_CHARS = 8, 128


def _parse_witness(rec: Any) -> dict[str, Any]:
    """A witness record: at most 8 entries, short names, int or short str values; anything else is dropped."""
    if not isinstance(rec, ConfigRecord) or len(rec.keys()) > _WITNESS_MAX_ENTRIES:
        raise SecAggError("witness record malformed")
    out: dict[str, Any] = {}
    for k in rec.keys():
        v = rec[k]
        if not (isinstance(k, str) and len(k) <= 32) or isinstance(v, bool) or not (
                isinstance(v, int) or (isinstance(v, str) and len(v) <= _WITNESS_MAX_CHARS)):
            raise SecAggError("witness record malformed")
        out[k] = v
    return out


# -------------------------------------------------------------------------------------------- server
class _Reply:
    """One reply's ``secagg`` record, checked: exactly the expected entries, each of the expected type."""

    @staticmethod
    def fields(rec: Any, expected: Mapping[str, type], max_payload: int) -> dict[str, Any]:
        if not isinstance(rec, ConfigRecord):
            raise SecAggError(f"the '{RECORD_KEY}' record must be a ConfigRecord")
        if set(rec.keys()) != set(expected):
            raise SecAggError(f"reply entries {sorted(rec.keys())[:8]} differ from the expected {sorted(expected)}")
        out = {}
        for k, typ in expected.items():
            if not isinstance(rec[k], typ):
                raise SecAggError(f"reply entry '{k}' must be {typ.__name__}")
            out[k] = rec[k]
        if "payload" in out:
            out["payload"] = load_json(out["payload"], max_bytes=max_payload)
        return out


def _parse_advert(rec: Any, n: int) -> AdvertisedKeys:
    d = _Reply.fields(rec, {"payload": bytes}, 2048)
    return advert_from_json(expect_fields(d["payload"], ("keys",), "advertise payload")["keys"])


def _parse_shares(rec: Any, n: int) -> dict[int, bytes]:
    d = _Reply.fields(rec, {"payload": bytes}, 256 + _PER_NODE_JSON * n)
    return bytes_map_from_json(expect_fields(d["payload"], ("shares",), "share_keys payload")["shares"],
                               CIPHERTEXT_BYTES)


def _parse_masked(rec: Any, n: int, vector_length: int) -> tuple[np.ndarray, list[int]]:
    d = _Reply.fields(rec, {"masked": bytes, "payload": bytes}, 256 + 32 * n)
    raw = d["masked"]
    if len(raw) != 8 * vector_length:
        raise SecAggError(f"masked input has {len(raw)} bytes, expected {8 * vector_length}")
    rejected = ints_from_json(expect_fields(d["payload"], ("rejected",), "masked_input payload")["rejected"])
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64), rejected


def _parse_unmask(rec: Any, n: int) -> UnmaskResponse:
    d = _Reply.fields(rec, {"payload": bytes}, 256 + 2 * _PER_NODE_JSON * n)
    p = expect_fields(d["payload"], ("b", "s"), "unmask payload")
    return UnmaskResponse(b_shares=bytes_map_from_json(p["b"], _SHARE_BYTES),
                          s_shares=bytes_map_from_json(p["s"], _SHARE_BYTES))


def secure_sum(
    grid: Grid,
    *,
    node_ids: Sequence[int],
    vector_length: int,
    threshold: int,
    quantization: QuantizationSpec,
    degree: int | None = None,
    timeout: float | None = None,
    extra_content: RecordDict | None = None,
    action: str = "secagg",
    entropy: Entropy = os.urandom,
) -> SecAggResult:
    """Securely sum the update vectors of ``node_ids``: four message rounds, dropouts (and hostile replies)
    tolerated down to ``threshold`` survivors; raises RoundAbortedError (no aggregate released) below it."""
    config = SecAggConfig(
        round_id=entropy(16),
        threshold=threshold,
        vector_length=vector_length,
        quantization=quantization,
        degree=degree,
        graph_seed=entropy(16),
    )
    if extra_content is not None and RECORD_KEY in extra_content:
        raise SecAggError(f"extra_content must not use the reserved key '{RECORD_KEY}'.")
    message_type = f"query.{action}"
    group_id = config.round_id.hex()
    n = len(node_ids)
    malformed: dict[int, str] = {}
    witnesses: dict[int, dict[str, Any]] = {}

    def ask(stage: str, payloads: Mapping[int, bytes], parse: Callable[[Any], Any],
            extra: RecordDict | None = None) -> dict[int, Any]:
        messages = []
        for node_id, payload in payloads.items():
            content = RecordDict({RECORD_KEY: ConfigRecord({"stage": stage, "payload": payload})})
            for key, record in (extra or {}).items():
                content[key] = record
            messages.append(Message(content, dst_node_id=node_id, message_type=message_type, group_id=group_id))
        replies: dict[int, Any] = {}
        seen: set[int] = set()
        for reply in grid.send_and_receive(messages, timeout=timeout):
            src = reply.metadata.src_node_id
            if src not in payloads or src in seen:
                log.warning("SecAgg %s: ignoring unexpected or repeated reply from node %s", stage, src)
                replies.pop(src, None)  # two replies from one node: neither is trusted
                seen.add(src)
                continue
            seen.add(src)
            if reply.has_error():
                log.warning("SecAgg %s: node %s dropped (error code %s)", stage, src, reply.error.code)
                continue
            try:
                replies[src] = parse(reply.content[RECORD_KEY] if RECORD_KEY in reply.content else None)
            except (SecAggError, KeyError, TypeError, ValueError) as exc:
                malformed[src] = f"{stage}-malformed"
                log.warning("SecAgg %s: malformed reply from node %s (%s); dropped", stage, src,
                            type(exc).__name__ if not isinstance(exc, SecAggError) else exc)
                continue
            if stage == "masked_input" and WITNESS_KEY in reply.content:
                try:
                    witnesses[src] = _parse_witness(reply.content[WITNESS_KEY])
                except (SecAggError, KeyError, TypeError) as exc:  # not part of the sum: the input still counts
                    log.warning("SecAgg masked_input: node %s sent a malformed witness record (%s); ignored", src, exc)
        missing = set(payloads) - set(replies)
        if missing:
            log.warning("SecAgg %s: %d of %d nodes dropped: %s", stage, len(missing), len(payloads), sorted(missing))
        return replies

    # Stage 0: advertise keys.
    cfg_payload = _dump({"config": config_to_json(config)})
    adverts = ask("advertise", {int(u): cfg_payload for u in node_ids}, lambda r: _parse_advert(r, n))
    server, broadcasts = server_collect_keys(config=config, adverts=adverts)

    # Stage 1: share keys.
    payloads = {
        u: _dump({"round": group_id, "participants": ints_to_json(b.participants), "keys": keys_to_json(b.keys)})
        for u, b in broadcasts.items()
    }
    shares = ask("share_keys", payloads, lambda r: _parse_shares(r, n))
    server, routed = server_route_shares(state=server, shares=shares)

    # Stage 2: masked input.
    payloads = {v: _dump({"round": group_id, "ciphertexts": bytes_map_to_json(cts)}) for v, cts in routed.items()}
    got = ask("masked_input", payloads, lambda r: _parse_masked(r, n, vector_length), extra_content)
    server, requests = server_collect_masked(state=server, masked={u: y for u, (y, _) in got.items()},
                                             rejected={u: r for u, (_, r) in got.items()})

    # Stage 3: unmask.
    payloads = {
        u: _dump({"round": group_id, "survivors": ints_to_json(r.survivors), "dropped": ints_to_json(r.dropped)})
        for u, r in requests.items()
    }
    responses = ask("unmask", payloads, lambda r: _parse_unmask(r, n))
    result = server_unmask(state=server, responses=responses)
    excluded = {**malformed, **result.excluded}
    return SecAggResult(total=result.total, integer_total=result.integer_total, survivors=result.survivors,
                        dropped=tuple(sorted(set(result.dropped) | (set(malformed) - set(result.survivors)))),
                        error_bound=result.error_bound, excluded=excluded,
                        witnesses={u: w for u, w in witnesses.items() if u in result.survivors})


# -------------------------------------------------------------------------------------------- client
_MAX_SERVER_PAYLOAD = 64 << 20


def handle_secagg(
    message: Message, context: Context, *, update_fn: UpdateFn, entropy: Entropy = os.urandom
) -> Message:
    """Run one SecAgg stage for this node and return the reply. Raises SecAggError on a protocol violation
    (Flower turns it into an error reply; the server then treats this node as dropped)."""
    rec = message.content[RECORD_KEY]
    stage = str(rec["stage"])
    payload = load_json(rec["payload"], max_bytes=_MAX_SERVER_PAYLOAD)
    if not isinstance(payload, dict):
        raise SecAggError("SecAgg payload must be a JSON object")
    identity = load_identity(context.node_config)
    witness = None  # masked_input only: the update function's public record, sent beside the masked input
    if stage == "advertise":
        config = config_from_json(expect_fields(payload, ("config",), "advertise request")["config"])
        state, keys = client_advertise(config=config, node_id=context.node_id, entropy=entropy,
                                       identity_key=identity.private)
        out: dict[str, Any] = {"payload": _dump({"keys": advert_to_json(keys)})}
    else:
        state = _load_state(context, payload)
        if stage == "share_keys":
            p = expect_fields(payload, ("round", "participants", "keys"), "share_keys request")
            broadcast = KeyBroadcast(participants=tuple(ints_from_json(p["participants"])),
                                     keys=keys_from_json(p["keys"]))
            state, shares = client_share_keys(state=state, broadcast=broadcast, entropy=entropy,
                                              pinned=identity.pinned)
            out = {"payload": _dump({"shares": bytes_map_to_json(shares)})}
        elif stage == "masked_input":
            p = expect_fields(payload, ("round", "ciphertexts"), "masked_input request")
            ciphertexts = bytes_map_from_json(p["ciphertexts"])
            got = update_fn(message, context)
            update = np.asarray(got[0] if isinstance(got, tuple) else got, dtype=np.float64)
            witness = got[1] if isinstance(got, tuple) else None
            rng = None
            if state.config.quantization.rounding == "stochastic":
                rng = np.random.default_rng(int.from_bytes(entropy(16), "big"))
            state, y = client_masked_input(state=state, ciphertexts=ciphertexts, update=update, rng=rng)
            out = {"masked": y.astype("<u8").tobytes(), "payload": _dump({"rejected": ints_to_json(state.rejected)})}
        elif stage == "unmask":
            p = expect_fields(payload, ("round", "survivors", "dropped"), "unmask request")
            request = UnmaskRequest(survivors=frozenset(ints_from_json(p["survivors"])),
                                    dropped=frozenset(ints_from_json(p["dropped"])))
            state, resp = client_unmask(state=state, request=request)
            out = {"payload": _dump({"b": bytes_map_to_json(resp.b_shares), "s": bytes_map_to_json(resp.s_shares)})}
        else:
            raise SecAggError(f"Unknown SecAgg stage; expected one of {STAGES}.")
    context.state[STATE_KEY] = ConfigRecord({"state": state.to_bytes()})
    content = RecordDict({RECORD_KEY: ConfigRecord(out)})
    if stage == "masked_input" and witness is not None:
        content[WITNESS_KEY] = witness
    return Message(content, reply_to=message)


def register_secagg(
    app: ClientApp, *, update_fn: UpdateFn, action: str = "secagg", entropy: Entropy = os.urandom
) -> None:
    """Register ``query.<action>`` on ``app`` so that it answers ``secure_sum``'s messages."""

    @app.query(action)
    def _secagg(message: Message, context: Context) -> Message:
        return handle_secagg(message, context, update_fn=update_fn, entropy=entropy)


# ------------------------------------------------------------------------------------------- helpers
def _dump(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def _load_state(context: Context, payload: Mapping[str, Any]) -> ClientState:
    if STATE_KEY not in context.state:
        raise SecAggError(f"Node {context.node_id} has no SecAgg state: the 'advertise' stage did not run here.")
    state = ClientState.from_bytes(bytes(context.state[STATE_KEY]["state"]))  # type: ignore[arg-type]
    if state.config.round_id.hex() != payload.get("round"):
        raise SecAggError(f"Node {context.node_id} got a message for another SecAgg round; refused.")
    return state
