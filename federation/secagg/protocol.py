"""SecAgg / SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020) as pure client and server stage functions.

Threat model (docs/secure-aggregation.md): the server (coordinator) learns only the sum of the survivors'
quantized updates, provided it never obtains ``threshold`` shares of both the self-mask seed ``b_u`` and the
masking key ``s_u`` of the same client. Clients enforce that: each answers one unmasking request per round,
reveals for each neighbour either a ``b`` share (survivor) or an ``s`` share (dropped), never both, refuses
requests whose sets overlap or whose survivor graph is disconnected, and ``threshold > holders / 2`` so no two
disjoint groups of responders could each reconstruct a secret. With pinned partner identity keys, adverts are
signed and verified, so a server that substitutes keys is caught. A hostile client can send anything: every
malformed or inconsistent message turns its sender into a dropout (``ServerState.excluded``), a bad share is
caught by the self-mask commitment or the public key, and an unmasked sum outside the quantization range is
rejected (AggregateRejectedError) instead of released.

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
import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from federation.secagg import identity as _identity
from federation.secagg.primitives import (
    PROTOCOL_LABEL,
    AggregateRejectedError,
    Entropy,
    InsufficientSurvivorsError,
    QuantizationSpec,
    SecAggError,
    agree,
    constant_time_equal,
    decrypt_share,
    dequantize_sum,
    _encode_parts,
    encrypt_share,
    generate_keypair,
    lagrange_at,
    prg_words,
    public_key_of,
    quantize,
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
    "commitment_of",
    "connected",
    "holders_count",
    "holders_of",
    "neighbour_graph",
    "server_collect_keys",
    "server_collect_masked",
    "server_route_shares",
    "server_unmask",
    "threshold_from_neighbourhood",
]

_SECRET_BYTES = 32
_SHARE_BYTES = 66  # one Shamir share over GF(2**521 - 1)
CIPHERTEXT_BYTES = 12 + 2 * _SHARE_BYTES + 16  # nonce | (s share | b share) | Poly1305 tag
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

    def digest(self) -> bytes:
        """SHA-256 of the canonical config: signed in every advert, so all clients provably got the same one."""
        return hashlib.sha256(json.dumps(config_to_json(self), sort_keys=True).encode()).digest()


@dataclass(frozen=True)
class AdvertisedKeys:
    """A client's advert: ``c`` for encrypting shares, ``s`` for pairwise mask seeds, a hash commitment to its
    self-mask seed ``b``, and (with identities) its Ed25519 identity key and signature over all of it."""

    c_public: bytes
    s_public: bytes
    commitment: bytes = b""
    identity: bytes = b""
    signature: bytes = b""


@dataclass(frozen=True)
class KeyBroadcast:
    """Server -> client after stage 0: all participants U1 and the adverts of the client's holders."""

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
    """The outcome of a secure sum: the float sum of the survivors' (clipped) updates and its bookkeeping.

    ``excluded`` names the clients the server turned into dropouts for a malformed or inconsistent reply, with
    a public reason code (never a value)."""

    total: np.ndarray
    integer_total: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    error_bound: float
    excluded: Mapping[int, str] = field(default_factory=dict)
    # per survivor, the small public record it attached to its masked input (``flower.WITNESS_KEY``), if any
    witnesses: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)


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


def holders_count(*, participants: int, degree: int | None) -> int:
    """Share holders per client (neighbours + itself) for ``participants`` clients: degree + 1, or n."""
    if degree is None or degree >= participants - 1:
        return participants
    return degree + 1


def threshold_from_neighbourhood(*, holders: int, fraction: float) -> int:
    """SecAgg(+) threshold t = max(2, ceil(fraction * holders)); requires holders/2 < t <= holders.

    The threshold counts shares *within one neighbourhood* (its holders), never all participants: SecAgg+
    with degree k has k + 1 holders per client, so t > k + 1 could never be met."""
    t = max(2, math.ceil(fraction * holders - 1e-9))
    if not (2 * t > holders and t <= holders):
        raise SecAggError(
            f"secagg.threshold_fraction={fraction} gives threshold {t} for {holders} share holders per client "
            f"(secagg.degree + 1, or all participants for the complete graph); need {holders // 2 + 1} <= t <= "
            f"{holders}: raise secagg.threshold_fraction above 0.5 (at most 1) or change secagg.degree."
        )
    return t


