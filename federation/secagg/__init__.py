"""Secure aggregation (SecAgg / SecAgg+) for fedprop: the server learns only the sum of partners' updates.

``primitives``: X25519, HKDF-SHA256, ChaCha20 mask PRG, ChaCha20-Poly1305 share encryption, Shamir sharing
over GF(2**521 - 1), quantization modulo 2**k. ``protocol``: the client and server stage functions, pure and
Flower-free. ``flower``: a driver running those stages over Flower's Message API (imported on demand, so
this package stays importable without flwr).
"""
from federation.secagg.primitives import InsufficientSurvivorsError, QuantizationSpec, SecAggError
from federation.secagg.protocol import (
    AdvertisedKeys,
    ClientState,
    KeyBroadcast,
    SecAggConfig,
    SecAggResult,
    ServerState,
    UnmaskRequest,
    UnmaskResponse,
    client_advertise,
    client_masked_input,
    client_share_keys,
    client_unmask,
    neighbour_graph,
    server_collect_keys,
    server_collect_masked,
    server_route_shares,
    server_unmask,
)

__all__ = [
    "AdvertisedKeys",
    "ClientState",
    "InsufficientSurvivorsError",
    "KeyBroadcast",
    "QuantizationSpec",
    "SecAggConfig",
    "SecAggError",
    "SecAggResult",
    "ServerState",
    "UnmaskRequest",
    "UnmaskResponse",
    "client_advertise",
    "client_masked_input",
    "client_share_keys",
    "client_unmask",
    "neighbour_graph",
    "server_collect_keys",
    "server_collect_masked",
    "server_route_shares",
    "server_unmask",
]
