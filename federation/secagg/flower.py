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
within ``timeout``, or answers with an error, is treated as dropped at that stage. The masked-input message
also carries ``extra_content`` (e.g. the global model) so that ``update_fn`` can compute the update then.
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

from federation.secagg.primitives import Entropy, QuantizationSpec, SecAggError
from federation.secagg.protocol import (
    AdvertisedKeys,
    ClientState,
    KeyBroadcast,
    SecAggConfig,
    SecAggResult,
    UnmaskRequest,
    UnmaskResponse,
    bytes_map_from_json,
    bytes_map_to_json,
    client_advertise,
    client_masked_input,
    client_share_keys,
    client_unmask,
    config_from_json,
    config_to_json,
    ints_from_json,
    ints_to_json,
    keys_from_json,
    keys_to_json,
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

UpdateFn = Callable[[Message, Context], np.ndarray]
"""Returns the client's update as a 1-D float array; called once per round, at the masked-input stage."""


# -------------------------------------------------------------------------------------------- server
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
    """Securely sum the update vectors of ``node_ids``: four message rounds, dropouts tolerated down to
    ``threshold`` survivors; raises InsufficientSurvivorsError (no aggregate released) below it."""
    config = SecAggConfig(
        round_id=entropy(16),
        threshold=threshold,
        vector_length=vector_length,
        quantization=quantization,
        degree=degree,
        graph_seed=entropy(16),
    )
    message_type = f"query.{action}"
    group_id = config.round_id.hex()

    def ask(stage: str, payloads: Mapping[int, bytes], extra: RecordDict | None = None) -> dict[int, ConfigRecord]:
        messages = []
        for node_id, payload in payloads.items():
            content = RecordDict({RECORD_KEY: ConfigRecord({"stage": stage, "payload": payload})})
            if extra is not None:
                for key, record in extra.items():
                    if key == RECORD_KEY:
                        raise SecAggError(f"extra_content must not use the reserved key '{RECORD_KEY}'.")
                    content[key] = record
            messages.append(Message(content, dst_node_id=node_id, message_type=message_type, group_id=group_id))
        replies: dict[int, ConfigRecord] = {}
        for reply in grid.send_and_receive(messages, timeout=timeout):
            src = reply.metadata.src_node_id
            if src not in payloads or src in replies:
                log.warning("SecAgg %s: ignoring unexpected reply from node %s", stage, src)
            elif reply.has_error():
                log.warning("SecAgg %s: node %s dropped (%s)", stage, src, reply.error.reason)
            elif RECORD_KEY not in reply.content:
                log.warning("SecAgg %s: node %s replied without a '%s' record; dropped", stage, src, RECORD_KEY)
            else:
                replies[src] = reply.content[RECORD_KEY]
        missing = set(payloads) - set(replies)
        if missing:
            log.warning("SecAgg %s: %d of %d nodes dropped: %s", stage, len(missing), len(payloads), sorted(missing))
        return replies

    # Stage 0: advertise keys.
    cfg_payload = _dump({"config": config_to_json(config)})
    adverts: dict[int, AdvertisedKeys] = {}
    for node_id, rec in ask("advertise", {int(n): cfg_payload for n in node_ids}).items():
        parsed = _parse(_advert_from_record, rec, node_id, "advertise")
        if parsed is not None:
            adverts[node_id] = parsed
    server, broadcasts = server_collect_keys(config=config, adverts=adverts)

    # Stage 1: share keys.
    payloads = {
        u: _dump({"round": group_id, "participants": ints_to_json(b.participants), "keys": keys_to_json(b.keys)})
        for u, b in broadcasts.items()
    }
    shares: dict[int, dict[int, bytes]] = {}
    for node_id, rec in ask("share_keys", payloads).items():
        parsed_shares = _parse(lambda r: bytes_map_from_json(_load(r)["shares"]), rec, node_id, "share_keys")
        if parsed_shares is not None:
            shares[node_id] = parsed_shares
    server, routed = server_route_shares(state=server, shares=shares)

    # Stage 2: masked input.
    payloads = {v: _dump({"round": group_id, "ciphertexts": bytes_map_to_json(cts)}) for v, cts in routed.items()}
    masked: dict[int, np.ndarray] = {}
    for node_id, rec in ask("masked_input", payloads, extra_content).items():
        y = _parse(lambda r: np.frombuffer(r["masked"], dtype="<u8").astype(np.uint64), rec, node_id, "masked_input")
        if y is not None and y.shape == (vector_length,):
            masked[node_id] = y
        elif y is not None:
            log.warning("SecAgg masked_input: node %s sent %s values, expected %s; dropped", node_id, y.shape, vector_length)
    server, requests = server_collect_masked(state=server, masked=masked)

    # Stage 3: unmask.
    payloads = {
        u: _dump({"round": group_id, "survivors": ints_to_json(r.survivors), "dropped": ints_to_json(r.dropped)})
        for u, r in requests.items()
    }
    responses: dict[int, UnmaskResponse] = {}
    for node_id, rec in ask("unmask", payloads).items():
        resp = _parse(
            lambda r: UnmaskResponse(b_shares=bytes_map_from_json(_load(r)["b"]),
                                     s_shares=bytes_map_from_json(_load(r)["s"])),
            rec, node_id, "unmask",
        )
        if resp is not None:
            responses[node_id] = resp
    return server_unmask(state=server, responses=responses)


# -------------------------------------------------------------------------------------------- client
def handle_secagg(
    message: Message, context: Context, *, update_fn: UpdateFn, entropy: Entropy = os.urandom
) -> Message:
    """Run one SecAgg stage for this node and return the reply. Raises SecAggError on a protocol violation
    (Flower turns it into an error reply; the server then treats this node as dropped)."""
    rec = message.content[RECORD_KEY]
    stage = str(rec["stage"])
    payload = _load(rec)
    if stage == "advertise":
        config = config_from_json(payload["config"])
        state, keys = client_advertise(config=config, node_id=context.node_id, entropy=entropy)
        out: dict[str, Any] = {"payload": _dump({"keys": keys_to_json({0: keys})["0"]})}
    else:
        state = _load_state(context, payload)
        if stage == "share_keys":
            broadcast = KeyBroadcast(participants=tuple(ints_from_json(payload["participants"])),
                                     keys=keys_from_json(payload["keys"]))
            state, shares = client_share_keys(state=state, broadcast=broadcast, entropy=entropy)
            out = {"payload": _dump({"shares": bytes_map_to_json(shares)})}
        elif stage == "masked_input":
            update = np.asarray(update_fn(message, context), dtype=np.float64)
            rng = None
            if state.config.quantization.rounding == "stochastic":
                rng = np.random.default_rng(int.from_bytes(entropy(16), "big"))
            state, y = client_masked_input(
                state=state, ciphertexts=bytes_map_from_json(payload["ciphertexts"]), update=update, rng=rng
            )
            out = {"masked": y.astype("<u8").tobytes()}
        elif stage == "unmask":
            request = UnmaskRequest(survivors=frozenset(ints_from_json(payload["survivors"])),
                                    dropped=frozenset(ints_from_json(payload["dropped"])))
            state, resp = client_unmask(state=state, request=request)
            out = {"payload": _dump({"b": bytes_map_to_json(resp.b_shares), "s": bytes_map_to_json(resp.s_shares)})}
        else:
            raise SecAggError(f"Unknown SecAgg stage '{stage}'; expected one of {STAGES}.")
    context.state[STATE_KEY] = ConfigRecord({"state": state.to_bytes()})
    return Message(RecordDict({RECORD_KEY: ConfigRecord(out)}), reply_to=message)


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


def _load(rec: ConfigRecord) -> dict[str, Any]:
    return json.loads(bytes(rec["payload"]))  # type: ignore[arg-type]


def _load_state(context: Context, payload: Mapping[str, Any]) -> ClientState:
    if STATE_KEY not in context.state:
        raise SecAggError(f"Node {context.node_id} has no SecAgg state: the 'advertise' stage did not run here.")
    state = ClientState.from_bytes(bytes(context.state[STATE_KEY]["state"]))  # type: ignore[arg-type]
    if state.config.round_id.hex() != payload.get("round"):
        raise SecAggError(f"Node {context.node_id} got a message for another SecAgg round; refused.")
    return state


def _advert_from_record(rec: ConfigRecord) -> AdvertisedKeys:
    keys = keys_from_json({"0": _load(rec)["keys"]})[0]
    if len(keys.c_public) != 32 or len(keys.s_public) != 32:
        raise ValueError("public keys must be 32 bytes")
    return keys


def _parse(fn: Callable[[ConfigRecord], Any], rec: ConfigRecord, node_id: int, stage: str) -> Any:
    try:
        return fn(rec)
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("SecAgg %s: malformed reply from node %s (%s); dropped", stage, node_id, exc)
        return None
