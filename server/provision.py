"""`fedprop certs`: create and check a federation's key material (see federation/pki.py for the formats).

    fedprop certs init DIR --hosts 127.0.0.1,localhost --partners 3 --days 365
    fedprop certs node-key DIR --partner NAME        # run by a partner; send only NAME.pub to the coordinator
    fedprop certs check DIR [--warn-days 30]          # exit 1 if a certificate expired or expires soon
    fedprop certs app-key DIR                         # coordinator: app-signing key pair, prints fingerprint
    fedprop certs ledger-key DIR --partner NAME       # partner: the Ed25519 key that signs its privacy ledger

Private keys are never printed; only file names are.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from federation import pki
from federation.errors import FedpropError

EXIT_EXPIRING = 1
EXIT_ERROR = 2
APP_KEY = "app-signing.key"
APP_PUB = "app-signing.pub"


def _partner_names(value: str) -> list[str]:
    """``--partners 3`` -> partner-0..partner-2; ``--partners acme,globex`` -> those names."""
    if value.isdigit():
        count = int(value)
        if count < 1:
            raise argparse.ArgumentTypeError("--partners must be >= 1")
        return [f"partner-{i}" for i in range(count)]
    names = [n.strip() for n in value.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--partners {value!r}: give a count or distinct comma-separated names")
    return names


def _hosts(value: str) -> list[str]:
    hosts = [h.strip() for h in value.split(",") if h.strip()]
    if not hosts:
        raise argparse.ArgumentTypeError("--hosts needs at least one DNS name or IP")
    return hosts


def cmd_init(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    hosts = list(args.hosts)
    if "127.0.0.1" not in hosts:  # the proxy, SuperExec and `flwr` reach the loopback SuperLink there
        hosts.append("127.0.0.1")
    pki.create_ca(out, name=args.ca_name, days=args.days)
    pki.create_server_cert(out, ca_dir=out, hosts=hosts, days=args.days)
    print(f"CA:          {out / pki.CA_CERT}  (give to every partner; keep {pki.CA_KEY} offline)")
    print(f"SuperLink:   {out / pki.SERVER_CERT}, {out / pki.SERVER_KEY}  SANs: {', '.join(hosts)}")
    for partner in args.partners:
        key, pub = pki.create_node_keypair(out / "nodes", partner=partner)
        print(f"node {partner}: {pub} (register it), {key} (send only to {partner}, 0600)")
    return 0


def cmd_node_key(args: argparse.Namespace) -> int:
    key, pub = pki.create_node_keypair(Path(args.dir), partner=args.partner)
    print(f"private key: {key} (0600; never leaves this machine)")
    print(f"public key:  {pub} (send this file to the federation coordinator)")
    return 0


def cmd_app_key(args: argparse.Namespace) -> int:
    from federation.signing import app_key_id, generate_keypair

    d = Path(args.dir)
    key, pub = d / APP_KEY, d / APP_PUB
    fingerprint = generate_keypair(key, pub)
    print(f"app-signing key: {key} (0600; `fedprop server submit --app-key`; keep it off the SuperLink host "
          "if you can)")
    print(f"public key:      {pub} (give to every partner: `fedprop client start --app-public-key`)")
    print(f"fingerprint:     {fingerprint} (read it to each partner over a second channel; they pass it as "
          f"--app-key-fingerprint)\nFlower key id:   {app_key_id(pub)}")
    return 0


def cmd_ledger_key(args: argparse.Namespace) -> int:
    from federation.privacy.ledger import generate_node_key
    from federation.signing import public_key_fingerprint

    if not pki._PARTNER_RE.match(args.partner):
        raise pki.PkiError(f"partner name {args.partner!r} is invalid: use 1-64 letters, digits, '_', '.', '-'")
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = d / f"{args.partner}-ledger.key"
    generate_node_key(key)
    print(f"ledger key: {key} (0600; node config node-key='{key.resolve()}'; keep it outside the ledger's folder)")
    print(f"public key: {key}.pub ({public_key_fingerprint(str(key) + '.pub')}; auditors verify your ledger with it)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    report = pki.check_certs(Path(args.dir), warn_days=args.warn_days)
    width = max(len(r.file) for r in report)
    for r in report:
        print(f"{r.file:<{width}}  not after {r.not_after:%Y-%m-%d %H:%M} UTC  {r.days_left:>5} days  {r.status}")
    bad = [r for r in report if r.status != "ok"]
    if bad:
        print(
            f"{len(bad)} certificate(s) expired or expiring within {args.warn_days} days: "
            f"{', '.join(r.file for r in bad)}; reissue them (fedprop certs init into a new directory).",
            file=sys.stderr,
        )
        return EXIT_EXPIRING
    return 0


def _guarded(command):
    """Wrap a command so a FedpropError becomes one line on stderr and exit code 2 (no traceback)."""

    def run_command(args: argparse.Namespace) -> int:
        try:
            return int(command(args))
        except FedpropError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_ERROR

    return run_command


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``certs`` with subcommands init / node-key / check; each sets ``func(args) -> exit code``."""
    certs = subparsers.add_parser("certs", help="create and check TLS certificates and SuperNode keys")
    sub = certs.add_subparsers(dest="certs_command", required=True)

    init = sub.add_parser("init", help="federation CA, SuperLink certificate, one key pair per partner")
    init.add_argument("dir", help="output directory (must not already hold these files)")
    init.add_argument("--hosts", type=_hosts, required=True,
                      help="comma-separated DNS names/IPs the SuperNodes dial (SANs), e.g. 127.0.0.1,localhost")
    init.add_argument("--partners", type=_partner_names, default=[],
                      help="a count (partner-0..) or comma-separated names; keys go to DIR/nodes/")
    init.add_argument("--days", type=int, default=365, help="certificate validity in days (default 365)")
    init.add_argument("--ca-name", default="fedprop federation CA", help="CA common name")
    init.set_defaults(func=_guarded(cmd_init))

    node_key = sub.add_parser("node-key", help="a SuperNode key pair, generated by the partner itself")
    node_key.add_argument("dir")
    node_key.add_argument("--partner", required=True, help="partner name (becomes NAME.key / NAME.pub)")
    node_key.set_defaults(func=_guarded(cmd_node_key))

    app_key = sub.add_parser("app-key", help="the coordinator's app-signing key pair (nodes run only apps it signs)")
    app_key.add_argument("dir")
    app_key.set_defaults(func=_guarded(cmd_app_key))

    ledger_key = sub.add_parser("ledger-key", help="a partner's Ed25519 ledger-signing key (node config node-key)")
    ledger_key.add_argument("dir")
    ledger_key.add_argument("--partner", required=True, help="partner name (becomes NAME-ledger.key)")
    ledger_key.set_defaults(func=_guarded(cmd_ledger_key))

    check = sub.add_parser("check", help="print certificate expiry; exit 1 if any expired or expiring")
    check.add_argument("dir")
    check.add_argument("--warn-days", type=int, default=30, help="warn this many days ahead (default 30)")
    check.set_defaults(func=_guarded(cmd_check))
    return certs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedprop")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
