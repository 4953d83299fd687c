"""Every shell command in README.md and docs/*.md, extracted from the fenced blocks, so the docs cannot drift.

For every command line (``\\`` continuations joined, comments dropped, ``&&``/``;``/``|`` chains split):

* every ``fedprop ...`` line parses with the real CLI (the parser ``fedprop`` builds, without running the
  handler); ``fedprop simulate`` overrides compose against the typed Hydra schema (each value of a ``-m`` sweep);
* every ``--run-config`` key is declared in pyproject's ``[tool.flwr.app.config]`` (Flower refuses others) and is
  read by fedprop (a ``fedprop.*`` key accepted by ``from_run_config``, or an app key the code reads), and every
  ``--node-config`` key is one the node reads;
* every repository path a command names exists (shell redirections and bare file names are the reader's);
* the cheap ones run for real, in the order the coordinator's and the partners' sections give them, in a scratch
  directory: ``certs init``, ``certs app-key``, ``certs node-key``, ``certs ledger-key``, ``budget plan``, and
  ``server start`` / ``client start`` with ``--print-command`` (which builds and checks the full Flower command
  lines). The slow test starts the documented coordinator and one partner node on loopback from the docs'
  own lines, registers the node, lists nodes and submits a 1-round run with the documented ``submit`` line.

Only the hosts, ports and absolute directories are substituted (``SUBST``); the files the guides say are sent
from one side to the other (``ca.crt``, ``app-signing.pub``, a partner's ``.pub``) are copied by ``_hand_over``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
import shutil
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([A-Za-z]*)[^\n]*\n(.*?)^```", re.M | re.S)
SHELL = {"bash", "sh", "shell", "console"}
SEPARATORS = {"&&", "||", ";", "|"}
REDIRECTS = {">", ">>", "<", "2>", "2>>", "&>"}


def _logical_lines(block: str) -> list[str]:
    out, cur = [], ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    if cur:
        out.append(cur)
    return out


def doc_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for every command of every shell block (and bare blocks' lines that start with fedprop)."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            lang, body = m.group(1).lower(), m.group(2)
            if lang and lang not in SHELL:
                continue
            line_no = text[:m.start()].count("\n") + 2
            for i, line in enumerate(_logical_lines(body)):
                if not lang and not line.lstrip().startswith("fedprop "):
                    continue  # a bare block: sample output unless it is a fedprop command
                try:
                    tokens = shlex.split(line, comments=True)
                except ValueError as exc:
                    raise AssertionError(f"{doc.name}:{line_no + i}: not valid shell: {line!r} ({exc})") from exc
                cmd: list[str] = []
                skip = False
                for tok in [*tokens, ";"]:
                    if skip:  # a redirection's target is not an argument
                        skip = False
                        continue
                    if tok in REDIRECTS:
                        skip = True
                        continue
                    if tok in SEPARATORS:
                        if cmd:
                            found.append((f"{doc.relative_to(REPO)}:{line_no + i}", cmd))
                        cmd = []
                    else:
                        cmd.append(tok)
    return found


def fedprop_argv(argv: list[str]) -> list[str] | None:
    """The arguments after ``fedprop`` (also ``.venv/bin/fedprop``), or None if the command is not fedprop."""
    if argv and Path(argv[0]).name == "fedprop":
        return argv[1:]
    return None


COMMANDS = doc_commands()
FEDPROP = [(w, a) for w, cmd in COMMANDS if (a := fedprop_argv(cmd)) is not None]


def test_the_docs_hold_the_commands_this_test_checks():
    """Guards the extraction itself: a regex that stopped matching would make every test below vacuous."""
    subcommands = {tuple(a[:2]) for _, a in FEDPROP}
    for expected in [("certs", "init"), ("certs", "app-key"), ("certs", "node-key"), ("certs", "ledger-key"),
                     ("server", "start"), ("server", "register-node"), ("server", "nodes"), ("server", "submit"),
                     ("client", "start"), ("budget", "verify"), ("budget", "report"), ("score", "--model")]:
        assert expected in subcommands, f"no documented `fedprop {' '.join(expected)}` found"
    assert len(FEDPROP) >= 30


def _parser() -> argparse.ArgumentParser:
    """The parser ``fedprop`` builds (simulations/cli.py:main), without running a handler."""
    from simulations.cli import COMMAND_MODULES

    parser = argparse.ArgumentParser(prog="fedprop")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("simulate")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _parse(argv: list[str]) -> argparse.Namespace | None:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return _parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:  # --help
            return None
        raise AssertionError(f"`fedprop {shlex.join(argv)}` does not parse: {err.getvalue().strip()}") from None


def _compose_simulate(overrides: list[str]) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from federation.config import from_dict
    from simulations.simulate import _register_schema

    multirun = "-m" in overrides or "--multirun" in overrides
    plain = [o for o in overrides if o not in ("-m", "--multirun") and not o.startswith("hydra.")]
    choices: list[list[str]] = []
    if multirun:  # one composition per value of each sweep, the others at their first value
        sweeps = [(o.split("=", 1)[0], o.split("=", 1)[1].split(",")) for o in plain]
        for i, (key, values) in enumerate(sweeps):
            for v in values:
                choices.append([f"{k}={vs[0]}" if j != i else f"{key}={v}" for j, (k, vs) in enumerate(sweeps)])
    else:
        choices = [plain]
    _register_schema()
    for ov in choices:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            from_dict(OmegaConf.to_container(compose(config_name="config", overrides=ov), resolve=True))


@pytest.mark.parametrize("where,argv", FEDPROP, ids=[w for w, _ in FEDPROP])
def test_documented_fedprop_command_parses(where, argv):
    if argv and argv[0] == "simulate":
        _compose_simulate(argv[1:])
        return
    _parse(argv)


def _app_config_keys() -> dict:
    """pyproject's [tool.flwr.app.config], flat as Flower reads it (TOML's dotted keys are nested tables)."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    return flat(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])


