"""The adversaries of docs/secure-aggregation.md, played in-process against the protocol and the driver:
SecAgg+ thresholds at scale, a hostile partner that lies consistently, a coordinator that swaps keys, splits
the survivor graph or hands out different configs."""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import replace

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Message, RecordDict

from federation.config import from_dict
from federation.errors import ConfigError
from federation.secagg.flower import RECORD_KEY, secure_sum
from federation.secagg.identity import load_identity
from federation.secagg.primitives import (
    AggregateRejectedError,
    InsufficientSurvivorsError,
    QuantizationSpec,
    SecAggError,
    generate_keypair,
)
from federation.secagg.protocol import (
    AdvertisedKeys,
    KeyBroadcast,
    SecAggConfig,
    UnmaskRequest,
    client_advertise,
    client_masked_input,
    client_share_keys,
    client_unmask,
    commitment_of,
    keys_from_json,
    keys_to_json,
    neighbour_graph,
    server_collect_keys,
    server_collect_masked,
    server_route_shares,
    server_unmask,
    threshold_from_neighbourhood,
)
from federation.secure_fedavg import aggregate_step, plan_round

from .test_flower import D, SPEC, InProcessGrid, expected, make_app
from .test_protocol import clipped_sum, make, run_round


def ring(config: SecAggConfig, ids) -> list[int]:
    return sorted(ids, key=lambda u: hmac.new(config.graph_seed, str(u).encode(), hashlib.sha256).digest())


# ------------------------------------------------------------------------------- SecAgg+ thresholds
@pytest.mark.parametrize("n,degree,threshold", [(10, 4, 3), (20, 6, 5), (50, 10, 7)])
@pytest.mark.parametrize("stage", ["drop_before_masked", "drop_before_unmask"])
def test_secaggplus_from_the_run_config_completes_with_the_tolerated_dropouts(n, degree, threshold, stage):
    cfg = from_dict({"partners": n, "secagg": {"enabled": True, "degree": degree, "rounding": "nearest"}})
    plan = plan_round(cfg, num_params=15, participants=n)
    assert (plan.threshold, plan.degree) == (threshold, degree)  # ceil(0.6 * (degree + 1)), not ceil(0.6 n)
    config, updates = make(n, 16, threshold=plan.threshold, degree=plan.degree, seed=n)
    config = replace(config, quantization=plan.quantization)
    tolerated = degree + 1 - threshold
    drops = set(ring(config, updates)[:tolerated])  # adjacent on the ring: all in one neighbourhood
    result = run_round(config=config, updates=updates, **{stage: drops})
    contributed = set(updates) - (drops if stage == "drop_before_masked" else set())
    assert set(result.survivors) == contributed
    assert np.abs(result.total - clipped_sum(updates, contributed, plan.quantization.clip)).max() <= result.error_bound
    # One more dropout in that neighbourhood is too many: a clean abort, nothing released.
    with pytest.raises(InsufficientSurvivorsError, match="aborted"):
        run_round(config=config, updates=updates, **{stage: set(ring(config, updates)[:tolerated + 1])})


def test_threshold_is_checked_at_config_time_naming_the_keys():
    with pytest.raises(SecAggError, match=r"secagg\.threshold_fraction=0\.4.*secagg\.degree"):
        threshold_from_neighbourhood(holders=5, fraction=0.4)
    with pytest.raises(ConfigError, match=r"secagg\.threshold_fraction"):
        from_dict({"partners": 10, "secagg": {"enabled": True, "degree": 4, "threshold_fraction": 0.5}})
    assert from_dict({"partners": 50, "secagg": {"enabled": True, "degree": 10}}).secagg.degree == 10


# --------------------------------------------------------------------------- consistent hostile clients
def stages_by_hand(config, updates, *, advert_edit=None, masked_edit=None, routed_edit=None):
    cs, adverts = {}, {}
    for u in sorted(updates):
        cs[u], adverts[u] = client_advertise(config=config, node_id=u)
    if advert_edit:
        advert_edit(cs, adverts)
    server, bcs = server_collect_keys(config=config, adverts=adverts)
    shares = {}
    for u in bcs:
        cs[u], shares[u] = client_share_keys(state=cs[u], broadcast=bcs[u])
    server, routed = server_route_shares(state=server, shares=shares)
    if routed_edit:
        routed_edit(routed)
    masked = {}
    for u in routed:
        cs[u], masked[u] = client_masked_input(state=cs[u], ciphertexts=routed[u], update=updates[u])
    if masked_edit:
        masked_edit(masked)
    server, reqs = server_collect_masked(state=server, masked=masked, rejected={u: cs[u].rejected for u in masked})
    responses = {}
    for u, r in reqs.items():
        cs[u], responses[u] = client_unmask(state=cs[u], request=r)
    return server_unmask(state=server, responses=responses)


