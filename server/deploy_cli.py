"""`fedprop server ...` / `fedprop client ...`: run a TLS + node-authenticated Flower deployment.

    fedprop server start --certs DIR [--host 0.0.0.0] [--port 9092] [--control-port 9093]
                         [--state-dir ./fedprop-superlink]
    fedprop server register-node KEY.pub --certs DIR [--superlink 127.0.0.1:9093]
    fedprop server nodes --certs DIR [--superlink 127.0.0.1:9093] [--json]
    fedprop server submit APP_DIR --certs DIR --app-key app-signing.key [--run-config "num-server-rounds=2"]
    fedprop server resume RUN_DIR --certs DIR --app-key app-signing.key [--app-dir .]
    fedprop client start --certs DIR --superlink HOST:9092 --key KEY --app-public-key app-signing.pub
                         [--app-key-fingerprint sha256:...] [--port 9094] --node-config "partition-id=0"

``server start`` runs three processes and stops all of them when one exits or on SIGTERM/SIGINT: the
SuperLink on 127.0.0.1:CONTROL_PORT (Control and ServerApp runtime APIs; never reachable by partners), its
``flower-superexec`` (authenticated with a secret in STATE_DIR), and the Fleet proxy (server/fleet_proxy.py) on
HOST:PORT, the only port partners reach. ``client start`` replaces this process with ``flower-supernode``
pinned to the coordinator's app-signing key (``--trusted-entities``). ``--print-command`` shows the exact
command lines instead. FLWR_HOME is set under ``--state-dir``; Flower's telemetry is off; Flower's own
executables and their children are found in this interpreter's ``bin/`` (no activated venv needed).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path

from federation.pki import CA_CERT
from server import deploy
from server.provision import EXIT_ERROR, _guarded  # noqa: F401 -- one FedpropError -> exit-code wrapper for both CLIs (EXIT_ERROR re-exported)

DEFAULT_FLEET_PORT = 9092
DEFAULT_CONTROL_PORT = 9093
_NODE_CONFIG_ITEM = re.compile(r"""(\S+?)=('[^']*'|"[^"]*"|\S+)""")


def parse_node_config(text: str) -> dict[str, str | int | float | bool]:
    """Parse Flower's ``--node-config`` syntax ("k=1 name=\\"x\\" flag=true") into a dict, strictly."""
    items = _NODE_CONFIG_ITEM.findall(text)
    rebuilt = " ".join(f"{k}={v}" for k, v in items)
    if rebuilt != " ".join(text.split()):
        raise deploy.DeployError(
            f"--node-config {text!r} is not a space-separated list of key=value pairs (quote string values)"
        )
    out: dict[str, str | int | float | bool] = {}
    for key, raw in items:
        if raw[:1] in "'\"":
            out[key] = raw[1:-1]
        elif raw in ("true", "false"):
            out[key] = raw == "true"
        else:
            try:
                out[key] = int(raw)
            except ValueError:
                try:
                    out[key] = float(raw)
                except ValueError:
                    out[key] = raw
    return out


def _exec(cmd: list[str], env: dict[str, str], *, print_only: bool) -> int:
    if print_only:
        print(shlex.join(cmd))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


def cmd_server_start(args: argparse.Namespace) -> int:
    kw = dict(certs_dir=args.certs, fleet_host=args.host, fleet_port=args.port, control_port=args.control_port,
              state_dir=args.state_dir)
    if args.print_command:
        for name, cmd in deploy.coordinator_commands(**kw).items():
            print(f"# {name}\n{shlex.join(cmd)}")
        return 0
    coordinator = deploy.start_coordinator(**kw)
    stopping = []

    def _stop(signum, _frame):
        stopping.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    print(f"Fleet API for partners: https://{coordinator.fleet_address} (the only port to open to them)\n"
          f"Control API for the coordinator only: {coordinator.control_address} (loopback; use --superlink "
          f"{coordinator.control_address} with register-node, nodes, submit)\nlogs and state: "
          f"{Path(args.state_dir).expanduser().resolve()}", flush=True)
    try:
        while not stopping and not coordinator.dead():
            time.sleep(0.5)
    finally:
        dead = [Path(p.cmd[0]).name if "fleet_proxy" not in " ".join(p.cmd) else "fleet proxy"
                for p in coordinator.dead()]
        coordinator.stop()
    if dead and not stopping:
        print(f"error: {', '.join(dead)} exited; stopped the others (see the logs in {args.state_dir})",
              file=sys.stderr)
        return EXIT_ERROR
    return 0


