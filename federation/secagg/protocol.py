"""SecAgg / SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020) as pure client and server stage functions.

Threat model: an honest-but-curious server and honest-but-curious clients, on authenticated channels
(Flower's TLS + SuperNode authentication). The server learns only the sum of the survivors' quantized
updates, provided it never obtains ``threshold`` shares of both the self-mask seed ``b_u`` and the masking key
``s_u`` of the same client. Clients enforce that: each answers one unmasking request per round, reveals for
each neighbour either a ``b`` share (survivor) or an ``s`` share (dropped), never both, and refuses requests
whose survivor and dropped sets overlap. ``threshold > holders / 2`` is required, so no two disjoint groups of
responders could each reconstruct a secret.

Stages (each side's functions are called in this order; each returns a new state and the outgoing message)::

    client_advertise        -> AdvertisedKeys                 (c: encryption key, s: masking key)
    server_collect_keys     -> {u: KeyBroadcast}              (U1, neighbour graph from a public seed)
    client_share_keys       -> {v: ciphertext}                (Shamir shares of s_u and b_u, AEAD per v)
    server_route_shares     -> {v: {u: ciphertext}}           (U2)
    client_masked_input     -> y_u (uint64 vector)            y_u = x_u + PRG(b_u) + sum_v +-PRG(s_uv) mod 2^k
    server_collect_masked   -> {u: UnmaskRequest}             (U3 = survivors, U2 \\ U3 = dropped)
    client_unmask           -> UnmaskResponse                 b shares for survivors, s shares for dropped
    server_unmask           -> SecAggResult                   sum of survivors' updates

``degree=None`` (or ``degree >= n - 1``) gives classic SecAgg on the complete graph; a smaller even
``degree`` gives SecAgg+ on a Harary graph whose vertex order is a pseudorandom permutation derived from the
public ``graph_seed``. Each client shares its secrets among its *holders*: its neighbours and itself.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from federation.secagg.primitives import (
    PROTOCOL_LABEL,
    Entropy,
    InsufficientSurvivorsError,
    QuantizationSpec,
    SecAggError,
    agree,
    constant_time_equal,
    decrypt_share,
    dequantize_sum,
    encrypt_share,
    generate_keypair,
    prg_words,
    public_key_of,
    quantize,
    shamir_reconstruct,
    shamir_split,
)

__all__ = [
    "AdvertisedKeys",
    "ClientState",
    "KeyBroadcast",
    "SecAggConfig",
    "SecAggResult",
    "ServerState",
    "UnmaskRequest",
    "UnmaskResponse",
    "client_advertise",
    "client_masked_input",
    "client_share_keys",
    "client_unmask",
    "holders_of",
    "neighbour_graph",
    "server_collect_keys",
    "server_collect_masked",
    "server_route_shares",
    "server_unmask",
]

_SECRET_BYTES = 32
_PAIR_MASK = b"pair"
_SELF_MASK = b"self"
_ENC = b"share-encryption"
_PAIR_SEED = b"pair-mask-seed"


# ------------------------------------------------------------------------------------------ messages
@dataclass(frozen=True)
class SecAggConfig:
    """Public parameters of one secure-sum round, chosen by the server and sent to every client."""

    round_id: bytes
    threshold: int
    vector_length: int
    quantization: QuantizationSpec
    degree: int | None = None
    graph_seed: bytes = b""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.round_id, bytes) or len(self.round_id) < 8:
            problems.append("round_id must be at least 8 bytes (use a fresh random id per round)")
        if not isinstance(self.threshold, int) or self.threshold < 2:
            problems.append(f"threshold must be an int >= 2, got {self.threshold!r}")
        if not isinstance(self.vector_length, int) or self.vector_length < 1:
            problems.append(f"vector_length must be a positive int, got {self.vector_length!r}")
        if self.degree is not None and (not isinstance(self.degree, int) or self.degree < 2 or self.degree % 2):
            problems.append(f"degree must be None (complete graph) or an even int >= 2, got {self.degree!r}")
        if problems:
            raise SecAggError("Invalid SecAggConfig: " + "; ".join(problems))


@dataclass(frozen=True)
class AdvertisedKeys:
    """A client's two public keys: ``c`` for encrypting shares, ``s`` for agreeing pairwise mask seeds."""

    c_public: bytes
    s_public: bytes