def connected(graph: Mapping[int, frozenset[int]], members: Iterable[int]) -> bool:
    """Whether the subgraph of ``graph`` induced by ``members`` is connected."""
    nodes = set(members)
    if not nodes:
        return False
    seen, todo = set(), [next(iter(nodes))]
    while todo:
        u = todo.pop()
        if u in seen:
            continue
        seen.add(u)
        todo.extend((graph[u] & nodes) - seen)
    return seen == nodes


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


def commitment_of(*, config: SecAggConfig, node_id: int, b_seed: bytes) -> bytes:
    """Hash commitment to a self-mask seed (hiding: the seed is 256 uniform bits; binding: SHA-256)."""
    return hashlib.sha256(_encode_parts(PROTOCOL_LABEL, b"b-commit", config.round_id, str(node_id).encode(),
                                        b_seed)).digest()


def advert_message(*, config: SecAggConfig, node_id: int, keys: AdvertisedKeys) -> bytes:
    """The bytes an identity key signs: round, node id, config digest, both keys, commitment, identity."""
    return _encode_parts(PROTOCOL_LABEL, b"advert", config.round_id, str(node_id).encode(), config.digest(),
                         keys.c_public, keys.s_public, keys.commitment, keys.identity)


def advert_problem(*, config: SecAggConfig, node_id: int, keys: AdvertisedKeys) -> str | None:
    """A public reason code if an advert is malformed, else None. Keys are checked with throwaway exchanges
    (an all-zero or low-order X25519 key gives an all-zero secret and is refused); a present signature must
    verify under the advert's own identity key (pinning is checked by the clients)."""
    if len(keys.c_public) != 32 or len(keys.s_public) != 32 or len(keys.commitment) != 32:
        return "advert-length"
    if keys.c_public == keys.s_public:
        return "advert-key-reuse"
    if (len(keys.identity), len(keys.signature)) not in ((0, 0), (32, 64)):
        return "advert-identity-length"
    probe = generate_keypair()
    for k in (keys.c_public, keys.s_public):
        try:
            agree(private_key=probe.private, peer_public_key=k, purpose=b"probe", round_id=config.round_id)
        except SecAggError:
            return "advert-low-order-key"
    if keys.identity and not _identity.verify(keys.identity, keys.signature,
                                              advert_message(config=config, node_id=node_id, keys=keys)):
        return "advert-bad-signature"
    return None


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
    rejected: tuple[int, ...] = ()  # senders whose encrypted shares failed authentication (reported)

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
    *, config: SecAggConfig, node_id: int, entropy: Entropy = os.urandom, identity_key: bytes | None = None
) -> tuple[ClientState, AdvertisedKeys]:
    """Stage 0: generate the encryption (c) and masking (s) X25519 key pairs and the self-mask seed b;
    advertise the public keys and a commitment to b, signed with ``identity_key`` (raw Ed25519) if given."""
    c, s = generate_keypair(entropy=entropy), generate_keypair(entropy=entropy)
    b_seed = entropy(_SECRET_BYTES)
    keys = AdvertisedKeys(c_public=c.public, s_public=s.public,
                          commitment=commitment_of(config=config, node_id=node_id, b_seed=b_seed))
    if identity_key is not None:
        keys = replace(keys, identity=_identity.public_of(identity_key))
        keys = replace(keys, signature=_identity.sign(identity_key, advert_message(config=config, node_id=node_id,
                                                                                   keys=keys)))
    state = ClientState(
        config=config,
        node_id=node_id,
        stage="advertised",
        c_private=c.private,
        s_private=s.private,
        c_public=c.public,
        s_public=s.public,
        b_seed=b_seed,
    )
    return state, keys