def test_a_client_masking_with_a_seed_other_than_its_commitment_is_caught():
    config, updates = make(5, 32, threshold=3, seed=40)
    liar = max(updates)

    def lie(cs, adverts):  # it shares (and commits to) one seed but masks with another
        cs[liar] = replace(cs[liar], b_seed=b"\x07" * 32)
    with pytest.raises(SecAggError, match="echoed a different advert"):  # an honest app notices; a liar continues:
        stages_by_hand(config, updates, advert_edit=lie)

    def commit_wrong(cs, adverts):
        adverts[liar] = replace(adverts[liar], commitment=commitment_of(config=config, node_id=liar, b_seed=b"\x01" * 32))
        cs[liar] = replace(cs[liar], b_seed=b"\x01" * 32)  # shares this seed ...

    def remask(masked):  # ... but its masked input used a different one: the sum is garbage -> rejected
        masked[liar] = (masked[liar] + np.uint64(1 << 30)) & np.uint64(2**32 - 1)
    with pytest.raises(AggregateRejectedError):
        stages_by_hand(config, updates, advert_edit=commit_wrong, masked_edit=remask)


def test_a_rejected_ciphertext_turns_its_sender_into_a_dropout():
    config, updates = make(6, 16, threshold=4, seed=41)
    a, b = sorted(updates)[:2]

    def corrupt(routed):  # b received garbage from a (a hostile a, or a b lying consistently)
        ct = bytearray(routed[b][a])
        ct[40] ^= 1
        routed[b][a] = bytes(ct)
    result = stages_by_hand(config, updates, routed_edit=corrupt)
    assert a not in result.survivors and result.excluded[a] == "shares-rejected-by-neighbour"
    assert np.abs(result.total - clipped_sum(updates, set(updates) - {a}, 1.0)).max() <= result.error_bound


# ------------------------------------------------------------------------------ hostile coordinator
def identities(n):
    keys = [Ed25519PrivateKey.generate() for _ in range(n)]
    pinned = {k.public_key().public_bytes_raw(): f"p{i}" for i, k in enumerate(keys)}
    return [k.private_bytes_raw() for k in keys], pinned


def signed_round(n=4, seed=42):
    config, updates = make(n, 8, threshold=3, seed=seed)
    privs, pinned = identities(n)
    cs, adverts = {}, {}
    for u, priv in zip(sorted(updates), privs):
        cs[u], adverts[u] = client_advertise(config=config, node_id=u, identity_key=priv)
    _, bcs = server_collect_keys(config=config, adverts=adverts)
    return config, updates, cs, adverts, bcs, pinned


def test_pinned_peers_catch_a_coordinator_that_swaps_keys():
    config, updates, cs, adverts, bcs, pinned = signed_round()
    u, victim = sorted(updates)[:2]
    own = generate_keypair(), generate_keypair()  # the coordinator's own keys, to decrypt the victim's shares
    swapped = replace(adverts[victim], c_public=own[0].public, s_public=own[1].public)
    forged = KeyBroadcast(participants=bcs[u].participants, keys={**bcs[u].keys, victim: swapped})
    with pytest.raises(SecAggError, match="pinned partner keys"):
        client_share_keys(state=cs[u], broadcast=forged, pinned=pinned)
    # Re-signed with an identity the coordinator owns: not pinned either.
    rogue = Ed25519PrivateKey.generate().private_bytes_raw()
    _, resigned = client_advertise(config=config, node_id=victim, identity_key=rogue)
    forged = KeyBroadcast(participants=bcs[u].participants, keys={**bcs[u].keys, victim: resigned})
    with pytest.raises(SecAggError, match="pinned partner keys"):
        client_share_keys(state=cs[u], broadcast=forged, pinned=pinned)
    # Without pinning the same swap goes unnoticed (what docs/secure-aggregation.md says it cannot exclude).
    state, out = client_share_keys(state=cs[u], broadcast=forged)
    assert victim in out
    # The honest broadcast passes with pinning.
    client_share_keys(state=cs[u], broadcast=bcs[u], pinned=pinned)