def _connection(args: argparse.Namespace) -> deploy.CliConnection:
    home = Path(args.state_dir).expanduser().resolve() / "cli-home"
    return deploy.write_cli_connection(home, address=args.superlink, root_certificates=Path(args.certs) / CA_CERT)


def cmd_server_register_node(args: argparse.Namespace) -> int:
    node_id = deploy.register_node(args.public_key, _connection(args))
    print(f"registered {args.public_key} as SuperNode {node_id}")
    return 0


def cmd_server_nodes(args: argparse.Namespace) -> int:
    nodes = deploy.list_nodes(_connection(args))
    if args.json:
        print(json.dumps(nodes, indent=2, sort_keys=True))
        return 0
    if not nodes:
        print("no SuperNodes registered (fedprop server register-node PARTNER.pub)")
        return 0
    print(f"{'node id':<22} {'status':<12} {'registered at':<22} {'online at':<22} offline at")
    for n in nodes:
        print(f"{str(n.get('node-id')):<22} {str(n.get('status')):<12} {str(n.get('created-at', '')):<22} "
              f"{str(n.get('online-at', '')):<22} {n.get('offline-at', '')}")
    online = sum(1 for n in nodes if n.get("status") == "online")
    print(f"{online} of {len(nodes)} registered SuperNodes online")
    return 0


def parse_run_config(items: list[str]) -> dict[str, str | int | float | bool]:
    """``--run-config`` values (each "k=v k2=v2", repeatable) merged in order into one dict."""
    out: dict[str, str | int | float | bool] = {}
    for item in items:
        out.update(parse_node_config(item))
    return out


def cmd_server_submit(args: argparse.Namespace) -> int:
    run_config = parse_run_config(args.run_config)
    result = deploy.submit_run(args.app_dir, _connection(args), run_config, app_signing_key=args.app_key,
                               signatures_dir=args.signatures_dir, timeout=args.timeout)
    print(f"run {result.run_id} (fedprop run {result.fedprop_run_id}): {result.status}")
    return 0 if result.completed else 1


def cmd_server_resume(args: argparse.Namespace) -> int:
    result = deploy.resume_run(args.run_dir, args.app_dir, _connection(args), app_signing_key=args.app_key,
                               signatures_dir=args.signatures_dir, timeout=args.timeout)
    print(f"run {result.run_id} (fedprop run {result.fedprop_run_id}, resumed from {args.run_dir}): {result.status}")
    if not result.completed:
        print(f"see the ServerApp's log: flwr log {result.run_id} (or the files in {args.run_dir})", file=sys.stderr)
    return 0 if result.completed else 1


def cmd_client_start(args: argparse.Namespace) -> int:
    from federation.signing import public_key_fingerprint, trusted_entities_yaml

    state = Path(args.state_dir).expanduser().resolve()
    trusted = state / "trusted-entities.yaml"
    if args.print_command:  # check the pin, write nothing
        trusted_entities_yaml(args.app_public_key, expected_fingerprint=args.app_key_fingerprint)
        pinned = args.app_public_key  # exists; the printed line names the file start would write
    else:
        state.mkdir(parents=True, exist_ok=True)
        pinned = deploy.write_trusted_entities(trusted, args.app_public_key,
                                               expected_fingerprint=args.app_key_fingerprint)
    cmd = deploy.supernode_command(
        superlink=args.superlink, ca_cert=Path(args.certs) / CA_CERT, private_key=args.key, port=args.port,
        node_config=parse_node_config(args.node_config), max_retries=args.max_retries, trusted_entities=pinned,
    )
    cmd[cmd.index("--trusted-entities") + 1] = str(trusted)
    if not args.print_command:
        print(f"running only apps signed by {public_key_fingerprint(args.app_public_key)}", flush=True)
    return _exec(cmd, deploy.flower_env(state / "flwr-home"), print_only=args.print_command)


