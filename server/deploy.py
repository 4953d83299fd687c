"""Build and run Flower 1.41 deployment commands: SuperLink, SuperNodes, node registration, run submission.

Everything here shells out to Flower's own executables (``flower-superlink``, ``flower-supernode``, ``flwr``)
with explicit arguments, so an operator can copy the exact command lines from :func:`superlink_command` /
:func:`supernode_command` and run them by hand.

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


def flower_executable(name: str) -> str:
    """Path of a Flower executable: next to this interpreter (a venv), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"`{name}` not found next to {sys.executable} or on PATH; install flwr==1.41.0")
    return found


def flower_env(flwr_home: str | Path) -> dict[str, str]:
    """Environment for every Flower process we start: private FLWR_HOME, telemetry off."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    env["FLWR_TELEMETRY_ENABLED"] = "0"
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


def superlink_command(
    *,
    certs_dir: str | Path,
    host: str,
    port: int,
    database: str | Path,
    log_file: str | Path | None = None,
) -> list[str]:
    """The ``flower-superlink`` command line: TLS, SuperNode auth, no runtime dependency installation.

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
        "--database", str(Path(database).expanduser().resolve()),
        "--host", host,
        "--port", str(_check_port(port)),
    ]
    if log_file is not None:
        cmd += ["--log-file", str(Path(log_file).expanduser().resolve())]
    return cmd


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


def supernode_command(
    *,
    superlink: str,
    ca_cert: str | Path,
    private_key: str | Path,
    port: int,
    node_config: dict[str, str | int | float | bool],
    host: str = "127.0.0.1",
    max_retries: int | None = None,
    max_wait_time: float | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line: TLS to ``superlink`` (host:port) trusting ``ca_cert``,
    authenticated with ``private_key``; ``port`` is the node's local Runtime API (one per node on a host)."""
    if not re.match(r"^\S+:\d+$", superlink):
        raise DeployError(f"superlink must be HOST:PORT, got {superlink!r}")
    cmd = [
        flower_executable("flower-supernode"),
        "--superlink", superlink,
        "--root-certificates", _existing_file(ca_cert, "CA certificate"),
        "--auth-supernode-private-key", _existing_file(private_key, "SuperNode private key"),
        "--host", host,
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


def submit_run(
    app_dir: str | Path,
    superlink: CliConnection,
    run_config: dict[str, str | int | float | bool],
    *,
    timeout: float = 600.0,
    poll_interval: float = 1.0,
) -> RunResult:
    """Submit ``app_dir`` with ``flwr run`` and wait until the run finishes; return its final status.

    A run that has not finished within ``timeout`` seconds is stopped (``flwr stop``) and DeployError raised.
    """
    app = Path(app_dir).expanduser().resolve()
    if not (app / "pyproject.toml").is_file():
        raise DeployError(f"{app} has no pyproject.toml: not a Flower app directory")
    args = ["run", str(app), superlink.name, "--format", "json"]
    if run_config:
        args += ["--run-config", format_node_config(run_config)]
    run_id = int(_json_out(_flwr(args, superlink, timeout=120.0), f"submitting {app}")["run-id"])
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


def start_superlink(
    *, certs_dir: str | Path, host: str, port: int, run_dir: str | Path, timeout: float = 60.0
) -> ManagedProcess:
    """Start a TLS + node-auth SuperLink with state and logs under ``run_dir``; return once it listens."""
    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    cmd = superlink_command(certs_dir=certs_dir, host=host, port=port, database=run / "superlink.db")
    proc = ManagedProcess(cmd, env=flower_env(run / "flwr-home"), log_path=run / "superlink.log", cwd=run)
    try:
        wait_for_port(host, port, timeout=timeout, process=proc)
    except BaseException:
        proc.stop()
        raise
    return proc


def start_supernode(
    *,
    superlink: str,
    ca_cert: str | Path,
    private_key: str | Path,
    port: int,
    node_config: dict[str, str | int | float | bool],
    run_dir: str | Path,
    name: str,
    max_retries: int | None = None,
) -> ManagedProcess:
    """Start a SuperNode with its own FLWR_HOME and log under ``run_dir/name``; returns immediately."""
    node_dir = Path(run_dir).resolve() / name
    node_dir.mkdir(parents=True, exist_ok=True)
    cmd = supernode_command(
        superlink=superlink, ca_cert=ca_cert, private_key=private_key, port=port, node_config=node_config,
        max_retries=max_retries,
    )
    return ManagedProcess(cmd, env=flower_env(node_dir / "flwr-home"), log_path=node_dir / "supernode.log",
                          cwd=node_dir)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