def _read_by_code(key: str) -> bool:
    """Whether fedprop's apps read ``key`` (its quoted name appears in their source)."""
    sources = [p for d in ("server", "clients", "federation") for p in (REPO / d).rglob("*.py")]
    return any(f'"{key}"' in p.read_text() for p in sources)


def _documented_option_values(option: str) -> list[tuple[str, str]]:
    out = []
    for where, argv in FEDPROP:
        out += [(where, argv[i + 1]) for i, tok in enumerate(argv[:-1]) if tok == option]
    return out


def test_documented_run_config_keys_are_read_by_fedprop():
    from federation.config import from_run_config
    from server.deploy_cli import parse_run_config

    declared = _app_config_keys()
    values = _documented_option_values("--run-config")
    assert values, "no documented --run-config"
    for where, text in values:
        cfg = parse_run_config([text])
        for key in cfg:
            assert key in declared, f"{where}: run config key {key!r} is not in pyproject [tool.flwr.app.config]"
            if key.startswith("fedprop."):
                continue
            assert _read_by_code(key), f"{where}: run config key {key!r} is declared but fedprop never reads it"
        from_run_config({**declared, **cfg})  # fedprop.* values valid for the typed schema


def test_documented_node_config_keys_are_read_by_the_node():
    from server.deploy_cli import parse_node_config

    values = _documented_option_values("--node-config")
    assert values, "no documented --node-config"
    for where, text in values:
        for key in parse_node_config(text):
            assert _read_by_code(key), f"{where}: node config key {key!r} is read by no fedprop code"


# Relative paths with a folder that are the reader's own (created by an earlier documented command); bare file
# names are always the reader's own.
OWN_FILES = {"fedprop-env/bin/activate", "keys/acme.key", "ledger/acme.sqlite", "ledger-keys/acme-ledger.key",
             "federation-ca/", "keys/", "ledger-keys/"}
TOP = {p.name for p in REPO.iterdir()}


def _path_tokens(argv: list[str]) -> list[str]:
    out = []
    for tok in argv:
        for part in re.split(r"[=,' ]", tok):
            part = part.strip("'\"")
            if not part or part.startswith(("-", "/", "~", "http", "sha256:", "SHA256:")) or "<" in part or "..." in part:
                continue
            if "/" in part or re.search(r"\.(py|ya?ml|md|csv|toml|json|txt)$", part):
                if not re.match(r"^[\w./+-]+$", part) or "=" in part:
                    continue
                out.append(part)
    return out