def _superlink_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--certs", required=True, help=f"directory with the federation CA ({CA_CERT})")
    p.add_argument("--superlink", default=f"127.0.0.1:{DEFAULT_CONTROL_PORT}",
                   help=f"the SuperLink's loopback Control API (default 127.0.0.1:{DEFAULT_CONTROL_PORT})")
    p.add_argument("--state-dir", default="./fedprop-cli", help="FLWR_HOME for the flwr CLI lives here")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``server`` (start, register-node, nodes, submit, resume) and ``client`` (start); each sets ``func``."""
    server = subparsers.add_parser("server", help="run the federation's SuperLink")
    ssub = server.add_subparsers(dest="server_command", required=True)
    start = ssub.add_parser("start", help="SuperLink on loopback + SuperExec + the partner-facing Fleet proxy")
    start.add_argument("--certs", required=True, help="directory from `fedprop certs init`")
    start.add_argument("--host", default="0.0.0.0",
                       help="partner-facing address of the Fleet proxy (default 0.0.0.0)")
    start.add_argument("--port", type=int, default=DEFAULT_FLEET_PORT,
                       help=f"partner-facing Fleet API port, HTTPS (default {DEFAULT_FLEET_PORT})")
    start.add_argument("--control-port", type=int, default=DEFAULT_CONTROL_PORT,
                       help=f"SuperLink port on 127.0.0.1: Control + runtime APIs (default {DEFAULT_CONTROL_PORT})")
    start.add_argument("--state-dir", default="./fedprop-superlink",
                       help="state db, SuperExec secret, app signatures, logs")
    start.add_argument("--print-command", action="store_true", help="print the three commands, run nothing")
    start.set_defaults(func=_guarded(cmd_server_start))

    reg = ssub.add_parser("register-node", help="allow a partner's SuperNode public key (OpenSSH .pub)")
    reg.add_argument("public_key")
    _superlink_args(reg)
    reg.set_defaults(func=_guarded(cmd_server_register_node))

    nodes = ssub.add_parser("nodes", help="registered SuperNodes and which are online")
    _superlink_args(nodes)
    nodes.add_argument("--json", action="store_true", help="print Flower's JSON node list")
    nodes.set_defaults(func=_guarded(cmd_server_nodes))

    submit = ssub.add_parser("submit", help="sign APP_DIR's package, submit it and wait for its final status")
    submit.add_argument("app_dir")
    _superlink_args(submit)
    submit.add_argument("--app-key", required=True,
                        help="the coordinator's app-signing private key (`fedprop certs app-key`)")
    submit.add_argument("--signatures-dir", default=f"./fedprop-superlink/{deploy.SIGNATURES_DIR}",
                        help="STATE_DIR/fab-signatures of `fedprop server start` (the proxy reads it)")
    submit.add_argument("--run-config", action="append", default=[],
                        help='override app config keys, e.g. "num-server-rounds=2" (repeatable)')
    submit.add_argument("--timeout", type=float, default=3600.0, help="stop the run after this many seconds")
    submit.set_defaults(func=_guarded(cmd_server_submit))

    resume = ssub.add_parser("resume", help="continue a crashed run from its last checkpoint (same fedprop run id, "
                                            "rounds k+1.., no second spend of a recorded round)")
    resume.add_argument("run_dir", help="the run's directory (fedprop-run-dir): run.json, checkpoints/, ...")
    _superlink_args(resume)
    resume.add_argument("--app-dir", default=".", help="the app directory submitted originally (default .)")
    resume.add_argument("--app-key", required=True, help="the coordinator's app-signing private key")
    resume.add_argument("--signatures-dir", default=f"./fedprop-superlink/{deploy.SIGNATURES_DIR}",
                        help="STATE_DIR/fab-signatures of `fedprop server start` (the proxy reads it)")
    resume.add_argument("--timeout", type=float, default=3600.0, help="stop the run after this many seconds")
    resume.set_defaults(func=_guarded(cmd_server_resume))

    client = subparsers.add_parser("client", help="run a partner's SuperNode")
    csub = client.add_subparsers(dest="client_command", required=True)
    cstart = csub.add_parser("start", help="start a SuperNode that trusts the federation CA and authenticates")
    cstart.add_argument("--certs", required=True, help=f"directory with the federation CA ({CA_CERT})")
    cstart.add_argument("--superlink", required=True, help="the coordinator's Fleet address HOST:PORT")
    cstart.add_argument("--key", required=True, help="this partner's private key (from `fedprop certs node-key`)")
    cstart.add_argument("--app-public-key", required=True,
                        help="the coordinator's app-signing public key: the node runs only apps it signed")
    cstart.add_argument("--app-key-fingerprint", default=None,
                        help="refuse to start unless the key has this fingerprint (sha256:..., from onboarding)")
    cstart.add_argument("--node-config", default="", help='e.g. "partition-id=0 num-partitions=3"')
    cstart.add_argument("--port", type=int, default=9094, help="local Runtime API port, one per node (9094)")
    cstart.add_argument("--max-retries", type=int, default=None, help="give up after N failed connections")
    cstart.add_argument("--state-dir", default="./fedprop-supernode", help="FLWR_HOME (unpacked apps) lives here")
    cstart.add_argument("--print-command", action="store_true", help="print the Flower command, run nothing")
    cstart.set_defaults(func=_guarded(cmd_client_start))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedprop")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
