"""The only thing partners reach: a TLS reverse proxy that forwards Flower's Fleet API and nothing else.

Flower 1.41 serves the Fleet API (what SuperNodes call), the Control API (``flwr run/ls/stop``, node
registration; no user authentication without the enterprise OIDC plugin) and the ServerApp runtime API on
one ``--host/--port`` and cannot put them on different interfaces. fedprop therefore binds the SuperLink to
loopback and puts this proxy on the partner-facing address:

- it terminates TLS with the federation's server certificate and forwards to the loopback SuperLink over TLS
  (verifying it against the federation CA);
- it forwards exactly the twelve ``POST /v1/fleet/<name>`` routes of flwr 1.41
  (flwr/superlink/routers/fleet/router.py, flwr/supernode/fleet_http_client.py) except ``register-node``
  (self-registration; the SuperLink refuses it with node auth on, we refuse it before). The match is on the
  raw request target, byte for byte: no decoding, no normalisation, no query string, so ``..``, ``%2e``,
  ``//`` or case tricks cannot reach ``/v1/control`` or ``/v1/runtime``; anything else gets 404;
- it adds the coordinator's app signature to ``get-fab`` replies: ``fedprop server submit`` writes the
  Flower verification record of the exact FAB it submitted to ``SIGNATURES_DIR/<sha256>.json``; the proxy
  adds it to the FAB's ``verifications`` (after checking that the FAB's bytes hash to that name) so that
  SuperNodes started with ``--trusted-entities`` can check it. Flower's SuperLink keeps verifications only
  for Flower Hub apps; the proxy cannot forge one (it holds no signing key), a node verifies it itself.

Run: ``python -m server.fleet_proxy --listen HOST:PORT --upstream 127.0.0.1:PORT --certs DIR
--signatures DIR`` (``fedprop server start`` does this for you).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

FLEET_ROUTES = (
    "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat", "pull-messages",
    "push-messages", "get-run", "get-fab", "push-object", "pull-object", "confirm-message-received",
)
FLEET_PATHS = frozenset(f"/v1/fleet/{name}" for name in FLEET_ROUTES)
GET_FAB = "/v1/fleet/get-fab"
_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"host", b"content-length", b"content-encoding", b"accept-encoding",
})
_HASH = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_MAX_BODY = 512 * 1024 * 1024


def _log(text: str) -> None:
    print(f"fleet-proxy: {text}", file=sys.stderr, flush=True)


def add_fab_signature(body: bytes, signatures_dir: Path) -> bytes:
    """Return ``body`` (a serialised GetFabResponse) with the coordinator's signature record added, if any."""
    from flwr.proto.fab_pb2 import GetFabResponse  # pylint: disable=E0611

    response = GetFabResponse()
    response.ParseFromString(body)
    digest = hashlib.sha256(response.fab.content).hexdigest()
    record_path = signatures_dir / f"{digest}.json"
    if not record_path.is_file():
        _log(f"get-fab: no coordinator signature for FAB {digest[:12]}; nodes that pin a key will refuse it")
        return body
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        verifications = record["verifications"]
        if record["fab_sha256"] != digest or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in verifications.items()
        ):
            raise ValueError("record does not match the FAB")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        _log(f"get-fab: unusable signature record {record_path.name} ({type(err).__name__}); passing FAB unsigned")
        return body
    response.fab.verifications.update(verifications)
    response.fab.verifications["valid_license"] = "Valid"  # Flower's flag "this SuperLink supports verification"
    return response.SerializeToString()


class FleetProxy:
    """ASGI app: allow-listed Fleet routes to ``upstream`` (https://127.0.0.1:PORT), 404 for anything else."""

    def __init__(self, upstream: str, ca_file: str | Path, signatures_dir: str | Path, *,
                 max_body: int = DEFAULT_MAX_BODY, timeout: float = 300.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.ca_file = str(ca_file)
        self.signatures_dir = Path(signatures_dir)
        self.max_body = max_body
        self.timeout = timeout
        self._client = None

    async def _http_client(self):
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(verify=self.ca_file, timeout=self.timeout, trust_env=False)
        return self._client

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self._client is not None:
                        await self._client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return  # websockets etc.: never accepted
        target = scope.get("raw_path") or b""
        path = target.decode("latin-1")
        client = (scope.get("client") or ("?", 0))[0]
        if scope["method"] != "POST" or path not in FLEET_PATHS or scope.get("query_string"):
            _log(f"refused {scope['method']} {path[:120]!r} from {client}: not a Fleet API route")
            await _respond(send, 404, b"not found: this endpoint serves only the Flower Fleet API\n")
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:
                _log(f"refused {path} from {client}: request body over {self.max_body} bytes")
                await _respond(send, 413, b"request body too large\n")
                return
            if not message.get("more_body", False):
                break
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                   if k.lower() not in _HOP_BY_HOP]
        headers.append(("accept-encoding", "identity"))
        import httpx

        try:
            http = await self._http_client()
            resp = await http.post(self.upstream + path, content=bytes(body), headers=headers)
        except httpx.HTTPError as err:
            _log(f"upstream SuperLink unreachable for {path}: {type(err).__name__}")
            await _respond(send, 502, b"upstream SuperLink unavailable\n")
            return
        content = resp.content
        if path == GET_FAB and resp.status_code == 200:
            try:
                content = add_fab_signature(content, self.signatures_dir)
            except Exception as err:  # noqa: BLE001 - a reply we cannot parse passes unchanged (the node decides)
                _log(f"get-fab reply not parsed ({type(err).__name__}); passed unchanged")
        out_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.items()
                       if k.lower().encode("latin-1") not in _HOP_BY_HOP]
        out_headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": resp.status_code, "headers": out_headers})
        await send({"type": "http.response.body", "body": content})


async def _respond(send, status: int, text: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(text)).encode())]})
    await send({"type": "http.response.body", "body": text})


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.fleet_proxy", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", type=_host_port, required=True, help="partner-facing HOST:PORT")
    parser.add_argument("--upstream", type=_host_port, required=True, help="loopback SuperLink HOST:PORT")
    parser.add_argument("--certs", required=True, help="directory with ca.crt, server.pem, server.key")
    parser.add_argument("--signatures", required=True, help="directory of FAB signature records")
    parser.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY, help="largest request body (bytes)")
    args = parser.parse_args(argv)
    import uvicorn

    from federation.pki import CA_CERT, SERVER_CERT, SERVER_KEY

    certs = Path(args.certs)
    for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
        if not (certs / name).is_file():
            print(f"fleet-proxy: {certs / name} not found (run `fedprop certs init`)", file=sys.stderr)
            return 2
    up_host, up_port = args.upstream
    app = FleetProxy(f"https://{up_host}:{up_port}", certs / CA_CERT, args.signatures, max_body=args.max_body)
    host, port = args.listen
    _log(f"forwarding Fleet API {host}:{port} -> {up_host}:{up_port} (Control and runtime APIs: 404)")
    uvicorn.run(app, host=host, port=port, ssl_certfile=str(certs / SERVER_CERT),
                ssl_keyfile=str(certs / SERVER_KEY), http="h11", lifespan="on", log_level="warning",
                proxy_headers=False, server_header=False, date_header=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
