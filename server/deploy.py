"""Build and run Flower 1.41 deployment commands: coordinator (SuperLink, SuperExec, Fleet proxy), SuperNodes,
node registration, signed run submission.

Processes are Flower's own executables (``flower-superlink``, ``flower-superexec``, ``flower-supernode``,
``flwr``), resolved to absolute paths in this interpreter's ``bin/`` and started with that directory first on
PATH (Flower starts its children by bare name), plus fedprop's Fleet proxy (server/fleet_proxy.py). The exact
command lines come from :func:`coordinator_commands` / :func:`supernode_command`. Run submission is in-process
(:func:`start_run`, the Control API's ``StartRun`` that ``flwr run`` calls), so the app package the
coordinator signed (:func:`write_fab_signature`) is byte for byte the one the SuperLink stores.

Security layout: the SuperLink listens on 127.0.0.1 only (Control API, unauthenticated without OIDC; ServerApp
runtime API, guarded by the SuperExec secret in ``--isolation process``); partners reach only the proxy,
which forwards the Fleet routes; SuperNodes run only app packages signed by the key they pinned
(``--trusted-entities``).

Facts about Flower 1.41 this module relies on (verified by running it, see tests/deploy/test_loopback.py):

- The SuperLink serves Fleet, Control and Runtime APIs over HTTPS on one ``--host/--port``; TLS needs
  ``--ssl-ca-certfile --ssl-certfile --ssl-keyfile``. Its ServerApp runner (``flower-superexec``) dials the same
  address with the CA file, so the server certificate's SANs must cover ``--host`` too.
- ``--enable-supernode-auth``: only public keys registered through the Control API (``flwr supernode register``)
  may activate. An unknown key is refused with ApiError 2004 ("No SuperNode found with the given public key")
  and the SuperNode exits non-zero. The same 2004 is returned when a registered node is still marked online
  (e.g. restarted before its heartbeat expired).
- A SuperNode that does not trust the SuperLink's CA fails the TLS handshake (CERTIFICATE_VERIFY_FAILED) and
  exits non-zero after ``--max-retries``.
- The ``flwr`` CLI addresses a SuperLink only through a named connection in ``$FLWR_HOME/config.toml``
  (``[superlink.<name>] address, root-certificates``). We always point FLWR_HOME at a run directory so the
  operator's ``~/.flwr`` is never touched, and set ``FLWR_TELEMETRY_ENABLED=0`` (telemetry is on by default and
  would send usage events to telemetry.flower.ai).
- ``flwr run`` returns as soon as the run is submitted (and ``--stream`` exits 0 even when the run fails): the
  outcome comes only from ``flwr ls --run-id ID --format json`` ("finished:completed" / ":failed" / ":stopped").
- SuperNodes unpack FABs under their own ``$FLWR_HOME/apps``; the SuperLink must run with
  ``--disable-runtime-dependency-installation`` offline, so the app's dependencies must already be installed.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from federation.errors import FedpropError
from federation.pki import CA_CERT, SERVER_CERT, SERVER_KEY

_NODE_CONFIG_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_CONNECTION_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
FINISHED_COMPLETED = "finished:completed"


class DeployError(FedpropError):
    """A deployment command could not be built, started, or did not succeed."""


def venv_bin() -> Path:
    """The directory of this interpreter (a venv's ``bin/``), not resolved: a venv's python is a symlink."""
    return Path(sys.executable).parent


def flower_executable(name: str) -> str:
    """Absolute path of a Flower executable: next to this interpreter (a venv), else on PATH."""
    local = venv_bin() / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"`{name}` not found next to {sys.executable} or on PATH; install flwr==1.41.0")
    return str(Path(found).absolute())


def flower_env(flwr_home: str | Path) -> dict[str, str]:
    """Environment for every Flower process we start: private FLWR_HOME, telemetry off, and the venv's
    ``bin/`` first on PATH. Flower starts its children by bare name (the SuperLink and SuperNode start
    ``flower-superexec``, which starts ``flwr-serverapp`` / ``flwr-clientapp``), so without it they are not
    found outside an activated venv, or another installation's binaries are found instead."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    dirs = [str(venv_bin()), str(Path(flower_executable("flower-superexec")).parent)]
    rest = [d for d in env.get("PATH", "").split(os.pathsep) if d and d not in dirs]
    env["PATH"] = os.pathsep.join(dict.fromkeys([*dirs, *rest]))
    return env


def _existing_file(path: str | Path, what: str) -> str:
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise DeployError(f"{what} not found: {p}")
    return str(p)


def _check_port(port: int) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise DeployError(f"port must be an integer in 1..65535, got {port!r}")
    return port


# ---------------------------------------------------------------------------------------------- commands


def _loopback(host: str) -> str:
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return host
    except ValueError:
        pass
    raise DeployError(
        f"the SuperLink must listen on loopback (127.0.0.1), not {host!r}: Flower 1.41 serves its Control API "
        "(unauthenticated without OIDC) and the ServerApp runtime API on the same port as the Fleet API. "
        "Partners reach the Fleet API through `fedprop server start --host` (the Fleet proxy) instead"
    )


def superlink_command(
    *,
    certs_dir: str | Path,
    host: str,
    port: int,
    database: str | Path,
    superexec_secret: str | Path,
    log_file: str | Path | None = None,
) -> list[str]:
    """The ``flower-superlink`` command line: loopback only, TLS, SuperNode auth, no dependency installation,
    ``--isolation process`` with ``--superexec-auth-secret-file`` (Flower ignores the secret in its default
    subprocess isolation, leaving the runtime API's ``acquire-task`` open to any local process).

    ``certs_dir`` holds ``ca.crt``, ``server.pem``, ``server.key`` as written by ``fedprop certs init``.
    ``database`` is the SQLite state file (registered nodes and runs survive restarts).
    """
    d = Path(certs_dir)
    cmd = [
        flower_executable("flower-superlink"),
        "--ssl-ca-certfile", _existing_file(d / CA_CERT, "CA certificate"),
        "--ssl-certfile", _existing_file(d / SERVER_CERT, "SuperLink certificate"),
        "--ssl-keyfile", _existing_file(d / SERVER_KEY, "SuperLink private key"),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--isolation", "process",
        "--superexec-auth-secret-file", str(Path(superexec_secret).expanduser().resolve()),  # start_coordinator creates it
        "--database", str(Path(database).expanduser().resolve()),
        "--host", _loopback(host),
        "--port", str(_check_port(port)),
    ]
    if log_file is not None:
        cmd += ["--log-file", str(Path(log_file).expanduser().resolve())]
    return cmd


def superexec_command(*, certs_dir: str | Path, runtime_address: str, superexec_secret: str | Path) -> list[str]:
    """The ``flower-superexec`` that runs ServerApps for a ``--isolation process`` SuperLink, authenticated
    with the shared secret; no runtime dependency installation (the venv already holds the app's)."""
    host, _, port = runtime_address.rpartition(":")
    _loopback(host)
    return [
        flower_executable("flower-superexec"),
        "--runtime-api-address", f"{host}:{_check_port(int(port))}",
        "--root-certificates", _existing_file(Path(certs_dir) / CA_CERT, "CA certificate"),
        "--superexec-auth-secret-file", str(Path(superexec_secret).expanduser().resolve()),  # start_coordinator creates it
    ]


def fleet_proxy_command(
    *, certs_dir: str | Path, listen_host: str, listen_port: int, upstream_port: int, signatures_dir: str | Path
) -> list[str]:
    """The partner-facing Fleet proxy (server/fleet_proxy.py) in front of the loopback SuperLink."""
    return [
        sys.executable, "-m", "server.fleet_proxy",
        "--listen", f"{listen_host}:{_check_port(listen_port)}",
        "--upstream", f"127.0.0.1:{_check_port(upstream_port)}",
        "--certs", str(Path(certs_dir).expanduser().resolve()),
        "--signatures", str(Path(signatures_dir).expanduser().resolve()),
    ]


def format_node_config(node_config: dict[str, str | int | float | bool]) -> str:
    """Render a node config dict as Flower's ``--node-config`` string (TOML values, space separated)."""
    parts = []
    for key, value in node_config.items():
        if not isinstance(key, str) or not _NODE_CONFIG_KEY.match(key):
            raise DeployError(f"node-config key {key!r} is invalid: use letters, digits, '_', '.', '-'")
        if isinstance(value, bool):
            rendered = "true" if value else "false"
        elif isinstance(value, (int, float)):
            rendered = repr(value)
        elif isinstance(value, str):
            if '"' in value or "\\" in value or "\n" in value:
                raise DeployError(f"node-config value for {key!r} may not contain quotes, backslashes or newlines")
            rendered = f'"{value}"'
        else:
            raise DeployError(
                f"node-config value for {key!r} has type {type(value).__name__}; Flower accepts str/int/float/bool"
            )
        parts.append(f"{key}={rendered}")
    return " ".join(parts)


def write_trusted_entities(
    path: str | Path, app_public_key: str | Path, *, expected_fingerprint: str | None = None
) -> Path:
    """Write the SuperNode's ``--trusted-entities`` YAML pinning exactly the coordinator's app-signing key."""
    from federation.signing import trusted_entities_yaml

    out = Path(path).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    text = trusted_entities_yaml(app_public_key, expected_fingerprint=expected_fingerprint)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out


def supernode_command(
    *,
    superlink: str,
    ca_cert: str | Path,
    private_key: str | Path,
    port: int,
    node_config: dict[str, str | int | float | bool],
    trusted_entities: str | Path,
    host: str = "127.0.0.1",
    max_retries: int | None = None,
    max_wait_time: float | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line: TLS to ``superlink`` (host:port) trusting ``ca_cert``,
    authenticated with ``private_key``, running only apps signed by a key in ``trusted_entities``
    (:func:`write_trusted_entities`); ``port`` is the node's local Runtime API (one per node on a host)."""
    if not re.match(r"^\S+:\d+$", superlink):
        raise DeployError(f"superlink must be HOST:PORT, got {superlink!r}")
    cmd = [
        flower_executable("flower-supernode"),
        "--superlink", superlink,
        "--root-certificates", _existing_file(ca_cert, "CA certificate"),
        "--auth-supernode-private-key", _existing_file(private_key, "SuperNode private key"),
        "--trusted-entities", _existing_file(trusted_entities, "trusted-entities file"),
        "--host", _loopback(host),
        "--port", str(_check_port(port)),
    ]
    if node_config:
        cmd += ["--node-config", format_node_config(node_config)]
    if max_retries is not None:
        cmd += ["--max-retries", str(int(max_retries))]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(float(max_wait_time))]
    return cmd


# ---------------------------------------------------------------------------------------------- flwr CLI


@dataclass(frozen=True)
class CliConnection:
    """A SuperLink connection for the ``flwr`` CLI, living in its own FLWR_HOME."""

    name: str
    address: str
    root_certificates: Path
    flwr_home: Path

    def env(self) -> dict[str, str]:
        return flower_env(self.flwr_home)


def write_cli_connection(
    flwr_home: str | Path, *, address: str, root_certificates: str | Path, name: str = "fedprop"
) -> CliConnection:
    """Write ``$FLWR_HOME/config.toml`` defining one TLS connection (and making it the default)."""
    if not _CONNECTION_NAME.match(name):
        raise DeployError(f"connection name {name!r} is invalid: use letters, digits, '_', '-'")
    if not re.match(r"^\S+:\d+$", address) or '"' in address:
        raise DeployError(f"address must be HOST:PORT, got {address!r}")
    ca = Path(_existing_file(root_certificates, "CA certificate"))
    if '"' in str(ca) or "\\" in str(ca):
        raise DeployError(f"CA path {ca} contains a quote or backslash; move it")
    home = Path(flwr_home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n'
        f'[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{ca}"\n',
        encoding="utf-8",
    )
    return CliConnection(name=name, address=address, root_certificates=ca, flwr_home=home)


def _flwr(args: list[str], conn: CliConnection, *, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [flower_executable("flwr"), *args], env=conn.env(), capture_output=True, text=True,
            timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise DeployError(f"`flwr {' '.join(args[:2])}` did not return within {timeout:.0f} s") from err


def _json_out(proc: subprocess.CompletedProcess[str], what: str) -> dict:
    # With --format json Flower prints one JSON object; anything human-readable goes before it.
    text = proc.stdout
    start = text.find("{")
    try:
        data = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        data = None
    if proc.returncode != 0 or not isinstance(data, dict) or not data.get("success", False):
        detail = (data or {}).get("error-message") if isinstance(data, dict) else None
        raise DeployError(
            f"{what} failed (flwr exit code {proc.returncode}, success=false): {detail or (proc.stderr or proc.stdout).strip()[-800:]}"
        )
    return data


def register_node(public_key: str | Path, superlink: CliConnection) -> int:
    """Register a SuperNode's OpenSSH public key with the SuperLink (``flwr supernode register``).

    Returns the node id the SuperLink assigned. Raises DeployError if the key is refused (wrong type, already
    registered) or the SuperLink is unreachable.
    """
    key = _existing_file(public_key, "public key")
    proc = _flwr(["supernode", "register", key, superlink.name, "--format", "json"], superlink)
    return int(_json_out(proc, f"registering {key}")["node-id"])


def list_nodes(superlink: CliConnection) -> list[dict]:
    """``flwr supernode list --format json``: node id and status (registered/online/offline) per node."""
    proc = _flwr(["supernode", "list", superlink.name, "--format", "json"], superlink)
    return list(_json_out(proc, "listing SuperNodes")["nodes"])


@dataclass(frozen=True)
class RunResult:
    """Final state of a run, as reported by ``flwr ls --run-id``."""

    run_id: int
    status: str
    details: dict
    fedprop_run_id: str = ""  # the id partners key their ledgers by (kept by a resume; Flower's run_id is not)

    @property
    def completed(self) -> bool:
        return self.status == FINISHED_COMPLETED


def run_status(run_id: int, superlink: CliConnection) -> dict:
    proc = _flwr(["ls", superlink.name, "--run-id", str(run_id), "--format", "json"], superlink)
    runs = _json_out(proc, f"querying run {run_id}")["runs"]
    if len(runs) != 1:
        raise DeployError(f"`flwr ls --run-id {run_id}` returned {len(runs)} runs")
    return runs[0]


def run_logs(run_id: int, superlink: CliConnection, *, timeout: float = 60.0) -> str:
    """The ServerApp's log for a run (``flwr log RUN_ID --show``)."""
    proc = _flwr(["log", str(run_id), superlink.name, "--show"], superlink, timeout=timeout)
    return proc.stdout


def build_fab(app_dir: str | Path) -> bytes:
    """The app package (FAB) of ``app_dir``, built exactly as ``flwr run`` builds it."""
    from flwr.cli.build import build_fab_from_disk

    app = Path(app_dir).expanduser().resolve()
    if not (app / "pyproject.toml").is_file():
        raise DeployError(f"{app} has no pyproject.toml: not a Flower app directory")
    try:
        return build_fab_from_disk(app)
    except Exception as err:  # noqa: BLE001 - flwr raises click/own errors; one clear line instead
        raise DeployError(f"could not build the app package of {app}: {type(err).__name__}: {err}") from None


def write_fab_signature(fab: bytes, app_signing_key: str | Path, signatures_dir: str | Path) -> Path:
    """Sign ``fab`` with the coordinator's app-signing key; write ``SIGNATURES_DIR/<sha256>.json`` (atomic),
    which the Fleet proxy adds to the FAB that SuperNodes fetch."""
    import hashlib

    from federation.atomicio import atomic_write_bytes
    from federation.signing import sign_fab

    digest = hashlib.sha256(fab).hexdigest()
    record = {"fab_sha256": digest, "verifications": sign_fab(fab, app_signing_key)}
    out = Path(signatures_dir).expanduser().resolve() / f"{digest}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(out, (json.dumps(record, sort_keys=True, indent=2) + "\n").encode("ascii"), mode=0o644)


def start_run(fab: bytes, superlink: CliConnection, run_config: dict[str, str | int | float | bool]) -> int:
    """Submit exactly these FAB bytes (Control API ``StartRun``, as ``flwr run`` does); return the run id.

    In-process, so that the FAB whose hash the coordinator signed is the FAB the SuperLink stores (``flwr run``
    would build its own copy). ``run_config`` overrides the app's ``[tool.flwr.app.config]`` keys.
    """
    import hashlib

    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest  # pylint: disable=E0611
    from flwr.supercore.fab import Fab

    saved = {k: os.environ.get(k) for k in ("FLWR_HOME", "FLWR_TELEMETRY_ENABLED")}
    os.environ.update({k: superlink.env()[k] for k in saved})
    client = None
    try:
        connection = read_superlink_connection(superlink.name)
        client = init_http_client_from_connection(connection)
        request = StartRunRequest(
            fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
            override_config=user_config_to_proto(dict(run_config)),
            federation=connection.federation or "",
        )
        response = client.StartRun(request)
    except Exception as err:  # noqa: BLE001 - flwr raises many kinds; the caller gets one DeployError
        raise DeployError(f"submitting the run failed: {type(err).__name__}: {err}") from None
    finally:
        if client is not None:
            client.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if not response.HasField("run_id"):
        raise DeployError("the SuperLink did not start the run (no run id in its reply; see its log)")
    return int(response.run_id)


def submit_run(
    app_dir: str | Path,
    superlink: CliConnection,
    run_config: dict[str, str | int | float | bool],
    *,
    app_signing_key: str | Path | None,
    signatures_dir: str | Path,
    timeout: float = 600.0,
    poll_interval: float = 1.0,
) -> RunResult:
    """Build ``app_dir``'s FAB, sign it with ``app_signing_key`` (None: submit unsigned, which every node that
    pins a key refuses), submit it and wait until the run finishes; return its final status.

    A run that has not finished within ``timeout`` seconds is stopped (``flwr stop``) and DeployError raised.
    """
    from dataclasses import replace

    from server.run_id import RUN_ID_KEY, new_run_id

    if _declares(app_dir, RUN_ID_KEY):  # fedprop's app: drawn once here, a resume re-uses it (run.json)
        run_config = {RUN_ID_KEY: new_run_id(), **run_config}
    fab = build_fab(app_dir)
    if app_signing_key is not None:
        write_fab_signature(fab, app_signing_key, signatures_dir)
    run_id = start_run(fab, superlink, run_config)
    result = wait_for_run(run_id, superlink, timeout=timeout, poll_interval=poll_interval)
    return replace(result, fedprop_run_id=str(run_config.get(RUN_ID_KEY, "")))


def _declares(app_dir: str | Path, key: str) -> bool:
    """Whether the app's pyproject declares run-config ``key`` (Flower refuses undeclared keys with 412)."""
    import tomllib

    try:
        data = tomllib.loads((Path(app_dir) / "pyproject.toml").read_text())
    except (OSError, ValueError):
        return False
    return key in data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})


