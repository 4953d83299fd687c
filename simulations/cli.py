"""The `fedprop` command. Subcommand groups live next to the code they drive; each module exposes
``register(subparsers)``. ``simulate`` hands the rest of the command line to Hydra."""
from __future__ import annotations

import argparse
import importlib
import sys

# Closed table of command modules (never a module named by user input).
COMMAND_MODULES: tuple[str, ...] = (
    "clients.data_cli",  # fedprop data check|propose
    "federation.privacy.cli",  # fedprop budget plan|report|verify
    "server.provision",  # fedprop certs init|node-key|check
    "server.deploy_cli",  # fedprop server start|register-node|submit, fedprop client start
    "simulations.synth_cli",  # fedprop data synth (after clients.data_cli: adds to its `data` group)
    "simulations.report",  # fedprop report RUN_DIR|SWEEP_DIR
    "clients.score",  # fedprop score (a partner scores its customers with a signed global model)
    "clients.personalise_cli",  # fedprop personalise (a partner's own model from the global one, on its node)
    "clients.audit",  # fedprop audit (empirical lower bound on epsilon from one run with canaries)
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "simulate":
        from simulations.simulate import hydra_main

        return hydra_main(argv[1:])
    parser = argparse.ArgumentParser(prog="fedprop", description="Privacy-preserving federated churn and propensity models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("simulate", help="run a simulation (Hydra overrides follow, e.g. partners=8 privacy.epsilon=3; -m for sweeps)")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