@dataclass(frozen=True)
class KeyBroadcast:
    """Server -> client after stage 0: all participants U1 and the public keys of the client's holders."""

    participants: tuple[int, ...]
    keys: Mapping[int, AdvertisedKeys]


@dataclass(frozen=True)
class UnmaskRequest:
    """Server -> survivor: who sent a masked input (survivors) and who shared keys but did not (dropped)."""

    survivors: frozenset[int]
    dropped: frozenset[int]


@dataclass(frozen=True)
class UnmaskResponse:
    """Survivor -> server: ``b`` shares of surviving holders' owners, ``s`` shares of dropped ones."""

    b_shares: Mapping[int, bytes]
    s_shares: Mapping[int, bytes]


@dataclass(frozen=True)
class SecAggResult:
    """The outcome of a secure sum: the float sum of the survivors' (clipped) updates and its bookkeeping."""

    total: np.ndarray
    integer_total: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    error_bound: float


# ---------------------------------------------------------------------------------------- neighbours
def neighbour_graph(
    *, participants: Sequence[int], degree: int | None, seed: bytes
) -> dict[int, frozenset[int]]:
    """The public neighbour graph: complete for ``degree`` None or >= n-1, else a Harary graph H(degree, n).

    Vertices are placed on a ring in a pseudorandom order (sorted by HMAC-SHA256(seed, id)), and each is
    joined to the ``degree/2`` nearest vertices on either side. Every party recomputes it identically.
    """
    ids = sorted(set(participants))
    if len(ids) != len(participants):
        raise SecAggError("Participant ids must be unique.")
    n = len(ids)
    if degree is None or degree >= n - 1:
        return {u: frozenset(v for v in ids if v != u) for u in ids}
    order = sorted(ids, key=lambda u: hmac.new(seed, str(u).encode(), hashlib.sha256).digest())
    half = degree // 2
    graph: dict[int, set[int]] = {u: set() for u in ids}
    for i, u in enumerate(order):
        for off in range(1, half + 1):
            v = order[(i + off) % n]
            graph[u].add(v)
            graph[v].add(u)
    return {u: frozenset(vs) for u, vs in graph.items()}


def holders_of(graph: Mapping[int, frozenset[int]], u: int) -> frozenset[int]:
    """The clients holding shares of u's secrets: u's neighbours and u itself."""
    return graph[u] | {u}


def _check_threshold(*, config: SecAggConfig, graph: Mapping[int, frozenset[int]]) -> None:
    sizes = [len(g) + 1 for g in graph.values()]
    lo, hi = min(sizes), max(sizes)
    if config.threshold > lo:
        raise InsufficientSurvivorsError(
            f"threshold {config.threshold} exceeds the smallest group of share holders ({lo}); "
            f"{len(graph)} participants are too few for this threshold and degree."
        )
    if 2 * config.threshold <= hi:
        raise SecAggError(
            f"threshold {config.threshold} must exceed half of the share holders ({hi}), otherwise two disjoint "
            "groups of clients could each reconstruct a secret and the server could unmask an individual "
            f"update. Use threshold >= {hi // 2 + 1}."
        )


def _x_of(participants: Sequence[int], u: int) -> int:
    """Shamir evaluation point of client u: its 1-based position among the sorted participants."""
    return participants.index(u) + 1


def _sign(u: int, v: int) -> int:
    return 1 if u < v else -1


def _pair_seed(*, private_key: bytes, peer_public_key: bytes, config: SecAggConfig) -> bytes:
    return agree(private_key=private_key, peer_public_key=peer_public_key, purpose=_PAIR_SEED, round_id=config.round_id)


def _share_ad(config: SecAggConfig, sender: int, recipient: int) -> bytes:
    return b"|".join([PROTOCOL_LABEL, config.round_id.hex().encode(), str(sender).encode(), str(recipient).encode()])