def test_signed_adverts_bind_the_round_and_the_config():
    config, updates, cs, adverts, bcs, pinned = signed_round(seed=43)
    u, victim = sorted(updates)[:2]
    # A replay of the victim's genuine, pinned advert from an earlier round fails its signature.
    old_config = replace(config, round_id=b"\x00" * 16)
    _, old = client_advertise(config=old_config, node_id=victim, identity_key=None)
    replayed = replace(old, identity=adverts[victim].identity, signature=adverts[victim].signature)
    forged = KeyBroadcast(participants=bcs[u].participants, keys={**bcs[u].keys, victim: replayed})
    with pytest.raises(SecAggError, match="pinned partner keys"):
        client_share_keys(state=cs[u], broadcast=forged, pinned=pinned)
    # A coordinator that hands u a different config (here a tiny clip) breaks every neighbour's signature.
    cheap = replace(config, quantization=QuantizationSpec(clip=1e-6, max_summands=8))
    state = replace(cs[u], config=cheap)
    with pytest.raises(SecAggError, match="pinned partner keys"):
        client_share_keys(state=state, broadcast=bcs[u], pinned=pinned)


def test_clients_refuse_a_disconnected_survivor_graph():
    # 12 clients, degree 2 (3 holders, threshold 2): dropping two opposite ring nodes splits the survivors in two
    config, updates = make(12, 8, threshold=2, degree=2, seed=44)
    order = ring(config, updates)
    drops = {order[0], order[6]}
    with pytest.raises(SecAggError, match="disconnected"):
        run_round(config=config, updates=updates, drop_before_masked=drops)
    # The refusal itself, for a coordinator that asks anyway:
    cs, adverts = {}, {}
    for u in updates:
        cs[u], adverts[u] = client_advertise(config=config, node_id=u)
    server, bcs = server_collect_keys(config=config, adverts=adverts)
    shares = {}
    for u in updates:
        cs[u], shares[u] = client_share_keys(state=cs[u], broadcast=bcs[u])
    _, routed = server_route_shares(state=server, shares=shares)
    for u in updates:
        cs[u], _ = client_masked_input(state=cs[u], ciphertexts=routed[u], update=updates[u])
    half = frozenset(order[1:6])
    u = order[1]
    with pytest.raises(SecAggError, match="disconnected"):
        client_unmask(state=cs[u], request=UnmaskRequest(survivors=frozenset(updates) - drops, dropped=frozenset(drops)))
    # Claiming only u's half survived (to learn that partial sum) names a neighbour u masked with as neither.
    graph = neighbour_graph(participants=sorted(updates), degree=2, seed=config.graph_seed)
    assert graph[u] <= half | drops
    with pytest.raises(SecAggError, match="does not say|disconnected|never added"):
        client_unmask(state=cs[order[5]], request=UnmaskRequest(survivors=half, dropped=frozenset()))


def write_identities(tmp_path, n):
    privs, lines = [], []
    for i in range(n):
        k = Ed25519PrivateKey.generate()
        path = tmp_path / f"p{i}-secagg"
        path.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                         serialization.NoEncryption()))
        privs.append(str(path))
        pub = k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        lines.append(pub.decode() + f" p{i}")
    peers = tmp_path / "peers.pub"
    peers.write_text("# pinned at onboarding\n" + "\n".join(lines) + "\n")
    return privs, str(peers)


class SwappingGrid(InProcessGrid):
    """A coordinator that replaces the victim's keys (with its own) in every share_keys broadcast."""

    def __init__(self, *a, victim_pid: int, **kw):
        super().__init__(*a, **kw)
        self.victim = next(u for u, c in self.contexts.items() if c.node_config["partition-id"] == victim_pid)
        self.errors: list[str] = []

    def send_and_receive(self, messages, *, timeout=None):
        import json

        msgs = []
        for m in messages:
            rec = m.content[RECORD_KEY]
            if rec["stage"] == "share_keys" and m.metadata.dst_node_id != self.victim:
                p = json.loads(bytes(rec["payload"]))
                keys = keys_from_json(p["keys"])
                if self.victim in keys:
                    mine = generate_keypair(), generate_keypair()
                    keys[self.victim] = replace(keys[self.victim], c_public=mine[0].public, s_public=mine[1].public,
                                                identity=b"", signature=b"")  # a signature would not verify
                    p["keys"] = keys_to_json(keys)
                    content = RecordDict({RECORD_KEY: ConfigRecord({"stage": "share_keys",
                                                                    "payload": json.dumps(p).encode()})})
                    m = Message(content, dst_node_id=m.metadata.dst_node_id, message_type=m.metadata.message_type,
                                group_id=m.metadata.group_id)
            msgs.append(m)
        replies = super().send_and_receive(msgs, timeout=timeout)
        self.errors += [r.error.reason for r in replies if r.has_error()]
        return replies