def resume_run(
    run_dir: str | Path,
    app_dir: str | Path,
    superlink: CliConnection,
    *,
    app_signing_key: str | Path | None,
    signatures_dir: str | Path,
    timeout: float = 600.0,
    poll_interval: float = 1.0,
) -> RunResult:
    """Submit the run of ``run_dir`` again (its run config and fedprop run id from ``run.json``) with
    ``fedprop-resume=true``: the ServerApp continues from the last checkpoint, keeping round numbers and outputs.
    Checks here first (finished run, missing run.json, unreadable or foreign checkpoint) so that the error is one
    message naming the file, not a failed run."""
    from federation.config import from_run_config
    from federation.models import federations
    from server.outputs import RunOutputs, check_resumable, last_checkpoint
    from server.run_id import RESUME_KEY, RUN_ID_KEY

    run_dir = Path(run_dir).expanduser().resolve()
    run = check_resumable(run_dir)
    cfg = from_run_config(run["run_config"])
    records = RunOutputs(run_dir)  # read here; the resumed ServerApp writes them
    records.load_rounds()
    for heads in federations(cfg.task, cfg.model.heads):
        tag = "+".join(heads)
        if not (run_dir / f"model_{tag}.pt").exists() and not (run_dir / f"RELEASE_REFUSED_{tag}.json").exists():
            last_checkpoint(run_dir, tag, cfg, recorded=[int(r["round"]) for r in records.rounds.get(tag, [])])
    run_config = {**run["run_config"], RUN_ID_KEY: run["fedprop_run_id"], "fedprop-run-dir": str(run_dir),
                  RESUME_KEY: True}
    return submit_run(app_dir, superlink, run_config, app_signing_key=app_signing_key, signatures_dir=signatures_dir,
                      timeout=timeout, poll_interval=poll_interval)