def client_share_keys(
    *, state: ClientState, broadcast: KeyBroadcast, entropy: Entropy = os.urandom,
    pinned: Mapping[bytes, str] | None = None,
) -> tuple[ClientState, dict[int, bytes]]:
    """Stage 1: Shamir-share ``s_u`` and the self-mask seed ``b_u`` among the holders, encrypted per holder.

    With ``pinned`` (partner identity keys fixed at onboarding) every holder's advert must be signed by a
    distinct pinned key over this round's config: a server that substitutes keys is caught here."""
    _expect_stage(state, "advertised", "share keys")
    config, u = state.config, state.node_id
    participants = tuple(sorted(set(broadcast.participants)))
    if len(participants) != len(broadcast.participants) or u not in participants:
        raise SecAggError(f"Client {u} is not among the round's participants, or they repeat.")
    if len(participants) > config.quantization.max_summands:
        raise SecAggError(f"{len(participants)} participants exceed max_summands; the sum could wrap. Refused.")
    graph = neighbour_graph(participants=participants, degree=config.degree, seed=config.graph_seed)
    _check_threshold(config=config, graph=graph)
    holders = holders_of(graph, u)
    if set(broadcast.keys) != holders:
        raise SecAggError(
            f"Client {u} received keys for {sorted(broadcast.keys)} but its holders under the public graph are "
            f"{sorted(holders)}; the server's broadcast is inconsistent."
        )
    own = broadcast.keys[u]
    if own.c_public != state.c_public or own.s_public != state.s_public or own.commitment != commitment_of(
            config=config, node_id=u, b_seed=state.b_seed):
        raise SecAggError(f"The server echoed a different advert for client {u}; aborting.")
    all_keys = [k for ks in broadcast.keys.values() for k in (ks.c_public, ks.s_public)]
    if len(set(all_keys)) != len(all_keys):
        raise SecAggError("Two advertised public keys are equal; every key must be fresh and distinct.")
    if pinned is not None:
        identities = [ks.identity for ks in broadcast.keys.values()]
        unpinned = sorted(v for v, ks in broadcast.keys.items() if not ks.identity or ks.identity not in pinned
                          or not _identity.verify(ks.identity, ks.signature,
                                                  advert_message(config=config, node_id=v, keys=ks)))
        if unpinned or len(set(identities)) != len(identities):
            raise SecAggError(
                f"Key adverts of {unpinned or 'two holders'} are not signed by distinct pinned partner keys "
                "(node config secagg-peers) over this round's config: the coordinator may have substituted keys or "
                "sent clients different configs. Refusing to share secrets."
            )
    for v, ks in broadcast.keys.items():
        problem = advert_problem(config=config, node_id=v, keys=ks)
        if problem:
            raise SecAggError(f"The server forwarded a malformed advert for client {v} ({problem}); aborting.")

    xs = {v: _x_of(participants, v) for v in holders}
    s_shares = shamir_split(secret=state.s_private, threshold=config.threshold, xs=list(xs.values()), entropy=entropy)
    b_shares = shamir_split(secret=state.b_seed, threshold=config.threshold, xs=list(xs.values()), entropy=entropy)
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

    ``y_u = quantize(update) + PRG(b_u) + sum_{v accepted} sign(u, v) PRG(s_uv)  (mod 2^k)``. A share that
    fails authentication does not stop this client: its sender is left out of the masks and reported in
    ``state.rejected`` (the server then treats that sender as dropped). ``rng``: stochastic rounding only.
    """
    _expect_stage(state, "shared", "send a masked input")
    config, u = state.config, state.node_id
    senders = set(ciphertexts)
    if not senders <= set(state.neighbour_keys) - {u}:
        raise SecAggError(f"Client {u} received shares from non-neighbours {sorted(senders - set(state.neighbour_keys))}.")
    vec = np.asarray(update, dtype=np.float64)
    if vec.shape != (config.vector_length,):
        raise SecAggError(f"Client {u}'s update has shape {vec.shape}, expected ({config.vector_length},).")

    held = dict(state.held_shares)
    rejected = []
    for v in sorted(senders):
        key = agree(private_key=state.c_private, peer_public_key=state.neighbour_keys[v].c_public, purpose=_ENC,
                    round_id=config.round_id)
        try:
            plaintext = decrypt_share(key=key, ciphertext=ciphertexts[v], associated_data=_share_ad(config, v, u))
        except SecAggError:
            rejected.append(v)
            continue
        if len(plaintext) != 2 * _SHARE_BYTES:
            rejected.append(v)
            continue
        held[v] = (plaintext[:_SHARE_BYTES], plaintext[_SHARE_BYTES:])
    accepted = sorted(senders - set(rejected))
    if len(accepted) + 1 < config.threshold:
        raise InsufficientSurvivorsError(
            f"Client {u} has {len(accepted)} neighbours left, fewer than threshold-1 = {config.threshold - 1}."
        )

    mod = _mod(config)
    y = quantize(values=vec, spec=config.quantization, rng=rng)
    y = (y + _words(state.b_seed, _SELF_MASK, config)) & mod
    for v in accepted:
        seed = _pair_seed(private_key=state.s_private, peer_public_key=state.neighbour_keys[v].s_public, config=config)
        p = _words(seed, _PAIR_MASK, config)
        y = ((y + p) if _sign(u, v) > 0 else (y - p)) & mod
    new_state = replace(state, stage="masked", held_shares=held, mask_partners=tuple(accepted),
                        rejected=tuple(rejected))
    return new_state, y


def client_unmask(*, state: ClientState, request: UnmaskRequest) -> tuple[ClientState, UnmaskResponse]:
    """Stage 3: reveal, for each holder-group it belongs to, a ``b`` share (owner survived) or an ``s`` share
    (owner dropped), never both; answered once per round.

    Refused: overlapping sets, fewer survivors than the threshold, a survivor neighbour whose pair mask this
    client did not add, and a survivor set whose induced neighbour graph is disconnected (the server could
    then unmask the partial sum of each component)."""
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
    if not (survivors | dropped) <= set(state.participants):
        raise SecAggError("Unmask request names clients outside the round's participants. Refused.")
    if len(survivors) < config.threshold:
        raise InsufficientSurvivorsError(
            f"Only {len(survivors)} survivors, fewer than the threshold {config.threshold}; refusing to unmask."
        )
    graph = neighbour_graph(participants=state.participants, degree=config.degree, seed=config.graph_seed)
    unmasked = sorted((graph[u] & survivors) - set(state.mask_partners))
    if unmasked:
        raise SecAggError(f"Unmask request lists neighbours {unmasked} as survivors, but this client never added "
                          "a pair mask with them. Refused.")
    if not connected(graph, survivors):
        raise SecAggError("The survivors' neighbour graph is disconnected: the server could unmask the partial sum "
                          "of each component. Refused.")
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
    """The server's view of a round. Contains only public keys, ciphertexts routed through it and masked inputs.

    ``excluded``: clients turned into dropouts for a malformed or inconsistent message (reason codes)."""

    config: SecAggConfig
    stage: str
    participants: tuple[int, ...] = ()
    keys: Mapping[int, AdvertisedKeys] = field(default_factory=dict)
    graph: Mapping[int, frozenset[int]] = field(default_factory=dict)
    shared: tuple[int, ...] = ()  # U2
    masked: Mapping[int, np.ndarray] = field(default_factory=dict, repr=False)  # y_u for u in U3
    rejected: Mapping[int, frozenset[int]] = field(default_factory=dict)  # survivor -> senders it left out
    excluded: Mapping[int, str] = field(default_factory=dict)


def _require(count: int, config: SecAggConfig, what: str) -> None:
    if count < config.threshold:
        raise InsufficientSurvivorsError(
            f"Secure aggregation aborted: only {count} clients {what}, fewer than the threshold "
            f"{config.threshold}. No aggregate is released; retry the round with more participants."
        )


def server_collect_keys(
    *, config: SecAggConfig, adverts: Mapping[int, AdvertisedKeys]
) -> tuple[ServerState, dict[int, KeyBroadcast]]:
    """After stage 0: fix U1, the neighbour graph, and send each client its holders' adverts.

    A malformed advert (lengths, low-order key, bad signature) excludes its sender; a public key or identity
    that appears in two adverts (a replay) excludes every advert carrying it."""
    excluded: dict[int, str] = {}
    for u in sorted(adverts):
        problem = advert_problem(config=config, node_id=u, keys=adverts[u])
        if problem:
            excluded[u] = problem
    owners: dict[bytes, set[int]] = {}
    for u, ks in adverts.items():
        if u not in excluded:
            for k in (ks.c_public, ks.s_public, ks.identity):
                if k:
                    owners.setdefault(k, set()).add(u)
    for us in owners.values():
        if len(us) > 1:
            excluded.update({u: "advert-replayed-key" for u in us})
    participants = tuple(sorted(set(adverts) - set(excluded)))
    _require(len(participants), config, "advertised valid keys")
    if len(participants) > config.quantization.max_summands:
        raise SecAggError(
            f"{len(participants)} participants exceed quantization.max_summands="
            f"{config.quantization.max_summands}; the integer sum could wrap. Raise max_summands."
        )
    graph = neighbour_graph(participants=participants, degree=config.degree, seed=config.graph_seed)
    _check_threshold(config=config, graph=graph)
    out = {
        u: KeyBroadcast(participants=participants, keys={v: adverts[v] for v in holders_of(graph, u)})
        for u in participants
    }
    state = ServerState(config=config, stage="keys", participants=participants,
                        keys={u: adverts[u] for u in participants}, graph=graph, excluded=excluded)
    return state, out


def server_route_shares(
    *, state: ServerState, shares: Mapping[int, Mapping[int, bytes]]
) -> tuple[ServerState, dict[int, dict[int, bytes]]]:
    """After stage 1: fix U2 and forward each ciphertext to its recipient.

    A client that did not send exactly one well-sized ciphertext to each neighbour is excluded. A client whose
    holders in U2 number fewer than the threshold could not be unmasked if it later dropped, so it is excluded
    too (repeatedly, until stable) before anything is forwarded.
    """
    if state.stage != "keys":
        raise SecAggError(f"server_route_shares called in stage '{state.stage}'.")
    graph = state.graph
    excluded = dict(state.excluded)
    u2 = set()
    for u, by_recipient in shares.items():
        if u not in graph:
            continue
        if set(by_recipient) != set(graph[u]):
            excluded[u] = "shares-wrong-recipients"
        elif any(not isinstance(ct, bytes) or len(ct) != CIPHERTEXT_BYTES for ct in by_recipient.values()):
            excluded[u] = "shares-wrong-length"
        else:
            u2.add(u)
    while True:
        weak = {u for u in u2 if len(holders_of(graph, u) & u2) < state.config.threshold}
        if not weak:
            break
        u2 -= weak
    _require(len(u2), state.config, "shared their keys")
    routed = {v: {u: shares[u][v] for u in sorted(graph[v] & u2)} for v in sorted(u2)}
    return replace(state, stage="shares", shared=tuple(sorted(u2)), excluded=excluded), routed


def server_collect_masked(
    *, state: ServerState, masked: Mapping[int, np.ndarray], rejected: Mapping[int, Iterable[int]] | None = None
) -> tuple[ServerState, dict[int, UnmaskRequest]]:
    """After stage 2: fix U3 (survivors); ask each survivor for its shares.

    A malformed masked input (dtype, length, a word >= 2^k) or a rejection list naming non-neighbours excludes
    its sender. A sender whose encrypted shares a survivor rejected is treated as dropped (its masks are then
    removed with its reconstructed masking key; the survivor never added the pair mask with it)."""
    if state.stage != "shares":
        raise SecAggError(f"server_collect_masked called in stage '{state.stage}'.")
    config, graph = state.config, state.graph
    shared = set(state.shared)
    excluded = dict(state.excluded)
    rejected = rejected or {}
    limit = (1 << config.quantization.modulus_bits) - 1
    clean: dict[int, np.ndarray] = {}
    rej: dict[int, frozenset[int]] = {}
    for u in sorted(set(masked) & shared):
        y = masked[u]
        r = frozenset(rejected.get(u, ()))
        if (not isinstance(y, np.ndarray) or y.dtype != np.uint64 or y.shape != (config.vector_length,)
                or (y.size and int(y.max()) > limit)):
            excluded[u] = "masked-malformed"
        elif not r <= graph[u] & shared:
            excluded[u] = "masked-bad-rejection-list"
        else:
            clean[u] = y
            rej[u] = r
    accused = set().union(*rej.values()) if rej else set()
    for v in accused & set(clean):
        excluded[v] = "shares-rejected-by-neighbour"
    u3 = set(clean) - accused
    _require(len(u3), config, "sent masked inputs")
    request = UnmaskRequest(survivors=frozenset(u3), dropped=frozenset(shared - u3))
    new = replace(state, stage="masked", masked={u: clean[u] for u in u3}, rejected={u: rej[u] for u in u3},
                  excluded=excluded)
    return new, {u: request for u in sorted(u3)}


def _consistent_secret(shares: Mapping[int, bytes], threshold: int,
                       check: Callable[[bytes], bool]) -> tuple[bytes | None, set[int]]:
    """A secret reconstructed from ``threshold`` of the ``shares`` that passes ``check`` (commitment or public
    key), tolerating bad shares: the first t, then every leave-one-out, then leave-two-out (bounded). Returns
    the secret (None if no subset verifies) and the evaluation points whose shares lie off its polynomial."""
    xs = sorted(shares)
    if len(xs) < threshold:
        return None, set()
    candidates: list[tuple[int, ...]] = [tuple(xs[:threshold])]
    if len(xs) > threshold:
        candidates += [tuple([x for x in xs if x != bad][:threshold]) for bad in xs]
    if len(xs) > threshold + 1:
        candidates += [tuple([x for x in xs if x not in pair][:threshold])
                       for pair in itertools.islice(itertools.combinations(xs, 2), 256)]
    for subset in dict.fromkeys(candidates):
        good = {x: shares[x] for x in subset}
        value = lagrange_at(good, 0)
        if value >> (8 * _SECRET_BYTES):
            continue
        secret = value.to_bytes(_SECRET_BYTES, "big")
        if check(secret):
            off = {x for x in xs if x not in good and lagrange_at(good, x) != int.from_bytes(shares[x], "big")}
            return secret, off
    return None, set()


def _secret_or_abort(shares: Mapping[int, bytes], config: SecAggConfig, holder_at: Mapping[int, int],
                     excluded: dict[int, str], check: Callable[[bytes], bool], what: str, against: str) -> bytes:
    """The verified secret; holders whose shares lie off its polynomial are recorded in ``excluded``."""
    secret, off = _consistent_secret(shares, config.threshold, check)
    if secret is None:
        raise InsufficientSurvivorsError(
            f"Secure aggregation aborted: cannot reconstruct the {what} ({len(shares)} shares, threshold "
            f"{config.threshold}) consistently with {against}. No aggregate is released."
        )
    excluded.update({holder_at[x]: "unmask-bad-share" for x in off})
    return secret


def server_unmask(*, state: ServerState, responses: Mapping[int, UnmaskResponse]) -> SecAggResult:
    """After stage 3: reconstruct self-mask seeds of survivors (checked against their commitments) and masking
    keys of dropped clients (checked against their public keys), remove the masks, and check the range.

    A response with malformed or unexpected shares is ignored (its sender's input still counts); a bad share
    is detected by the commitment and left out. Raises InsufficientSurvivorsError when a secret cannot be
    reconstructed and AggregateRejectedError when the sum lies outside the quantization range."""
    if state.stage != "masked":
        raise SecAggError(f"server_unmask called in stage '{state.stage}'.")
    config, graph = state.config, state.graph
    excluded = dict(state.excluded)
    survivors = set(state.masked)
    dropped = set(state.shared) - survivors
    b_shares: dict[int, dict[int, bytes]] = {u: {} for u in survivors}
    s_shares: dict[int, dict[int, bytes]] = {v: {} for v in dropped}
    responders = 0
    for w in sorted(set(responses) & survivors):
        resp, x = responses[w], _x_of(state.participants, w)
        b, s = dict(resp.b_shares), dict(resp.s_shares)
        bad = (set(b) & set(s)
               or any(v not in survivors or w not in holders_of(graph, v) for v in b)
               or any(v not in dropped or w not in holders_of(graph, v) for v in s)
               or any(not isinstance(sh, bytes) or len(sh) != _SHARE_BYTES for sh in [*b.values(), *s.values()]))
        if bad:
            excluded[w] = "unmask-malformed"
            continue
        responders += 1
        for v, share in b.items():
            b_shares[v][x] = share
        for v, share in s.items():
            s_shares[v][x] = share
    _require(responders, config, "answered the unmasking request")

    holder_at = {_x_of(state.participants, w): w for w in state.participants}
    mod = _mod(config)
    total = np.zeros(config.vector_length, dtype=np.uint64)
    for u in sorted(survivors):
        total = (total + state.masked[u]) & mod
        commit = state.keys[u].commitment
        b_seed = _secret_or_abort(
            b_shares[u], config, holder_at, excluded,
            lambda sd, u=u, commit=commit: constant_time_equal(commitment_of(config=config, node_id=u, b_seed=sd), commit),
            f"self-mask seed of surviving client {u}", "its commitment")
        total = (total - _words(b_seed, _SELF_MASK, config)) & mod
    for v in sorted(dropped):
        partners = sorted(u for u in graph[v] & survivors if v not in state.rejected.get(u, frozenset()))
        if not partners:
            continue  # no survivor added a pair mask with v: nothing of v's to remove
        pub = state.keys[v].s_public
        s_private = _secret_or_abort(
            s_shares[v], config, holder_at, excluded,
            lambda sk, pub=pub: constant_time_equal(public_key_of(private_key=sk), pub),
            f"masking key of dropped client {v}", "its public key")
        for u in partners:
            seed = _pair_seed(private_key=s_private, peer_public_key=state.keys[u].s_public, config=config)
            p = _words(seed, _PAIR_MASK, config)
            # y_u contains sign(u, v) * PRG(s_uv); remove it.
            total = ((total - p) if _sign(u, v) > 0 else (total + p)) & mod
    n = len(survivors)
    top = n * config.quantization.levels
    if total.size and int(total.max()) > top:
        raise AggregateRejectedError(
            f"Secure aggregation rejected: the unmasked sum of {n} clients has coordinates outside the "
            f"quantization range [0, {n} * levels]; a client sent an inconsistent masked input or share. "
            "No aggregate is released."
        )
    return SecAggResult(
        total=dequantize_sum(total=total, num_summands=n, spec=config.quantization),
        integer_total=total,
        survivors=tuple(sorted(survivors)),
        dropped=tuple(sorted((dropped | (set(state.participants) - set(state.shared)) | set(excluded)) - survivors)),
        error_bound=config.quantization.sum_error_bound(n),
        excluded=excluded,
    )


# ------------------------------------------------------------------------------------- serialisation
# Strict parsing: every field of a peer's message has one type and one length; anything else raises
# SecAggError (the server then treats the sender as a dropout). Error texts name fields, never values.
MAX_JSON_DEPTH = 6
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(rb"[\[\]{}]")


def load_json(data: Any, *, max_bytes: int) -> Any:
    """``json.loads`` with a size bound, a nesting bound (checked before parsing) and no NaN/Infinity."""
    if not isinstance(data, bytes):
        raise SecAggError(f"payload must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise SecAggError(f"payload of {len(data)} bytes exceeds the bound of {max_bytes}")
    depth = 0
    for m in _BRACKETS.finditer(_STRING.sub(b"", data)):
        depth += 1 if m.group() in (b"[", b"{") else -1
        if depth > MAX_JSON_DEPTH:
            raise SecAggError(f"payload nests deeper than {MAX_JSON_DEPTH} levels")

    def no_constants(name: str) -> Any:
        raise ValueError(f"non-finite constant {name}")

    try:
        return json.loads(data, parse_constant=no_constants)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise SecAggError(f"payload is not valid JSON ({type(exc).__name__})") from None


def expect_fields(d: Any, required: Iterable[str], what: str) -> Mapping[str, Any]:
    """``d`` must be a JSON object with exactly the ``required`` fields (no unknown field)."""
    req = set(required)
    if not isinstance(d, dict):
        raise SecAggError(f"{what} must be a JSON object, got {type(d).__name__}")
    if set(d) != req:
        raise SecAggError(f"{what} fields {sorted(map(str, d))[:8]} differ from the expected {sorted(req)}")
    return d


def _b(x: bytes) -> str:
    return base64.b64encode(x).decode()


def _ub(x: Any, length: int | None = None, *, max_len: int = 1 << 16) -> bytes:
    if not isinstance(x, str) or len(x) > 4 * (max_len // 3 + 2):
        raise SecAggError(f"expected a base64 string, got {type(x).__name__}")
    try:
        out = base64.b64decode(x.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise SecAggError("invalid base64") from None
    if length is not None and len(out) != length:
        raise SecAggError(f"expected {length} bytes, got {len(out)}")
    return out


def _uint(x: Any, what: str, *, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi:
        raise SecAggError(f"{what} must be an integer in [{lo}, {hi}]")
    return x


def node_from_json(x: Any) -> int:
    """A Flower node id (uint64) sent as a decimal string."""
    if not isinstance(x, str) or not x.isascii() or not x.isdigit() or len(x) > 20 or int(x) >= 1 << 64:
        raise SecAggError("a node id must be a decimal string of a uint64")
    return int(x)


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


def config_from_json(d: Any) -> SecAggConfig:
    d = expect_fields(d, ("round_id", "threshold", "vector_length", "degree", "graph_seed", "quantization"), "config")
    q = expect_fields(d["quantization"], ("clip", "modulus_bits", "max_summands", "rounding"), "quantization")
    if isinstance(q["clip"], bool) or not isinstance(q["clip"], (int, float)) or q["rounding"] not in (
            "nearest", "stochastic"):
        raise SecAggError("quantization.clip must be a number and rounding 'nearest' or 'stochastic'")
    return SecAggConfig(
        round_id=_ub(d["round_id"], max_len=64),
        threshold=_uint(d["threshold"], "threshold", hi=1 << 20),
        vector_length=_uint(d["vector_length"], "vector_length", hi=1 << 31),
        degree=None if d["degree"] is None else _uint(d["degree"], "degree", hi=1 << 20),
        graph_seed=_ub(d["graph_seed"], max_len=64),
        quantization=QuantizationSpec(clip=float(q["clip"]), modulus_bits=_uint(q["modulus_bits"], "modulus_bits"),
                                      max_summands=_uint(q["max_summands"], "max_summands", hi=1 << 20),
                                      rounding=q["rounding"]),
    )


def advert_to_json(k: AdvertisedKeys) -> list[str]:
    return [_b(k.c_public), _b(k.s_public), _b(k.commitment), _b(k.identity), _b(k.signature)]


def advert_from_json(v: Any) -> AdvertisedKeys:
    if not isinstance(v, list) or len(v) != 5:
        raise SecAggError("an advert must be a list of 5 base64 strings")
    c, s, commit, ident, sig = (_ub(x, max_len=64) for x in v)
    return AdvertisedKeys(c_public=c, s_public=s, commitment=commit, identity=ident, signature=sig)


def keys_to_json(keys: Mapping[int, AdvertisedKeys]) -> dict[str, list[str]]:
    return {str(k): advert_to_json(v) for k, v in keys.items()}


def keys_from_json(d: Any) -> dict[int, AdvertisedKeys]:
    if not isinstance(d, dict):
        raise SecAggError("keys must be a JSON object")
    return {node_from_json(k): advert_from_json(v) for k, v in d.items()}


def bytes_map_to_json(m: Mapping[int, bytes]) -> dict[str, str]:
    return {str(k): _b(v) for k, v in m.items()}


def bytes_map_from_json(d: Any, length: int | None = None) -> dict[int, bytes]:
    """{node id: bytes}; ``length`` pins each value's size (a share, a ciphertext)."""
    if not isinstance(d, dict):
        raise SecAggError("expected a JSON object of node id -> base64")
    return {node_from_json(k): _ub(v, length) for k, v in d.items()}


def ints_to_json(xs: Iterable[int]) -> list[str]:
    # Flower node ids are uint64; strings survive JSON and every record type unchanged.
    return [str(x) for x in sorted(xs)]


def ints_from_json(xs: Any) -> list[int]:
    if not isinstance(xs, list):
        raise SecAggError("expected a JSON list of node ids")
    out = [node_from_json(x) for x in xs]
    if len(set(out)) != len(out):
        raise SecAggError("a list of node ids repeats an id")
    return out


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
        "rejected": ints_to_json(s.rejected),
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
        rejected=tuple(ints_from_json(d["rejected"])),
    )