def test_documented_repository_paths_exist():
    missing = []
    for where, argv in COMMANDS:
        if argv[0] in ("pip", "python3", "python3.11") and "-m" in argv and "venv" in argv:
            continue
        for tok in _path_tokens(argv[1:] if fedprop_argv(argv) is not None else argv):
            rel = tok[2:] if tok.startswith("./") else tok
            first = rel.split("/", 1)[0]
            if tok.startswith("./") or first == "runs" or rel in OWN_FILES or Path(rel).name in OWN_FILES:
                continue  # the reader's own working files
            if "/" not in rel:
                continue  # a bare file name: the reader's own file in its working folder
            if first in TOP:
                if not (REPO / rel).exists():
                    missing.append(f"{where}: {tok}")
            elif "/" in rel and first not in TOP and re.search(r"\.(py|ya?ml|md|toml)$", rel):
                missing.append(f"{where}: {tok} (not a repository path; a typo for one?)")
    assert not missing, "documented paths that do not exist:\n" + "\n".join(missing)


# --------------------------------------------------------------------------------------------- execution

CHEAP = {("certs", "init"), ("certs", "app-key"), ("certs", "node-key"), ("certs", "ledger-key"), ("budget", "plan")}
PRINT_ONLY = {("server", "start"), ("client", "start")}


def _section_commands(doc: str) -> list[list[str]]:
    return [a for w, a in FEDPROP if w.startswith(doc + ":")]


def _subst(argv: list[str], mapping: dict[str, str]) -> list[str]:
    out = []
    for tok in argv:
        for old, new in mapping.items():
            tok = tok.replace(old, new)
        out.append(tok)
    return out


def _hand_over(root: Path) -> None:
    """What the guides say is sent between coordinator and partners (out of band)."""
    (root / "federation-ca").mkdir(exist_ok=True)
    shutil.copy(root / "federation" / "ca.crt", root / "federation-ca" / "ca.crt")
    for dest in (root / "app-signing.pub", root / "etc" / "fedprop" / "app-signing.pub"):
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "coordinator-keys" / "app-signing.pub", dest)


def _substitutions(root: Path, *, fleet: int = 9092, control: int = 9093, node: int = 9094) -> dict[str, str]:
    return {"coordinator.example.org": "localhost", "coordinator.example:": "localhost:",
            "0.0.0.0": "127.0.0.2", "9092": str(fleet), "9093": str(control), "9094": str(node),
            "/etc/fedprop/": f"{root}/etc/fedprop/", "/var/lib/fedprop/": f"{root}/var/lib/fedprop/",
            "/data/": f"{root}/data/"}


def _run_doc(root: Path, argv: list[str], mapping: dict[str, str]):
    from tests.deploy.harness import fedprop

    return fedprop(*_subst(argv, mapping), cwd=root, check=False)


def _run_in_process(argv: list[str], mapping: dict[str, str]):
    """``fedprop ARGV`` through simulations/cli.py:main in this process (the CWD set by the caller)."""
    from types import SimpleNamespace

    from simulations.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(_subst(argv, mapping))
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def test_cheap_documented_commands_run(tmp_path, monkeypatch):
    """The coordinator's and partners' setup lines run as written (hosts/ports/dirs substituted); `server start`
    and `client start` build their Flower command lines (`--print-command`) from the files the setup made."""
    from federation import signing

    root = tmp_path
    monkeypatch.chdir(root)
    mapping = _substitutions(root)
    guide = _section_commands("docs/partner-guide.md")
    coordinator = [a for a in guide if a[:2] in ([["certs", "init"], ["certs", "app-key"]])]
    assert len(coordinator) == 2, coordinator
    ran = []
    for argv in coordinator:  # the coordinator first: the partners need its CA and app key
        res = _run_in_process(argv, mapping)
        assert res.returncode == 0, f"`fedprop {shlex.join(argv)}` failed:\n{res.stdout}{res.stderr}"
        ran.append(argv[:2])
    _hand_over(root)
    mapping["<fingerprint>"] = \
        signing.public_key_fingerprint(root / "app-signing.pub").removeprefix("sha256:")
    for doc in ("docs/partner-guide.md", "README.md"):
        for argv in _section_commands(doc):
            key = tuple(argv[:2])
            if key not in CHEAP | PRINT_ONLY or argv in coordinator:
                continue
            args = [*argv, "--print-command"] if key in PRINT_ONLY else argv
            res = _run_in_process(args, mapping)
            assert res.returncode == 0, f"{doc}: `fedprop {shlex.join(args)}` failed:\n{res.stdout}{res.stderr}"
            if key in PRINT_ONLY:
                assert "flower-super" in res.stdout, res.stdout
            ran.append(argv[:2])
    assert ["server", "start"] in ran and ["client", "start"] in ran and ["certs", "node-key"] in ran, ran


