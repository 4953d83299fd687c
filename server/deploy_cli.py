"""`fedprop server ...` / `fedprop client ...`: run a TLS + node-authenticated Flower deployment.

    fedprop server start --certs DIR [--host 127.0.0.1] [--port 8000] [--state-dir ./fedprop-superlink]
    fedprop server register-node KEY.pub --certs DIR --superlink HOST:PORT
    fedprop server submit APP_DIR --certs DIR --superlink HOST:PORT [--run-config "num-server-rounds=2"]
    fedprop client start --certs DIR --superlink HOST:PORT --key KEY [--port 9094]
                         --node-config "partition-id=0 num-partitions=3"

``start`` replaces this process with Flower's own (``flower-superlink`` / ``flower-supernode``) so signals reach
it directly; ``--print-command`` shows the exact command line instead. FLWR_HOME is set to a directory under
``--state-dir``, and Flower's telemetry is switched off.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

from federation.pki import CA_CERT
from server import deploy
from server.provision import EXIT_ERROR, _guarded  # noqa: F401 -- one FedpropError -> exit-code wrapper for both CLIs (EXIT_ERROR re-exported)

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
    state = Path(args.state_dir).expanduser().resolve()
    cmd = deploy.superlink_command(
        certs_dir=args.certs, host=args.host, port=args.port, database=state / "superlink.db",
        log_file=state / "superlink.log" if args.log_file else None,
    )
    if not args.print_command:
        state.mkdir(parents=True, exist_ok=True)
    return _exec(cmd, deploy.flower_env(state / "flwr-home"), print_only=args.print_command)


def _connection(args: argparse.Namespace) -> deploy.CliConnection:
    home = Path(args.state_dir).expanduser().resolve() / "cli-home"
    return deploy.write_cli_connection(home, address=args.superlink, root_certificates=Path(args.certs) / CA_CERT)


def cmd_server_register_node(args: argparse.Namespace) -> int:
    node_id = deploy.register_node(args.public_key, _connection(args))
    print(f"registered {args.public_key} as SuperNode {node_id}")
    return 0


def cmd_server_submit(args: argparse.Namespace) -> int:
    run_config = parse_node_config(args.run_config) if args.run_config else {}
    result = deploy.submit_run(args.app_dir, _connection(args), run_config, timeout=args.timeout)
    print(f"run {result.run_id}: {result.status}")
    return 0 if result.completed else 1


def cmd_client_start(args: argparse.Namespace) -> int:
    state = Path(args.state_dir).expanduser().resolve()
    cmd = deploy.supernode_command(
        superlink=args.superlink, ca_cert=Path(args.certs) / CA_CERT, private_key=args.key, port=args.port,
        node_config=parse_node_config(args.node_config), max_retries=args.max_retries,
    )
    if not args.print_command:
        state.mkdir(parents=True, exist_ok=True)
    return _exec(cmd, deploy.flower_env(state / "flwr-home"), print_only=args.print_command)


def _superlink_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--certs", required=True, help=f"directory with the federation CA ({CA_CERT})")
    p.add_argument("--superlink", required=True, help="SuperLink address HOST:PORT (must match a SAN)")
    p.add_argument("--state-dir", default="./fedprop-cli", help="FLWR_HOME for the flwr CLI lives here")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``server`` (start, register-node, submit) and ``client`` (start); each sets ``func(args) -> int``."""
    server = subparsers.add_parser("server", help="run the federation's SuperLink")
    ssub = server.add_subparsers(dest="server_command", required=True)
    start = ssub.add_parser("start", help="start a SuperLink with TLS and SuperNode authentication")
    start.add_argument("--certs", required=True, help="directory from `fedprop certs init`")
    start.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    start.add_argument("--port", type=int, default=8000, help="Fleet/Control/Runtime HTTPS port (default 8000)")
    start.add_argument("--state-dir", default="./fedprop-superlink", help="state db and FLWR_HOME")
    start.add_argument("--log-file", action="store_true", help="also write STATE_DIR/superlink.log")
    start.add_argument("--print-command", action="store_true", help="print the Flower command, run nothing")
    start.set_defaults(func=_guarded(cmd_server_start))

    reg = ssub.add_parser("register-node", help="allow a partner's SuperNode public key (OpenSSH .pub)")
    reg.add_argument("public_key")
    _superlink_args(reg)
    reg.set_defaults(func=_guarded(cmd_server_register_node))

    submit = ssub.add_parser("submit", help="flwr run APP_DIR and wait for its final status")
    submit.add_argument("app_dir")
    _superlink_args(submit)
    submit.add_argument("--run-config", default="", help='e.g. "num-server-rounds=2"')
    submit.add_argument("--timeout", type=float, default=3600.0, help="stop the run after this many seconds")
    submit.set_defaults(func=_guarded(cmd_server_submit))

    client = subparsers.add_parser("client", help="run a partner's SuperNode")
    csub = client.add_subparsers(dest="client_command", required=True)
    cstart = csub.add_parser("start", help="start a SuperNode that trusts the federation CA and authenticates")
    cstart.add_argument("--certs", required=True, help=f"directory with the federation CA ({CA_CERT})")
    cstart.add_argument("--superlink", required=True, help="SuperLink address HOST:PORT")
    cstart.add_argument("--key", required=True, help="this partner's private key (from `fedprop certs node-key`)")
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