@pytest.mark.parametrize("pinning", [True, False])
def test_key_swap_over_messages_is_detected_only_with_pinned_peers(tmp_path, pinning):
    privs, peers = write_identities(tmp_path, 4)
    grid = SwappingGrid(make_app(), 4, victim_pid=0)
    for i, ctx in enumerate(sorted(grid.contexts.values(), key=lambda c: c.node_config["partition-id"])):
        ctx.node_config.update({"secagg-key": privs[i], **({"secagg-peers": peers} if pinning else {})})
    if pinning:
        with pytest.raises(InsufficientSurvivorsError):  # every victim's neighbour refuses: nothing is summed
            secure_sum(grid, node_ids=grid.get_node_ids(), vector_length=D, threshold=3, quantization=SPEC, timeout=5)
        assert len(grid.errors) == 3 and all("pinned partner keys" in e for e in grid.errors)
    else:
        # Unpinned: the swap is not noticed by anyone (the coordinator could now decrypt the victim's shares).
        try:
            secure_sum(grid, node_ids=grid.get_node_ids(), vector_length=D, threshold=3, quantization=SPEC, timeout=5)
        except InsufficientSurvivorsError:
            pass  # the victim cannot decrypt what the coordinator's keys encrypted: the victim drops, not an alarm
        assert not any("pinned" in e for e in grid.errors)


def test_pinned_identities_over_messages_honest_round(tmp_path):
    privs, peers = write_identities(tmp_path, 4)
    grid = InProcessGrid(make_app(), 4)
    for i, ctx in enumerate(sorted(grid.contexts.values(), key=lambda c: c.node_config["partition-id"])):
        ctx.node_config.update({"secagg-key": privs[i], "secagg-peers": peers})
    result = secure_sum(grid, node_ids=grid.get_node_ids(), vector_length=D, threshold=3, quantization=SPEC, timeout=5)
    assert len(result.survivors) == 4 and np.abs(result.total - expected(range(4))).max() <= result.error_bound


def test_identity_files_are_checked(tmp_path):
    privs, peers = write_identities(tmp_path, 3)
    assert load_identity({"secagg-key": privs[0], "secagg-peers": peers}).pinned is not None
    other, _ = write_identities(tmp_path / "x" if (tmp_path / "x").mkdir() is None else tmp_path, 1)
    with pytest.raises(SecAggError, match="does not list this node's own"):
        load_identity({"secagg-key": other[0], "secagg-peers": peers})
    with pytest.raises(SecAggError, match="secagg-key is not"):
        load_identity({"secagg-peers": peers})
    (tmp_path / "bad.pub").write_text("ssh-rsa AAAA nope\n")
    with pytest.raises(SecAggError, match="secagg-peers.*line 1"):
        load_identity({"secagg-key": privs[0], "secagg-peers": str(tmp_path / "bad.pub")})
    assert load_identity({}).pinned is None


# ----------------------------------------------------------------------------- FedAvg-level range checks
def test_weight_offset_attack_is_rejected_not_released():
    """The issue's attack: an offset in one masked vector made the summed weight 1e-6 and the step 2e6."""
    clip, n = 4.0, 3
    honest = np.array([0.5, -0.2, 1.0 * clip]) * 1.0  # [w*delta..., w*R] for w=1
    total = np.sum([honest] * n, axis=0)
    step, weight = aggregate_step(total, value_range_=clip, survivors=n, min_weight=1e-5, error_bound=1e-9)
    assert weight == pytest.approx(n) and np.allclose(step, [0.5, -0.2])
    wrecked = total.copy()
    wrecked[-1] = 1e-6 * clip
    with pytest.raises(AggregateRejectedError, match="summed weight"):
        aggregate_step(wrecked, value_range_=clip, survivors=n, min_weight=1e-5, error_bound=1e-9)
    skewed = total.copy()
    skewed[0] = 5 * n * clip  # a coordinate beyond sum(w_i) * R
    with pytest.raises(AggregateRejectedError, match="weighted range"):
        aggregate_step(skewed, value_range_=clip, survivors=n, min_weight=1e-5, error_bound=1e-9)


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity):
    """Flower's run identity for messages built in-process (tests/conftest.py)."""