@pytest.mark.slow  # a real coordinator + one partner node on loopback and a 1-round fedprop run: minutes
def test_documented_federation_runs_on_loopback(tmp_path):
    """The partner guide's coordinator section and partner steps, run as written on loopback: `certs init`,
    `certs app-key`, `certs node-key`, `server start`, `server register-node`, `server nodes`, `client start`
    (real data: README's `data synth` event log as the partner's Parquet file, the synthetic-events contract,
    the example policy) and `server submit`. Substituted: hosts, ports, absolute directories; `--superlink`
    is added where a line relies on the default control port; `submit` gets a second `--run-config` for this
    single partner and 1 round (the documented line's own run config stays)."""
    import pandas as pd

    from federation import signing
    from server import deploy
    from tests.deploy.harness import FEDPROP as FEDPROP_BIN, clean_env, fedprop

    root = tmp_path
    fleet, control, node = (deploy.free_port("127.0.0.1") for _ in range(3))
    mapping = {**_substitutions(root, fleet=fleet, control=control, node=node), "0.0.0.0": "127.0.0.1"}
    guide = _section_commands("docs/partner-guide.md")
    by = {}
    for argv in guide:
        by.setdefault(tuple(argv[:2]), argv)
    for key in [("certs", "init"), ("certs", "app-key"), ("certs", "node-key")]:
        res = _run_doc(root, by[key], mapping)
        assert res.returncode == 0, f"`fedprop {shlex.join(by[key])}`:\n{res.stdout}{res.stderr}"
    _hand_over(root)
    pub = next((root / "fedprop-keys").glob("*.pub"))
    shutil.copy(pub, root / pub.name)  # the partner sends only its .pub
    mapping["<fingerprint>"] = signing.public_key_fingerprint(root / "app-signing.pub").removeprefix("sha256:")
    etc = root / "etc" / "fedprop"
    fedprop("certs", "ledger-key", etc / "keys", "--partner", "acme")  # the node-config table's command
    shutil.copy(REPO / "conf" / "contracts" / "synthetic_events.yaml", etc / "contract.yaml")
    shutil.copy(REPO / "docs" / "policy-example.yaml", etc / "policy.yaml")
    synth = next(a for w, a in FEDPROP if w.startswith("README.md") and a[:2] == ["data", "synth"])
    res = _run_doc(root, synth, mapping)
    assert res.returncode == 0, res.stderr
    (root / "data" / "acme").mkdir(parents=True)
    pd.read_csv(root / synth[synth.index("--out") + 1]).to_parquet(root / "data" / "acme" / "events.parquet")
    (root / "var" / "lib" / "fedprop").mkdir(parents=True)

    def with_superlink(argv):
        return argv if "--superlink" in argv else [*argv, "--superlink", f"127.0.0.1:{control}"]

    procs = []
    try:
        server = deploy.ManagedProcess([FEDPROP_BIN, *_subst(by[("server", "start")], mapping)], env=clean_env(),
                                       log_path=root / "server.log", cwd=root)
        procs.append(server)
        deploy.wait_for_port("127.0.0.1", control, timeout=90, process=server)
        deploy.wait_for_port("127.0.0.1", fleet, timeout=90, process=server)
        for key in [("server", "register-node"), ("server", "nodes")]:
            res = _run_doc(root, with_superlink(by[key]), mapping)
            assert res.returncode == 0, f"`fedprop {shlex.join(by[key])}`:\n{res.stdout}{res.stderr}"
        client = deploy.ManagedProcess([FEDPROP_BIN, *_subst(by[("client", "start")], mapping)], env=clean_env(),
                                       log_path=root / "client.log", cwd=root)
        procs.append(client)
        client.wait_for_log("SuperNode ID:", timeout=120)
        nodes = _run_doc(root, with_superlink(by[("server", "nodes")]), mapping)
        assert "1 of 1 registered SuperNodes online" in nodes.stdout, nodes.stdout
        submit = [a if a != "./fedprop" else str(REPO) for a in with_superlink(by[("server", "submit")])]
        submit += ["--run-config", f"fedprop.partners=1 fedprop.rounds=1 fedprop-run-dir='{root / 'run'}'",
                   "--timeout", "900"]
        res = _run_doc(root, submit, mapping)
        assert res.returncode == 0 and "finished:completed" in res.stdout, (
            f"{res.stdout}{res.stderr}\nclient log:\n{client.log_text()[-3000:]}")
        assert (root / "run" / "FEDERATION_DONE").exists()
    finally:
        deploy.stop_all(procs[1:])
        deploy.stop_all(procs[:1])