def _words(seed: bytes, domain: bytes, config: SecAggConfig) -> np.ndarray:
    return prg_words(
        seed=seed,
        domain=domain,
        round_id=config.round_id,
        length=config.vector_length,
        modulus_bits=config.quantization.modulus_bits,
    )


def _mod(config: SecAggConfig) -> np.uint64:
    return np.uint64((1 << config.quantization.modulus_bits) - 1)


# -------------------------------------------------------------------------------------------- client
@dataclass(frozen=True)
class ClientState:
    """Everything a client remembers between stages. Holds private keys: it must never leave the node."""

    config: SecAggConfig
    node_id: int
    stage: str
    c_private: bytes = field(repr=False)
    s_private: bytes = field(repr=False)
    c_public: bytes = b""
    s_public: bytes = b""
    participants: tuple[int, ...] = ()
    neighbour_keys: Mapping[int, AdvertisedKeys] = field(default_factory=dict)
    b_seed: bytes = field(default=b"", repr=False)
    held_shares: Mapping[int, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    mask_partners: tuple[int, ...] = ()

    def to_bytes(self) -> bytes:
        """Serialise (for Flower's node-local ``context.state``)."""
        return json.dumps(_client_state_to_json(self), sort_keys=True).encode()

    @staticmethod
    def from_bytes(data: bytes) -> ClientState:
        return _client_state_from_json(json.loads(data))


def _expect_stage(state: ClientState, expected: str, action: str) -> None:
    if state.stage != expected:
        raise SecAggError(
            f"Client {state.node_id} cannot {action} in stage '{state.stage}' (expected '{expected}'). "
            "Each stage runs once, in order; a repeated or out-of-order request is refused."
        )


def client_advertise(
    *, config: SecAggConfig, node_id: int, entropy: Entropy = os.urandom
) -> tuple[ClientState, AdvertisedKeys]:
    """Stage 0: generate the encryption (c) and masking (s) X25519 key pairs and advertise the public halves."""
    c, s = generate_keypair(entropy=entropy), generate_keypair(entropy=entropy)
    state = ClientState(
        config=config,
        node_id=node_id,
        stage="advertised",
        c_private=c.private,
        s_private=s.private,
        c_public=c.public,
        s_public=s.public,
    )
    return state, AdvertisedKeys(c_public=c.public, s_public=s.public)


def client_share_keys(
    *, state: ClientState, broadcast: KeyBroadcast, entropy: Entropy = os.urandom
) -> tuple[ClientState, dict[int, bytes]]:
    """Stage 1: Shamir-share ``s_u`` and a fresh self-mask seed ``b_u`` among the holders, encrypted per holder."""
    _expect_stage(state, "advertised", "share keys")
    config, u = state.config, state.node_id
    participants = tuple(sorted(broadcast.participants))
    if u not in participants:
        raise SecAggError(f"Client {u} is not among the round's participants.")
    graph = neighbour_graph(participants=participants, degree=config.degree, seed=config.graph_seed)
    _check_threshold(config=config, graph=graph)
    holders = holders_of(graph, u)
    if set(broadcast.keys) != holders:
        raise SecAggError(
            f"Client {u} received keys for {sorted(broadcast.keys)} but its holders under the public graph are "
            f"{sorted(holders)}; the server's broadcast is inconsistent."
        )
    own = broadcast.keys[u]
    if own.c_public != state.c_public or own.s_public != state.s_public:
        raise SecAggError(f"The server echoed different public keys for client {u}; aborting.")
    all_keys = [k for ks in broadcast.keys.values() for k in (ks.c_public, ks.s_public)]
    if len(set(all_keys)) != len(all_keys):
        raise SecAggError("Two advertised public keys are equal; every key must be fresh and distinct.")

    b_seed = entropy(_SECRET_BYTES)
    xs = {v: _x_of(participants, v) for v in holders}
    s_shares = shamir_split(secret=state.s_private, threshold=config.threshold, xs=list(xs.values()), entropy=entropy)
    b_shares = shamir_split(secret=b_seed, threshold=config.threshold, xs=list(xs.values()), entropy=entropy)
    out: dict[int, bytes] = {}
    for v in sorted(holders - {u}):
        key = agree(private_key=state.c_private, peer_public_key=broadcast.keys[v].c_public, purpose=_ENC,
                    round_id=config.round_id)
        plaintext = s_shares[xs[v]] + b_shares[xs[v]]
        out[v] = encrypt_share(key=key, plaintext=plaintext, associated_data=_share_ad(config, u, v), entropy=entropy)
    new_state = replace(
        state,
        stage="shared",
        participants=participants,
        neighbour_keys=dict(broadcast.keys),
        b_seed=b_seed,
        held_shares={u: (s_shares[xs[u]], b_shares[xs[u]])},
    )
    return new_state, out


def client_masked_input(
    *,
    state: ClientState,
    ciphertexts: Mapping[int, bytes],
    update: np.ndarray,
    rng: np.random.Generator | None = None,
) -> tuple[ClientState, np.ndarray]:
    """Stage 2: decrypt the shares received from neighbours (U2) and send the masked, quantized update.

    ``y_u = quantize(update) + PRG(b_u) + sum_{v in U2 neighbours} sign(u, v) PRG(s_uv)  (mod 2^k)``.
    ``rng`` is needed only for stochastic rounding.
    """
    _expect_stage(state, "shared", "send a masked input")
    config, u = state.config, state.node_id
    senders = set(ciphertexts)
    if not senders <= set(state.neighbour_keys) - {u}:
        raise SecAggError(f"Client {u} received shares from non-neighbours {sorted(senders - set(state.neighbour_keys))}.")
    if len(senders) + 1 < config.threshold:
        raise InsufficientSurvivorsError(
            f"Client {u} has {len(senders)} neighbours left, fewer than threshold-1 = {config.threshold - 1}."
        )
    vec = np.asarray(update, dtype=np.float64)
    if vec.shape != (config.vector_length,):
        raise SecAggError(f"Client {u}'s update has shape {vec.shape}, expected ({config.vector_length},).")

    held = dict(state.held_shares)
    for v in sorted(senders):
        key = agree(private_key=state.c_private, peer_public_key=state.neighbour_keys[v].c_public, purpose=_ENC,
                    round_id=config.round_id)
        plaintext = decrypt_share(key=key, ciphertext=ciphertexts[v], associated_data=_share_ad(config, v, u))
        if len(plaintext) != 2 * 66:
            raise SecAggError(f"Share from client {v} has the wrong length.")
        held[v] = (plaintext[:66], plaintext[66:])

    mod = _mod(config)
    y = quantize(values=vec, spec=config.quantization, rng=rng)
    y = (y + _words(state.b_seed, _SELF_MASK, config)) & mod
    for v in sorted(senders):
        seed = _pair_seed(private_key=state.s_private, peer_public_key=state.neighbour_keys[v].s_public, config=config)
        p = _words(seed, _PAIR_MASK, config)
        y = ((y + p) if _sign(u, v) > 0 else (y - p)) & mod
    return replace(state, stage="masked", held_shares=held, mask_partners=tuple(sorted(senders))), y


def client_unmask(*, state: ClientState, request: UnmaskRequest) -> tuple[ClientState, UnmaskResponse]:
    """Stage 3: reveal, for each holder-group it belongs to, a ``b`` share (owner survived) or an ``s`` share
    (owner dropped), never both; answered once per round."""
    _expect_stage(state, "masked", "unmask")
    config, u = state.config, state.node_id
    survivors, dropped = set(request.survivors), set(request.dropped)
    if survivors & dropped:
        raise SecAggError(
            f"Unmask request names {sorted(survivors & dropped)} as both survived and dropped; revealing both "
            "shares would expose their updates. Refused."
        )
    if u not in survivors:
        raise SecAggError(f"Client {u} is asked to unmask but is not listed among the survivors.")
    if len(survivors) < config.threshold:
        raise InsufficientSurvivorsError(
            f"Only {len(survivors)} survivors, fewer than the threshold {config.threshold}; refusing to unmask."
        )
    known = set(state.mask_partners) | {u}
    b_out: dict[int, bytes] = {}
    s_out: dict[int, bytes] = {}
    for v in sorted(known):
        s_share, b_share = state.held_shares[v]
        if v in survivors:
            b_out[v] = b_share
        elif v in dropped:
            s_out[v] = s_share
        else:
            raise SecAggError(f"Unmask request does not say whether neighbour {v} survived; refused.")
    return replace(state, stage="done", held_shares={}, b_seed=b""), UnmaskResponse(b_shares=b_out, s_shares=s_out)


# -------------------------------------------------------------------------------------------- server
@dataclass(frozen=True)
class ServerState:
    """The server's view of a round. Contains only public keys, ciphertexts routed through it and masked inputs."""

    config: SecAggConfig
    stage: str
    participants: tuple[int, ...] = ()
    keys: Mapping[int, AdvertisedKeys] = field(default_factory=dict)
    graph: Mapping[int, frozenset[int]] = field(default_factory=dict)
    shared: tuple[int, ...] = ()  # U2
    masked: Mapping[int, np.ndarray] = field(default_factory=dict, repr=False)  # y_u for u in U3


def _require(count: int, config: SecAggConfig, what: str) -> None:
    if count < config.threshold:
        raise InsufficientSurvivorsError(
            f"Secure aggregation aborted: only {count} clients {what}, fewer than the threshold "
            f"{config.threshold}. No aggregate is released; retry the round with more participants."
        )


def server_collect_keys(
    *, config: SecAggConfig, adverts: Mapping[int, AdvertisedKeys]
) -> tuple[ServerState, dict[int, KeyBroadcast]]:
    """After stage 0: fix U1, the neighbour graph, and send each client its holders' public keys."""
    participants = tuple(sorted(adverts))
    _require(len(participants), config, "advertised keys")
    if len(participants) > config.quantization.max_summands:
        raise SecAggError(
            f"{len(participants)} participants exceed quantization.max_summands="
            f"{config.quantization.max_summands}; the integer sum could wrap. Raise max_summands."
        )
    all_keys = [k for ks in adverts.values() for k in (ks.c_public, ks.s_public)]
    if len(set(all_keys)) != len(all_keys) or any(len(k) != 32 for k in all_keys):
        raise SecAggError("Advertised public keys must be distinct 32-byte X25519 keys.")
    graph = neighbour_graph(participants=participants, degree=config.degree, seed=config.graph_seed)
    _check_threshold(config=config, graph=graph)
    out = {
        u: KeyBroadcast(participants=participants, keys={v: adverts[v] for v in holders_of(graph, u)})
        for u in participants
    }
    state = ServerState(config=config, stage="keys", participants=participants, keys=dict(adverts), graph=graph)
    return state, out


def server_route_shares(
    *, state: ServerState, shares: Mapping[int, Mapping[int, bytes]]
) -> tuple[ServerState, dict[int, dict[int, bytes]]]:
    """After stage 1: fix U2 and forward each ciphertext to its recipient.

    A client whose holders in U2 number fewer than the threshold could not be unmasked if it later dropped,
    so it is excluded (repeatedly, until stable) before anything is forwarded.
    """
    if state.stage != "keys":
        raise SecAggError(f"server_route_shares called in stage '{state.stage}'.")
    graph = state.graph
    unknown = set(shares) - set(state.participants)
    if unknown:
        raise SecAggError(f"Shares from non-participants {sorted(unknown)}.")
    for u, by_recipient in shares.items():
        if set(by_recipient) != set(graph[u]):
            raise SecAggError(f"Client {u} sent shares to {sorted(by_recipient)}, expected its neighbours {sorted(graph[u])}.")
    u2 = set(shares)
    while True:
        weak = {u for u in u2 if len(holders_of(graph, u) & u2) < state.config.threshold}
        if not weak:
            break
        u2 -= weak
    _require(len(u2), state.config, "shared their keys")
    routed = {v: {u: shares[u][v] for u in sorted(graph[v] & u2)} for v in sorted(u2)}
    return replace(state, stage="shares", shared=tuple(sorted(u2))), routed


def server_collect_masked(
    *, state: ServerState, masked: Mapping[int, np.ndarray]
) -> tuple[ServerState, dict[int, UnmaskRequest]]:
    """After stage 2: fix U3 (survivors); ask each survivor for its shares."""
    if state.stage != "shares":
        raise SecAggError(f"server_collect_masked called in stage '{state.stage}'.")
    config = state.config
    u3 = set(masked) & set(state.shared)
    if set(masked) - set(state.shared):
        raise SecAggError(f"Masked inputs from clients outside U2: {sorted(set(masked) - set(state.shared))}.")
    limit = (1 << config.quantization.modulus_bits) - 1
    clean: dict[int, np.ndarray] = {}
    for u in sorted(u3):
        y = np.asarray(masked[u])
        if y.dtype != np.uint64 or y.shape != (config.vector_length,) or (y.size and int(y.max()) > limit):
            raise SecAggError(f"Masked input of client {u} is malformed (dtype {y.dtype}, shape {y.shape}).")
        clean[u] = y
    _require(len(u3), config, "sent masked inputs")
    request = UnmaskRequest(survivors=frozenset(u3), dropped=frozenset(set(state.shared) - u3))
    return replace(state, stage="masked", masked=clean), {u: request for u in sorted(u3)}


def server_unmask(*, state: ServerState, responses: Mapping[int, UnmaskResponse]) -> SecAggResult:
    """After stage 3: reconstruct self-mask seeds of survivors and masking keys of dropped clients; remove masks."""
    if state.stage != "masked":
        raise SecAggError(f"server_unmask called in stage '{state.stage}'.")
    config, graph = state.config, state.graph
    survivors = set(state.masked)
    dropped = set(state.shared) - survivors
    responders = set(responses) & survivors
    _require(len(responders), config, "answered the unmasking request")
    b_shares: dict[int, dict[int, bytes]] = {u: {} for u in survivors}
    s_shares: dict[int, dict[int, bytes]] = {v: {} for v in dropped}
    for w in sorted(responders):
        resp, x = responses[w], _x_of(state.participants, w)
        if set(resp.b_shares) & set(resp.s_shares):
            raise SecAggError(f"Client {w} returned both share kinds for the same client; response rejected.")
        for v, share in resp.b_shares.items():
            if v not in survivors or w not in holders_of(graph, v):
                raise SecAggError(f"Client {w} returned an unexpected b share for client {v}.")
            b_shares[v][x] = share
        for v, share in resp.s_shares.items():
            if v not in dropped or w not in holders_of(graph, v):
                raise SecAggError(f"Client {w} returned an unexpected s share for client {v}.")
            s_shares[v][x] = share

    mod = _mod(config)
    total = np.zeros(config.vector_length, dtype=np.uint64)
    for u in sorted(survivors):
        total = (total + state.masked[u]) & mod
        b_seed = _reconstruct(b_shares[u], config, f"self-mask seed of surviving client {u}")
        total = (total - _words(b_seed, _SELF_MASK, config)) & mod
    shared = set(state.shared)
    for v in sorted(dropped):
        s_private = _reconstruct(s_shares[v], config, f"masking key of dropped client {v}")
        if not constant_time_equal(public_key_of(private_key=s_private), state.keys[v].s_public):
            raise SecAggError(f"Reconstructed masking key of dropped client {v} does not match its public key.")
        for u in sorted(graph[v] & survivors & shared):
            seed = _pair_seed(private_key=s_private, peer_public_key=state.keys[u].s_public, config=config)
            p = _words(seed, _PAIR_MASK, config)
            # y_u contains sign(u, v) * PRG(s_uv); remove it.
            total = ((total - p) if _sign(u, v) > 0 else (total + p)) & mod
    n = len(survivors)
    return SecAggResult(
        total=dequantize_sum(total=total, num_summands=n, spec=config.quantization),
        integer_total=total,
        survivors=tuple(sorted(survivors)),
        dropped=tuple(sorted(dropped | (set(state.participants) - shared))),
        error_bound=config.quantization.sum_error_bound(n),
    )


def _reconstruct(shares: dict[int, bytes], config: SecAggConfig, what: str) -> bytes:
    try:
        return shamir_reconstruct(shares=shares, threshold=config.threshold, secret_length=_SECRET_BYTES)
    except InsufficientSurvivorsError as exc:
        raise InsufficientSurvivorsError(
            f"Secure aggregation aborted: cannot reconstruct the {what} ({len(shares)} shares, threshold "
            f"{config.threshold}). Too many of its neighbours dropped out; no aggregate is released."
        ) from exc


# ------------------------------------------------------------------------------------- serialisation
def _b(x: bytes) -> str:
    return base64.b64encode(x).decode()


def _ub(x: str) -> bytes:
    return base64.b64decode(x.encode(), validate=True)


def config_to_json(config: SecAggConfig) -> dict[str, Any]:
    q = config.quantization
    return {
        "round_id": _b(config.round_id),
        "threshold": config.threshold,
        "vector_length": config.vector_length,
        "degree": config.degree,
        "graph_seed": _b(config.graph_seed),
        "quantization": {"clip": q.clip, "modulus_bits": q.modulus_bits, "max_summands": q.max_summands,
                         "rounding": q.rounding},
    }


def config_from_json(d: Mapping[str, Any]) -> SecAggConfig:
    q = d["quantization"]
    return SecAggConfig(
        round_id=_ub(d["round_id"]),
        threshold=int(d["threshold"]),
        vector_length=int(d["vector_length"]),
        degree=None if d["degree"] is None else int(d["degree"]),
        graph_seed=_ub(d["graph_seed"]),
        quantization=QuantizationSpec(clip=float(q["clip"]), modulus_bits=int(q["modulus_bits"]),
                                      max_summands=int(q["max_summands"]), rounding=q["rounding"]),
    )


def keys_to_json(keys: Mapping[int, AdvertisedKeys]) -> dict[str, list[str]]:
    return {str(k): [_b(v.c_public), _b(v.s_public)] for k, v in keys.items()}


def keys_from_json(d: Mapping[str, Sequence[str]]) -> dict[int, AdvertisedKeys]:
    return {int(k): AdvertisedKeys(c_public=_ub(v[0]), s_public=_ub(v[1])) for k, v in d.items()}


def bytes_map_to_json(m: Mapping[int, bytes]) -> dict[str, str]:
    return {str(k): _b(v) for k, v in m.items()}


def bytes_map_from_json(d: Mapping[str, str]) -> dict[int, bytes]:
    return {int(k): _ub(v) for k, v in d.items()}


def ints_to_json(xs: Iterable[int]) -> list[str]:
    # Flower node ids are uint64; strings survive JSON and every record type unchanged.
    return [str(x) for x in sorted(xs)]


def ints_from_json(xs: Iterable[str]) -> list[int]:
    return [int(x) for x in xs]


def _client_state_to_json(s: ClientState) -> dict[str, Any]:
    return {
        "config": config_to_json(s.config),
        "node_id": str(s.node_id),
        "stage": s.stage,
        "c_private": _b(s.c_private),
        "s_private": _b(s.s_private),
        "c_public": _b(s.c_public),
        "s_public": _b(s.s_public),
        "participants": ints_to_json(s.participants),
        "neighbour_keys": keys_to_json(s.neighbour_keys),
        "b_seed": _b(s.b_seed),
        "held_shares": {str(k): [_b(a), _b(b)] for k, (a, b) in s.held_shares.items()},
        "mask_partners": ints_to_json(s.mask_partners),
    }


def _client_state_from_json(d: Mapping[str, Any]) -> ClientState:
    return ClientState(
        config=config_from_json(d["config"]),
        node_id=int(d["node_id"]),
        stage=d["stage"],
        c_private=_ub(d["c_private"]),
        s_private=_ub(d["s_private"]),
        c_public=_ub(d["c_public"]),
        s_public=_ub(d["s_public"]),
        participants=tuple(ints_from_json(d["participants"])),
        neighbour_keys=keys_from_json(d["neighbour_keys"]),
        b_seed=_ub(d["b_seed"]),
        held_shares={int(k): (_ub(v[0]), _ub(v[1])) for k, v in d["held_shares"].items()},
        mask_partners=tuple(ints_from_json(d["mask_partners"])),
    )
