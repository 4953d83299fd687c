"""A loopback federation as tests/deploy/test_loopback.py builds it, as a context manager for other tests and
benchmarks/bench_deployment.py: `fedprop certs init` (SAN 127.0.0.2 + localhost), `certs app-key`, one
`certs node-key` + `certs ledger-key` per partner, `fedprop server start` (SuperLink on 127.0.0.1, Fleet proxy on
127.0.0.2), `flwr supernode register` per key and `fedprop client start` per partner, everything with
PATH=/usr/bin:/bin. Every process started here is stopped on exit (nodes first, then the coordinator).

Also a minimal numpy app (Flower alone: FedAvg over a 4-vector with train + evaluate each round) that writes its
per-round wall-clock times, the floor that benchmarks compare fedprop's app with.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from federation import signing
from server import deploy

REPO = Path(__file__).resolve().parents[2]
FEDPROP = str(Path(sys.executable).parent / "fedprop")
HOST = "127.0.0.1"  # the SuperLink (Control + runtime APIs): coordinator only
PUBLIC = "127.0.0.2"  # the Fleet proxy: what partners reach
CLEAN_PATH = "/usr/bin:/bin"  # what a fresh machine has: no venv, no Flower binaries


def clean_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": CLEAN_PATH, "FLWR_TELEMETRY_ENABLED": "0", **extra}


def fedprop(*args: object, cwd: str | Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FEDPROP, *map(str, args)], check=check, capture_output=True, text=True,
                          env=clean_env(), cwd=cwd)


@dataclass
class Federation:
    root: Path
    certs: Path
    fleet: str
    control: str
    conn: deploy.CliConnection
    server: deploy.ManagedProcess
    state: Path
    app_key: Path
    app_pub: Path
    fingerprint: str
    keys: dict[str, tuple[Path, Path]]
    node_ids: dict[str, int]
    nodes: dict[str, deploy.ManagedProcess] = field(default_factory=dict)

    @property
    def signatures(self) -> Path:
        return self.state / deploy.SIGNATURES_DIR

    def node_dir(self, name: str) -> Path:
        return self.root / "nodes" / name

    def default_node_config(self, name: str, index: int, partners: int) -> dict[str, str | int | float | bool]:
        d = self.node_dir(name)
        return {"partition-id": index, "num-partitions": partners, "partner": name,
                "ledger-path": str(d / "ledger.sqlite"),
                "node-key": str(self.root / "ledger-keys" / name / f"{name}-ledger.key")}

    def start_node(self, name: str, node_config: dict, *, log_name: str = "supernode.log") -> deploy.ManagedProcess:
        """`fedprop client start` for partner ``name`` (partner guide step 4); returns at once."""
        node_dir = self.node_dir(name)
        node_dir.mkdir(parents=True, exist_ok=True)
        cmd = [FEDPROP, "client", "start", "--certs", str(self.certs), "--superlink", self.fleet,
               "--key", str(self.keys[name][0]), "--app-public-key", str(self.app_pub),
               "--app-key-fingerprint", self.fingerprint, "--port", str(deploy.free_port(HOST)),
               "--state-dir", str(node_dir), "--node-config", deploy.format_node_config(node_config)]
        proc = deploy.ManagedProcess(cmd, env=clean_env(), log_path=node_dir / log_name, cwd=node_dir)
        self.nodes[name] = proc
        return proc

    def kill_node(self, name: str) -> None:
        """kill -9 the partner's whole SuperNode (its process group: supernode, superexec, clientapp)."""
        proc = self.nodes[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.popen.wait(timeout=30)

    def submit(self, app: str | Path, run_config: dict, *, timeout: float) -> deploy.RunResult:
        return deploy.submit_run(app, self.conn, run_config, app_signing_key=self.app_key,
                                 signatures_dir=self.signatures, timeout=timeout)


@contextlib.contextmanager
def loopback_federation(root: Path, partners: list[str], *, spare: tuple[str, ...] = (),
                        extra_node_config: dict | None = None):
    """Coordinator + one registered, running SuperNode per partner (plus registered, not started ``spare``);
    each node's config is :meth:`Federation.default_node_config` updated with ``extra_node_config``."""
    root = Path(root)
    certs = root / "certs"
    fedprop("certs", "init", certs, "--hosts", f"{PUBLIC},localhost", "--days", "2")
    fedprop("certs", "app-key", root / "coordinator")
    app_key, app_pub = root / "coordinator" / "app-signing.key", root / "coordinator" / "app-signing.pub"
    keys = {}
    for p in [*partners, *spare]:
        fedprop("certs", "node-key", root / "keys" / p, "--partner", p)
        fedprop("certs", "ledger-key", root / "ledger-keys" / p, "--partner", p)
        keys[p] = (root / "keys" / p / f"{p}.key", root / "keys" / p / f"{p}.pub")
    fleet_port, control_port = deploy.free_port(HOST), deploy.free_port(HOST)
    state = root / "superlink"
    server = deploy.ManagedProcess(
        [FEDPROP, "server", "start", "--certs", str(certs), "--host", PUBLIC, "--port", str(fleet_port),
         "--control-port", str(control_port), "--state-dir", str(state)],
        env=clean_env(), log_path=root / "server-start.log", cwd=root)
    fed = None
    try:
        deploy.wait_for_port(HOST, control_port, timeout=60, process=server)
        deploy.wait_for_port(PUBLIC, fleet_port, timeout=60, process=server)
        conn = deploy.write_cli_connection(root / "cli-home", address=f"{HOST}:{control_port}",
                                           root_certificates=certs / "ca.crt")
        node_ids = {p: deploy.register_node(keys[p][1], conn) for p in [*partners, *spare]}
        fed = Federation(root=root, certs=certs, fleet=f"{PUBLIC}:{fleet_port}", control=f"{HOST}:{control_port}",
                         conn=conn, server=server, state=state, app_key=app_key, app_pub=app_pub,
                         fingerprint=signing.public_key_fingerprint(app_pub), keys=keys, node_ids=node_ids)
        for i, p in enumerate(partners):
            fed.start_node(p, {**fed.default_node_config(p, i, len(partners)), **(extra_node_config or {})})
        for p in partners:  # Flower logs the node id once the SuperLink has activated the node
            fed.nodes[p].wait_for_log("SuperNode ID:", timeout=90)
        yield fed
    finally:
        if fed is not None:
            deploy.stop_all(list(fed.nodes.values()))
        deploy.stop_all([server])


# ---------------------------------------------------------------------------------------------- floor app

FLOOR_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "deployfloor"
version = "1.0.0"
dependencies = ["flwr==1.41.0", "numpy"]

[tool.flwr.app]
publisher = "fedprop"

[tool.flwr.app.components]
serverapp = "deployfloor.server_app:app"
clientapp = "deployfloor.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 3
min-nodes = 3
result-path = ""
fedprop-run-id = ""  # declared, so deploy.submit_run sends the floor the same run-id key as fedprop
"""

# Train + evaluate every round (FedAvg, fraction_evaluate 1), as fedprop's app with evaluation.rounds = rounds.
# evaluate_fn runs at round 0 and at the end of every round: the gaps are the rounds' wall-clock times.
FLOOR_SERVER = '''\
import json
import time

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-server-rounds"])
    n = int(context.run_config["min-nodes"])
    marks = []

    def stamp(server_round, arrays):
        marks.append(time.perf_counter())
        return None

    strategy = FedAvg(fraction_evaluate=1.0, min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord([np.zeros(4)]), num_rounds=rounds,
                            evaluate_fn=stamp)
    final = result.arrays.to_numpy_ndarrays()[0].tolist()
    if context.run_config.get("result-path"):
        with open(str(context.run_config["result-path"]), "w") as fh:
            json.dump({"final": final, "round_s": [b - a for a, b in zip(marks, marks[1:])]}, fh)
'''

FLOOR_CLIENT = '''\
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    step = float(context.node_config["partition-id"]) + 1.0
    arrays = [a + step for a in msg.content["arrays"].to_numpy_ndarrays()]
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 1})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    value = float(msg.content["arrays"].to_numpy_ndarrays()[0].sum())
    return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 1, "sum": value})}), reply_to=msg)
'''


def floor_app(app: Path) -> Path:
    (app / "deployfloor").mkdir(parents=True)
    (app / "pyproject.toml").write_text(FLOOR_PYPROJECT)
    (app / "deployfloor" / "__init__.py").write_text("")
    (app / "deployfloor" / "server_app.py").write_text(FLOOR_SERVER)
    (app / "deployfloor" / "client_app.py").write_text(FLOOR_CLIENT)
    return app