def wait_for_run(run_id: int, superlink: CliConnection, *, timeout: float, poll_interval: float = 1.0) -> RunResult:
    """Poll ``flwr ls --run-id`` until the run finishes; stop it and raise DeployError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        details = run_status(run_id, superlink)
        if str(details.get("status", "")).startswith("finished"):
            return RunResult(run_id=run_id, status=details["status"], details=details)
        if time.monotonic() > deadline:
            _flwr(["stop", str(run_id), superlink.name], superlink)
            raise DeployError(f"run {run_id} still {details.get('status')!r} after {timeout:.0f} s; stopped it")
        time.sleep(poll_interval)


# ---------------------------------------------------------------------------------------------- processes


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc); empty elsewhere."""
    out = []
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces/parens, so split after the last ')'
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


class ManagedProcess:
    """A Flower process we started, with its output in ``log_path``; :meth:`stop` ends it and its children.

    Use as a context manager so the process is stopped also when the block raises.
    """

    def __init__(self, cmd: list[str], *, env: dict[str, str], log_path: str | Path, cwd: str | Path) -> None:
        self.cmd = list(cmd)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._descendants: list[int] = []
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        try:
            self.popen = subprocess.Popen(  # noqa: S603 - argv list, no shell
                self.cmd, env=env, cwd=str(cwd), stdout=self._log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        except BaseException:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, text: str, *, timeout: float) -> None:
        """Wait until ``text`` appears in the log; DeployError if the process exits first or on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text():
                return
            if not self.alive():
                raise DeployError(
                    f"{Path(self.cmd[0]).name} exited with {self.popen.returncode} before logging {text!r}; "
                    f"log {self.log_path}:\n{self.log_text()[-2000:]}"
                )
            time.sleep(0.1)
        raise DeployError(f"{Path(self.cmd[0]).name} did not log {text!r} within {timeout} s")

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit on its own; return its exit code (DeployError on timeout)."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise DeployError(f"{Path(self.cmd[0]).name} (pid {self.pid}) still running after {timeout} s") from err

    def terminate(self) -> None:
        """Send SIGTERM to the process and every descendant (remembered for :meth:`stop`); don't wait."""
        if self.alive():
            self._descendants = _descendants(self.pid)
            for pid in [self.pid, *self._descendants]:
                _signal(pid, signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Terminate, wait up to ``timeout``, then SIGKILL whatever is left (descendants too). Idempotent."""
        try:
            self.terminate()
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=timeout)
            deadline = time.monotonic() + timeout
            for pid in self._descendants:
                while _pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if _pid_alive(pid):
                    _signal(pid, signal.SIGKILL)
            return self.popen.returncode
        finally:
            self._log.close()

    def __enter__(self) -> "ManagedProcess":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def stop_all(processes: list[ManagedProcess], timeout: float = 10.0) -> None:
    """Stop several processes in parallel: SIGTERM all first, then wait for (or kill) each."""
    for proc in processes:
        try:
            proc.terminate()
        except OSError:
            pass
    errors = []
    for proc in processes:
        try:
            proc.stop(timeout=timeout)
        except Exception as err:  # keep stopping the others; re-raise the first at the end
            errors.append(err)
    if errors:
        raise errors[0]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2:].split()[0] != "Z"  # a zombie has exited


def wait_for_port(host: str, port: int, *, timeout: float, process: ManagedProcess | None = None) -> None:
    """Wait until ``host:port`` accepts TCP connections (fails fast if ``process`` dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise DeployError(
                f"{Path(process.cmd[0]).name} exited with {process.popen.returncode} before listening on "
                f"{host}:{port}; log {process.log_path}:\n{process.log_text()[-2000:]}"
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise DeployError(f"nothing listening on {host}:{port} after {timeout} s")


SUPEREXEC_SECRET = "superexec.secret"
SIGNATURES_DIR = "fab-signatures"


def ensure_superexec_secret(state_dir: str | Path) -> Path:
    """``STATE_DIR/superexec.secret``: 32 bytes from the OS CSPRNG, mode 0600, created once and kept."""
    import secrets

    from federation.atomicio import atomic_write_bytes

    path = Path(state_dir).expanduser().resolve() / SUPEREXEC_SECRET
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise DeployError(f"{path} is readable by group/other; run: chmod 600 {path}")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, secrets.token_bytes(32), mode=0o600)


def check_loopback_san(certs_dir: str | Path) -> None:
    """The loopback SuperLink is dialled at 127.0.0.1 by the proxy, SuperExec and ``flwr``: its certificate
    must name 127.0.0.1 (``fedprop certs init`` adds it)."""
    from cryptography import x509

    path = Path(_existing_file(Path(certs_dir) / SERVER_CERT, "SuperLink certificate"))
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.IPAddress)
    except x509.ExtensionNotFound:
        ips = []
    if ipaddress.ip_address("127.0.0.1") not in ips:
        raise DeployError(
            f"{path} does not name 127.0.0.1 among its SANs; the proxy, SuperExec and the coordinator's `flwr` "
            "reach the SuperLink there. Reissue it: fedprop certs init NEWDIR --hosts <your hosts>"
        )


@dataclass
class Coordinator:
    """The coordinator's processes: loopback SuperLink, its SuperExec, the partner-facing Fleet proxy."""

    superlink: "ManagedProcess"
    superexec: "ManagedProcess"
    proxy: "ManagedProcess"
    fleet_address: str
    control_address: str
    signatures_dir: Path

    @property
    def processes(self) -> list["ManagedProcess"]:
        return [self.proxy, self.superexec, self.superlink]

    def dead(self) -> list["ManagedProcess"]:
        return [p for p in self.processes if not p.alive()]

    def stop(self, timeout: float = 10.0) -> None:
        stop_all(self.processes, timeout=timeout)


def coordinator_commands(
    *, certs_dir: str | Path, fleet_host: str, fleet_port: int, control_port: int, state_dir: str | Path
) -> dict[str, list[str]]:
    """The three command lines of :func:`start_coordinator` (``--print-command`` shows them)."""
    state = Path(state_dir).expanduser().resolve()
    secret = state / SUPEREXEC_SECRET
    if fleet_port == control_port:
        raise DeployError(f"--port and --control-port must differ (both {fleet_port})")
    return {
        "superlink": superlink_command(certs_dir=certs_dir, host="127.0.0.1", port=control_port,
                                       database=state / "superlink.db", superexec_secret=secret),
        "superexec": superexec_command(certs_dir=certs_dir, runtime_address=f"127.0.0.1:{control_port}",
                                       superexec_secret=secret),
        "proxy": fleet_proxy_command(certs_dir=certs_dir, listen_host=fleet_host, listen_port=fleet_port,
                                     upstream_port=control_port, signatures_dir=state / SIGNATURES_DIR),
    }


def start_coordinator(
    *, certs_dir: str | Path, fleet_host: str, fleet_port: int, control_port: int, state_dir: str | Path,
    timeout: float = 60.0,
) -> Coordinator:
    """Start the SuperLink on 127.0.0.1:``control_port`` (Control + runtime APIs, coordinator only), its
    SuperExec, and the Fleet proxy on ``fleet_host:fleet_port`` (the only port partners reach); return once
    both listen. State, secret, signatures and logs live under ``state_dir``."""
    state = Path(state_dir).expanduser().resolve()
    state.mkdir(parents=True, exist_ok=True)
    check_loopback_san(certs_dir)
    ensure_superexec_secret(state)
    (state / SIGNATURES_DIR).mkdir(exist_ok=True)
    cmds = coordinator_commands(certs_dir=certs_dir, fleet_host=fleet_host, fleet_port=fleet_port,
                                control_port=control_port, state_dir=state)
    env = flower_env(state / "flwr-home")
    started: list[ManagedProcess] = []
    try:
        link = ManagedProcess(cmds["superlink"], env=env, log_path=state / "superlink.log", cwd=state)
        started.append(link)
        wait_for_port("127.0.0.1", control_port, timeout=timeout, process=link)
        superexec = ManagedProcess(cmds["superexec"], env=env, log_path=state / "superexec.log", cwd=state)
        started.append(superexec)
        repo = str(Path(__file__).resolve().parents[1])
        proxy_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))}
        proxy = ManagedProcess(cmds["proxy"], env=proxy_env, log_path=state / "fleet-proxy.log", cwd=state)
        started.append(proxy)
        wait_for_port(fleet_host, fleet_port, timeout=timeout, process=proxy)
        if not superexec.alive():
            raise DeployError(f"flower-superexec exited at start; log {superexec.log_path}:\n{superexec.log_text()[-2000:]}")
    except BaseException:
        stop_all(started)
        raise
    return Coordinator(superlink=link, superexec=superexec, proxy=proxy,
                       fleet_address=f"{fleet_host}:{fleet_port}", control_address=f"127.0.0.1:{control_port}",
                       signatures_dir=state / SIGNATURES_DIR)


def start_supernode(
    *,
    superlink: str,
    ca_cert: str | Path,
    private_key: str | Path,
    port: int,
    node_config: dict[str, str | int | float | bool],
    run_dir: str | Path,
    name: str,
    app_public_key: str | Path,
    max_retries: int | None = None,
) -> ManagedProcess:
    """Start a SuperNode pinned to ``app_public_key`` with its own FLWR_HOME and log under ``run_dir/name``;
    returns immediately."""
    node_dir = Path(run_dir).resolve() / name
    node_dir.mkdir(parents=True, exist_ok=True)
    trusted = write_trusted_entities(node_dir / "trusted-entities.yaml", app_public_key)
    cmd = supernode_command(
        superlink=superlink, ca_cert=ca_cert, private_key=private_key, port=port, node_config=node_config,
        trusted_entities=trusted, max_retries=max_retries,
    )
    return ManagedProcess(cmd, env=flower_env(node_dir / "flwr-home"), log_path=node_dir / "supernode.log",
                          cwd=node_dir)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
