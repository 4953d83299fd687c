"""The Fleet proxy in-process (fast): what it forwards, what it refuses, the app signature it adds to get-fab.

The same proxy is exercised over real TLS in tests/deploy/test_loopback.py; here the upstream SuperLink is an
httpx MockTransport that records every request it receives, so "refused" also means "never forwarded"."""
from __future__ import annotations

import asyncio
import hashlib
import json

import httpx
import pytest
from flwr.proto.fab_pb2 import GetFabResponse  # pylint: disable=E0611
from flwr.supercore.fab import Fab
from flwr.supernode.start_client_internal import _verify_fab

from federation.signing import generate_keypair, trusted_entities_yaml
from server import deploy
from server.fleet_proxy import FLEET_PATHS, FleetProxy

FAB = b"PK\x03\x04 a pretend app package"


def _proxy(tmp_path, fab=FAB, max_body=1 << 20):
    seen = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, request.content, dict(request.headers)))
        if request.url.path == "/v1/fleet/get-fab":
            reply = GetFabResponse()
            reply.fab.hash_str = hashlib.sha256(fab).hexdigest()
            reply.fab.content = fab
            return httpx.Response(200, content=reply.SerializeToString(),
                                  headers={"content-type": "application/protobuf"})
        return httpx.Response(200, content=b"upstream:" + request.url.path.encode())

    proxy = FleetProxy("https://127.0.0.1:1", ca_file="unused", signatures_dir=tmp_path / "sigs", max_body=max_body)
    proxy._client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
    return proxy, seen


def _call(proxy, method, path, body=b"", headers=None):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=proxy), base_url="https://fleet") as c:
            return await c.request(method, path, content=body, headers=headers or {})

    return asyncio.run(go())


def test_fleet_routes_are_forwarded_with_their_auth_headers(tmp_path):
    proxy, seen = _proxy(tmp_path)
    headers = {"flwr-public-key": "cGs=", "flwr-signature": "c2ln", "flwr-timestamp": "t"}
    for path in sorted(FLEET_PATHS - {"/v1/fleet/get-fab"}):
        reply = _call(proxy, "POST", path, b"\x08\x01", headers)
        assert reply.status_code == 200 and reply.content == b"upstream:" + path.encode()
    assert [s[1] for s in seen] == sorted(FLEET_PATHS - {"/v1/fleet/get-fab"})
    assert all(s[2] == b"\x08\x01" and s[3]["flwr-signature"] == "c2ln" for s in seen)  # node auth passes through


@pytest.mark.parametrize("method,path", [
    ("POST", "/v1/control/list-runs"), ("POST", "/v1/control/register-node"), ("POST", "/v1/runtime/acquire-task"),
    ("POST", "/v1/fleet/register-node"), ("GET", "/v1/fleet/pull-messages"), ("POST", "/v1/fleet/get-run?x=1"),
    ("POST", "/v1/fleet/%2e%2e/control/list-runs"), ("POST", "/docs"), ("DELETE", "/v1/fleet/get-run"),
])
def test_everything_else_is_404_and_never_forwarded(tmp_path, method, path):
    proxy, seen = _proxy(tmp_path)
    reply = _call(proxy, method, path)
    assert reply.status_code == 404 and seen == []


def test_oversized_body_is_refused_before_forwarding(tmp_path):
    proxy, seen = _proxy(tmp_path, max_body=1000)
    assert _call(proxy, "POST", "/v1/fleet/push-object", b"x" * 5000).status_code == 413 and seen == []


def _fab_from(reply: httpx.Response) -> Fab:
    msg = GetFabResponse()
    msg.ParseFromString(reply.content)
    return Fab(msg.fab.hash_str, msg.fab.content, dict(msg.fab.verifications))


def test_get_fab_carries_the_coordinators_signature_that_a_pinned_node_accepts(tmp_path):
    generate_keypair(tmp_path / "app.key", tmp_path / "app.pub")
    generate_keypair(tmp_path / "evil.key", tmp_path / "evil.pub")
    import yaml

    pinned = yaml.safe_load(trusted_entities_yaml(tmp_path / "app.pub"))
    proxy, _ = _proxy(tmp_path)
    unsigned = _fab_from(_call(proxy, "POST", "/v1/fleet/get-fab"))
    assert unsigned.verifications == {} and not _verify_fab(unsigned, pinned)  # nothing to add: node refuses
    deploy.write_fab_signature(FAB, tmp_path / "evil.key", tmp_path / "sigs")
    evil = _fab_from(_call(proxy, "POST", "/v1/fleet/get-fab"))
    assert evil.verifications["valid_license"] == "Valid" and not _verify_fab(evil, pinned)
    deploy.write_fab_signature(FAB, tmp_path / "app.key", tmp_path / "sigs")  # replaces the record
    good = _fab_from(_call(proxy, "POST", "/v1/fleet/get-fab"))
    assert good.content == FAB and _verify_fab(good, pinned)
    # the same signature does not carry over to other bytes (Flower checks sha256 of the content)
    assert not _verify_fab(Fab(good.hash_str, FAB + b" tampered", good.verifications), pinned)


def test_a_record_that_does_not_match_the_fab_is_not_added(tmp_path):
    generate_keypair(tmp_path / "app.key", tmp_path / "app.pub")
    path = deploy.write_fab_signature(FAB, tmp_path / "app.key", tmp_path / "sigs")
    record = json.loads(path.read_text())
    record["fab_sha256"] = "0" * 64
    path.write_text(json.dumps(record))
    proxy, _ = _proxy(tmp_path)
    assert _fab_from(_call(proxy, "POST", "/v1/fleet/get-fab")).verifications == {}
