"""The SecAgg / SecAgg+ protocol end to end, with dropouts, aborts and what the server gets to see."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
from scipy import stats

from federation.errors import FedpropError
from federation.secagg.primitives import InsufficientSurvivorsError, QuantizationSpec, SecAggError, quantize
from federation.secagg.protocol import (
    ClientState,
    KeyBroadcast,
    SecAggConfig,
    SecAggResult,
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


def seeded_entropy(seed: int) -> Callable[[int], bytes]:
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


@dataclass
class Transcript:
    """Everything the server process received from clients (to check what it can learn)."""

    masked: dict[int, np.ndarray] = field(default_factory=dict)
    responses: dict[int, UnmaskResponse] = field(default_factory=dict)
    states: dict[int, ClientState] = field(default_factory=dict)


def run_round(
    *,
    config: SecAggConfig,
    updates: dict[int, np.ndarray],
    drop_before_share: set[int] = frozenset(),  # type: ignore[assignment]
    drop_before_masked: set[int] = frozenset(),  # type: ignore[assignment]
    drop_before_unmask: set[int] = frozenset(),  # type: ignore[assignment]
    seed: int = 0,
    serialise: bool = True,
    transcript: Transcript | None = None,
) -> SecAggResult:
    """Drive every stage in-process; ``serialise`` round-trips client state through bytes between stages
    (as the Flower driver does with ``context.state``)."""
    ent = seeded_entropy(seed)
    t = transcript if transcript is not None else Transcript()
    cs: dict[int, ClientState] = {}
    adverts = {}
    for u in sorted(updates):
        cs[u], adverts[u] = client_advertise(config=config, node_id=u, entropy=ent)

    def keep(u: int, s: ClientState) -> None:
        cs[u] = ClientState.from_bytes(s.to_bytes()) if serialise else s

    server, broadcasts = server_collect_keys(config=config, adverts=adverts)
    shares = {}
    for u, bc in broadcasts.items():
        if u in drop_before_share:
            continue
        s, shares[u] = client_share_keys(state=cs[u], broadcast=bc, entropy=ent)
        keep(u, s)
    server, routed = server_route_shares(state=server, shares=shares)
    masked = {}
    for u, cts in routed.items():
        if u in drop_before_masked:
            continue
        s, masked[u] = client_masked_input(state=cs[u], ciphertexts=cts, update=updates[u])
        keep(u, s)
    t.masked.update(masked)
    server, requests = server_collect_masked(state=server, masked=masked)
    responses = {}
    for u, req in requests.items():
        if u in drop_before_unmask:
            continue
        s, responses[u] = client_unmask(state=cs[u], request=req)
        keep(u, s)
    t.responses.update(responses)
    t.states.update(cs)
    return server_unmask(state=server, responses=responses)


def make(n: int, d: int, *, threshold: int, degree: int | None = None, clip: float = 1.0, bits: int = 32,
         seed: int = 0, ids: list[int] | None = None) -> tuple[SecAggConfig, dict[int, np.ndarray]]:
    rng = np.random.default_rng(seed)
    config = SecAggConfig(
        round_id=rng.bytes(16),
        threshold=threshold,
        vector_length=d,
        degree=degree,
        graph_seed=rng.bytes(16),
        quantization=QuantizationSpec(clip=clip, modulus_bits=bits, max_summands=max(n, 8)),
    )
    ids = ids or [int.from_bytes(rng.bytes(8), "big") for _ in range(n)]  # uint64, like Flower node ids
    return config, {u: rng.normal(0, clip / 2, size=d) for u in ids}


def clipped_sum(updates: dict[int, np.ndarray], members, clip: float) -> np.ndarray:
    return np.sum([np.clip(updates[u], -clip, clip) for u in members], axis=0)


# ----------------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize(
    "n,d,threshold,degree,bits,seed",
    [
        (3, 1, 2, None, 32, 0),
        (4, 17, 3, None, 32, 1),
        (5, 300, 3, None, 16, 2),
        (8, 1000, 5, None, 64, 3),
        (10, 257, 4, 6, 32, 4),  # SecAgg+: 6 neighbours, 7 holders
        (16, 500, 3, 4, 32, 5),
    ],
)
def test_aggregate_equals_plain_sum_within_quantization_bound(n, d, threshold, degree, bits, seed) -> None:
    config, updates = make(n, d, threshold=threshold, degree=degree, bits=bits, seed=seed)
    first = updates[next(iter(updates))]
    first[:3] = [5.0, -5.0, 0.999][: min(3, d)]  # exercise clipping
    result = run_round(config=config, updates=updates, seed=seed)
    assert result.survivors == tuple(sorted(updates)) and result.dropped == ()
    expected = clipped_sum(updates, updates, 1.0)
    err = np.abs(result.total - expected).max()
    assert err <= result.error_bound == config.quantization.sum_error_bound(n)
    # The integer sum is exact: it equals the sum of the quantized updates modulo 2^k.
    q = sum(quantize(values=updates[u], spec=config.quantization).astype(object) for u in updates)
    assert [int(v) for v in result.integer_total] == [int(v) % 2**bits for v in q]


def test_sum_of_many_clients_at_the_clip_boundary_does_not_wrap() -> None:
    config, updates = make(6, 50, threshold=4, bits=16, seed=9)
    config = replace(config, quantization=QuantizationSpec(clip=1.0, modulus_bits=16, max_summands=6))
    updates = {u: np.full(50, 10.0 if i % 2 else -10.0) for i, u in enumerate(updates)}
    updates[min(updates)] = np.full(50, 1.0)
    result = run_round(config=config, updates=updates)
    assert np.abs(result.total - clipped_sum(updates, updates, 1.0)).max() <= result.error_bound


# ------------------------------------------------------------------------------------------- dropouts
@pytest.mark.parametrize("stage", ["share", "masked", "unmask", "mixed"])
@pytest.mark.parametrize("degree", [None, 4])
def test_round_completes_with_up_to_the_tolerated_dropouts(stage: str, degree: int | None) -> None:
    n = 9
    threshold = 5 if degree is None else 3  # complete: 9 holders -> 4 dropouts; degree 4: 5 holders -> 2
    config, updates = make(n, 64, threshold=threshold, degree=degree, seed=11)
    ids = sorted(updates)
    if degree is None:
        drops = set(ids[:4])
    else:  # two clients that are not neighbours of a common third one beyond tolerance: adjacent on the ring
        graph = neighbour_graph(participants=ids, degree=degree, seed=config.graph_seed)
        a = ids[0]
        drops = {a, sorted(graph[a])[0]}
    kw = {"share": {"drop_before_share": drops}, "masked": {"drop_before_masked": drops},
          "unmask": {"drop_before_unmask": drops}}.get(stage)
    if kw is None:
        first, *rest = sorted(drops)
        kw = {"drop_before_share": {first}, "drop_before_masked": set(rest[:1]), "drop_before_unmask": set(rest[1:])}
    result = run_round(config=config, updates=updates, **kw)
    # Dropping before the unmask stage still counts the client's update: its masked input reached the server.
    contributed = set(ids) - set(kw.get("drop_before_share", ())) - set(kw.get("drop_before_masked", ()))
    assert set(result.survivors) == contributed
    assert np.abs(result.total - clipped_sum(updates, contributed, 1.0)).max() <= result.error_bound


@pytest.mark.parametrize("stage", ["drop_before_share", "drop_before_masked", "drop_before_unmask"])
def test_too_many_dropouts_abort_cleanly(stage: str) -> None:
    config, updates = make(7, 16, threshold=4, seed=12)
    drops = set(sorted(updates)[:4])  # 3 left < threshold 4
    with pytest.raises(InsufficientSurvivorsError, match="aborted") as exc:
        run_round(config=config, updates=updates, **{stage: drops})
    assert isinstance(exc.value, SecAggError) and isinstance(exc.value, FedpropError)
    assert "threshold 4" in str(exc.value)


def test_secaggplus_local_neighbourhood_failure_is_detected() -> None:
    # Degree 4 (5 holders), threshold 3: losing 3 holders of one client is too many for that client even
    # though 9 of 12 clients remain.
    config, updates = make(12, 16, threshold=3, degree=4, seed=13)
    ids = sorted(updates)
    graph = neighbour_graph(participants=ids, degree=4, seed=config.graph_seed)
    victim = ids[0]
    drops = set(sorted(graph[victim])[:3])
    # Dropping before sharing: the victim's holders in U2 are too few, so the server excludes it up front and
    # the round completes without it.
    result = run_round(config=config, updates=updates, drop_before_share=drops)
    assert victim not in result.survivors and set(result.survivors).isdisjoint(drops)
    assert np.abs(result.total - clipped_sum(updates, result.survivors, 1.0)).max() <= result.error_bound
    # Dropping after the masked input: the victim's self-mask cannot be recovered -> clean abort.
    with pytest.raises(InsufficientSurvivorsError, match=f"surviving client {victim}"):
        run_round(config=config, updates=updates, drop_before_unmask=drops)


# ---------------------------------------------------------------------------- what the server observes
def test_masked_inputs_are_uniform_and_never_equal_the_update() -> None:
    d, bits = 20_000, 32
    config, updates = make(4, d, threshold=3, bits=bits, seed=21)
    u0 = min(updates)
    updates[u0] = np.zeros(d)  # a maximally structured update: every quantized coordinate is identical
    transcript = Transcript()
    result = run_round(config=config, updates=updates, seed=21, transcript=transcript)
    assert np.abs(result.total - clipped_sum(updates, updates, 1.0)).max() <= result.error_bound
    for u, y in transcript.masked.items():
        xq = quantize(values=updates[u], spec=config.quantization)
        assert not np.any(y == xq), "a masked coordinate equals the plain quantized update"
        top = (y >> np.uint64(bits - 8)).astype(np.int64)
        assert stats.chisquare(np.bincount(top, minlength=256)).pvalue > 1e-3
        assert stats.kstest(y.astype(np.float64) / 2.0**bits, "uniform").pvalue > 1e-3
    # The quantized plain update is far from uniform, so the test above has power.
    top0 = (quantize(values=updates[u0], spec=config.quantization) >> np.uint64(bits - 8)).astype(np.int64)
    assert stats.chisquare(np.bincount(top0, minlength=256)).pvalue < 1e-12
    # A partial sum of masked inputs (pair masks between them cancel) is still hidden by self masks.
    a, b = sorted(transcript.masked)[:2]
    pair = (transcript.masked[a] + transcript.masked[b]) & np.uint64(2**bits - 1)
    assert stats.kstest(pair.astype(np.float64) / 2.0**bits, "uniform").pvalue > 1e-3


@pytest.mark.parametrize("drop_stage", ["drop_before_masked", "drop_before_unmask"])
def test_server_never_receives_both_share_kinds_for_one_client(drop_stage: str) -> None:
    config, updates = make(7, 8, threshold=4, seed=22)
    drops = set(sorted(updates)[:2])
    transcript = Transcript()
    run_round(config=config, updates=updates, transcript=transcript, **{drop_stage: drops})
    b_owners = {v for r in transcript.responses.values() for v in r.b_shares}
    s_owners = {v for r in transcript.responses.values() for v in r.s_shares}
    assert b_owners.isdisjoint(s_owners)
    assert s_owners == (drops if drop_stage == "drop_before_masked" else set())


def test_client_refuses_unsafe_or_repeated_unmask_requests() -> None:
    config, updates = make(4, 8, threshold=3, seed=23)
    ent = seeded_entropy(23)
    cs, adverts = {}, {}
    for u in updates:
        cs[u], adverts[u] = client_advertise(config=config, node_id=u, entropy=ent)
    server, bcs = server_collect_keys(config=config, adverts=adverts)
    shares = {}
    for u in updates:
        cs[u], shares[u] = client_share_keys(state=cs[u], broadcast=bcs[u], entropy=ent)
    server, routed = server_route_shares(state=server, shares=shares)
    for u in updates:
        cs[u], _ = client_masked_input(state=cs[u], ciphertexts=routed[u], update=updates[u])
    u, v = sorted(updates)[:2]
    everyone = frozenset(updates)
    with pytest.raises(SecAggError, match="both survived and dropped"):
        client_unmask(state=cs[u], request=UnmaskRequest(survivors=everyone, dropped=frozenset({v})))
    with pytest.raises(SecAggError, match="does not say"):
        client_unmask(state=cs[u], request=UnmaskRequest(survivors=everyone - {v}, dropped=frozenset()))
    with pytest.raises(InsufficientSurvivorsError):
        client_unmask(state=cs[u], request=UnmaskRequest(survivors=frozenset({u, v}), dropped=everyone - {u, v}))
    done, _ = client_unmask(state=cs[u], request=UnmaskRequest(survivors=everyone, dropped=frozenset()))
    # A second request (e.g. now claiming v dropped, to obtain its s share too) is refused.
    with pytest.raises(SecAggError, match="stage 'done'"):
        client_unmask(state=done, request=UnmaskRequest(survivors=everyone - {v}, dropped=frozenset({v})))
    assert done.held_shares == {} and done.b_seed == b""


def test_tampered_or_misrouted_share_is_rejected_by_the_recipient() -> None:
    config, updates = make(5, 8, threshold=3, seed=24)
    cs, adverts = {}, {}
    for u in updates:
        cs[u], adverts[u] = client_advertise(config=config, node_id=u)
    server, bcs = server_collect_keys(config=config, adverts=adverts)
    shares = {}
    for u in updates:
        cs[u], shares[u] = client_share_keys(state=cs[u], broadcast=bcs[u])
    server, routed = server_route_shares(state=server, shares=shares)
    u, v, w = sorted(updates)[:3]
    bad = dict(routed[u])
    ct = bytearray(bad[v])
    ct[30] ^= 0x80
    bad[v] = bytes(ct)
    # The recipient does not fail: it leaves the sender out of its masks and reports it as rejected.
    state, _ = client_masked_input(state=cs[u], ciphertexts=bad, update=updates[u])
    assert state.rejected == (v,) and v not in state.mask_partners and v not in state.held_shares
    swapped = dict(routed[u])
    swapped[v], swapped[w] = routed[u][w], routed[u][v]  # server swaps senders
    state, _ = client_masked_input(state=cs[u], ciphertexts=swapped, update=updates[u])
    assert set(state.rejected) == {v, w}


def test_client_rejects_inconsistent_key_broadcast_and_out_of_order_stages() -> None:
    config, updates = make(4, 8, threshold=3, seed=25)
    cs, adverts = {}, {}
    for u in updates:
        cs[u], adverts[u] = client_advertise(config=config, node_id=u)
    _, bcs = server_collect_keys(config=config, adverts=adverts)
    u, v = sorted(updates)[:2]
    forged = dict(bcs[u].keys)
    forged[v] = adverts[u]  # server substitutes keys
    with pytest.raises(SecAggError, match="distinct"):
        client_share_keys(state=cs[u], broadcast=KeyBroadcast(participants=bcs[u].participants, keys=forged))
    missing = {k: x for k, x in bcs[u].keys.items() if k != v}
    with pytest.raises(SecAggError, match="inconsistent"):
        client_share_keys(state=cs[u], broadcast=KeyBroadcast(participants=bcs[u].participants, keys=missing))
    with pytest.raises(SecAggError, match="stage 'advertised'"):
        client_masked_input(state=cs[u], ciphertexts={}, update=updates[u])


def test_parameter_validation() -> None:
    config, updates = make(6, 8, threshold=3, seed=26)  # 6 holders: threshold 3 is not a majority
    adverts = {u: client_advertise(config=config, node_id=u)[1] for u in updates}
    with pytest.raises(SecAggError, match="exceed half"):
        server_collect_keys(config=config, adverts=adverts)
    small = replace(config, threshold=4, quantization=QuantizationSpec(clip=1.0, max_summands=5))
    with pytest.raises(SecAggError, match="max_summands"):
        server_collect_keys(config=small, adverts=adverts)
    with pytest.raises(SecAggError) as exc:
        SecAggConfig(round_id=b"x", threshold=1, vector_length=0, degree=3,
                     quantization=QuantizationSpec(clip=1.0))
    for part in ("round_id", "threshold", "vector_length", "degree"):
        assert part in str(exc.value)


def test_neighbour_graph_is_regular_symmetric_and_seeded() -> None:
    ids = list(range(100, 120))
    g = neighbour_graph(participants=ids, degree=6, seed=b"a")
    assert all(len(vs) == 6 and u not in vs for u, vs in g.items())
    assert all(u in g[v] for u, vs in g.items() for v in vs)
    assert g == neighbour_graph(participants=list(reversed(ids)), degree=6, seed=b"a")
    assert g != neighbour_graph(participants=ids, degree=6, seed=b"b")
    full = neighbour_graph(participants=ids, degree=None, seed=b"a")
    assert all(len(vs) == 19 for vs in full.values())


def test_client_state_round_trips_and_hides_private_keys() -> None:
    config, updates = make(3, 4, threshold=2, seed=27)
    state, _ = client_advertise(config=config, node_id=min(updates))
    assert ClientState.from_bytes(state.to_bytes()) == state
    assert state.s_private.hex() not in repr(state) and state.c_private.hex() not in repr(state)
