"""The exact Flower 1.41 command lines fedprop builds, checked against Flower's own parsers (fast; nothing
is started)."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from flwr.common.config import parse_config_args

from federation import pki
from federation.signing import generate_keypair, public_key_fingerprint, trusted_entities_yaml
from server import deploy, deploy_cli

VENV_BIN = str(Path(sys.executable).parent)


@pytest.fixture
def certs(tmp_path):
    d = tmp_path / "certs"
    pki.create_ca(d, name="ca", days=2)
    pki.create_server_cert(d, ca_dir=d, hosts=["127.0.0.1"], days=2)
    pki.create_node_keypair(d, partner="p0")
    generate_keypair(d / "app-signing.key", d / "app-signing.pub")
    (d / "superexec.secret").write_bytes(os.urandom(32))
    return d


def _flower_parser(module: str, name: str):
    """Flower's own argparse parser for one of its executables, to check every flag we pass."""
    import importlib

    return getattr(importlib.import_module(module), name)()


def test_superlink_is_loopback_only_with_runtime_auth(certs, tmp_path):
    cmd = deploy.superlink_command(certs_dir=certs, host="127.0.0.1", port=9443, database=tmp_path / "s.db",
                                   superexec_secret=certs / "superexec.secret")
    assert cmd[0] == os.path.join(VENV_BIN, "flower-superlink")
    assert cmd[1:] == [
        "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
        "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth",
        "--disable-runtime-dependency-installation", "--isolation", "process",
        "--superexec-auth-secret-file", str(certs / "superexec.secret"), "--database", str(tmp_path / "s.db"),
        "--host", "127.0.0.1", "--port", "9443",
    ]
    args = _flower_parser("flwr.superlink.cli.flower_superlink", "_parse_args_run_superlink").parse_args(cmd[1:])
    assert (args.isolation, args.host, args.superexec_auth_secret_file) == ("process", "127.0.0.1",
                                                                            str(certs / "superexec.secret"))
    for public in ("0.0.0.0", "192.0.2.7", "fl.example.com", "::"):
        with pytest.raises(deploy.DeployError, match="loopback"):
            deploy.superlink_command(certs_dir=certs, host=public, port=9443, database=tmp_path / "s.db",
                                     superexec_secret=certs / "superexec.secret")


def test_superexec_and_proxy_commands(certs, tmp_path):
    cmd = deploy.superexec_command(certs_dir=certs, runtime_address="127.0.0.1:9093",
                                   superexec_secret=certs / "superexec.secret")
    assert cmd[0] == os.path.join(VENV_BIN, "flower-superexec")
    args = _flower_parser("flwr.supercore.cli.flower_superexec", "_parse_args").parse_args(cmd[1:])
    assert args.runtime_api_address == "127.0.0.1:9093" and args.superexec_auth_secret_file
    assert not args.insecure and not args.runtime_dependency_install
    cmds = deploy.coordinator_commands(certs_dir=certs, fleet_host="0.0.0.0", fleet_port=9092, control_port=9093,
                                       state_dir=tmp_path / "state")
    assert cmds["proxy"][:3] == [sys.executable, "-m", "server.fleet_proxy"]
    assert cmds["proxy"][cmds["proxy"].index("--upstream") + 1] == "127.0.0.1:9093"
    with pytest.raises(deploy.DeployError, match="differ"):
        deploy.coordinator_commands(certs_dir=certs, fleet_host="0.0.0.0", fleet_port=9093, control_port=9093,
                                    state_dir=tmp_path / "state")


def test_supernode_command_pins_the_app_key_and_round_trips_node_config(certs, tmp_path):
    node_config = {"partition-id": 0, "num-partitions": 3, "data-path": "/data/a b.parquet", "dp": True,
                   "budget-epsilon": 2.5}
    trusted = deploy.write_trusted_entities(tmp_path / "te.yaml", certs / "app-signing.pub")
    cmd = deploy.supernode_command(superlink="127.0.0.1:9443", ca_cert=certs / "ca.crt",
                                   private_key=certs / "p0.key", port=9094, node_config=node_config,
                                   trusted_entities=trusted)
    assert cmd[0] == os.path.join(VENV_BIN, "flower-supernode")
    assert cmd[1:13] == ["--superlink", "127.0.0.1:9443", "--root-certificates", str(certs / "ca.crt"),
                         "--auth-supernode-private-key", str(certs / "p0.key"), "--trusted-entities", str(trusted),
                         "--host", "127.0.0.1", "--port", "9094"]
    args = _flower_parser("flwr.supernode.cli.flower_supernode", "_parse_args_run_supernode").parse_args(cmd[1:])
    assert args.trusted_entities == trusted and args.host == "127.0.0.1"
    rendered = cmd[cmd.index("--node-config") + 1]
    assert parse_config_args([rendered]) == node_config  # what flower-supernode will see
    assert deploy_cli.parse_node_config(rendered) == node_config
    from flwr.supernode.cli.flower_supernode import _try_obtain_trusted_entities, _validate_public_keys_ed25519

    entities = _try_obtain_trusted_entities(trusted)  # Flower's own reader and check
    _validate_public_keys_ed25519(entities)
    assert list(entities.values())[0].startswith("ssh-ed25519 ") and len(entities) == 1
    with pytest.raises(deploy.DeployError, match="loopback"):  # the node's runtime API stays local too
        deploy.supernode_command(superlink="127.0.0.1:9443", ca_cert=certs / "ca.crt", private_key=certs / "p0.key",
                                 port=9094, node_config={}, trusted_entities=trusted, host="0.0.0.0")


def test_trusted_entities_refuse_a_key_with_another_fingerprint(certs, tmp_path):
    from federation.signing import SigningKeyError

    generate_keypair(tmp_path / "evil.key", tmp_path / "evil.pub")
    good = public_key_fingerprint(certs / "app-signing.pub")
    assert yaml.safe_load(trusted_entities_yaml(certs / "app-signing.pub", expected_fingerprint=good))
    with pytest.raises(SigningKeyError, match="not the pinned"):
        trusted_entities_yaml(tmp_path / "evil.pub", expected_fingerprint=good)


@pytest.mark.parametrize("bad", [{"k": [1]}, {"bad key": 1}, {"k": 'say "hi"'}])
def test_node_config_rejects_what_flower_cannot_carry(bad):
    with pytest.raises(deploy.DeployError):
        deploy.format_node_config(bad)


def test_missing_files_and_bad_addresses_fail_early(certs, tmp_path):
    te = deploy.write_trusted_entities(tmp_path / "te.yaml", certs / "app-signing.pub")
    with pytest.raises(deploy.DeployError, match="private key not found"):
        deploy.supernode_command(superlink="127.0.0.1:1", ca_cert=certs / "ca.crt", trusted_entities=te,
                                 private_key=tmp_path / "nope.key", port=9094, node_config={})
    with pytest.raises(deploy.DeployError, match="trusted-entities file not found"):
        deploy.supernode_command(superlink="127.0.0.1:1", ca_cert=certs / "ca.crt", trusted_entities=tmp_path / "x",
                                 private_key=certs / "p0.key", port=9094, node_config={})
    with pytest.raises(deploy.DeployError, match="HOST:PORT"):
        deploy.supernode_command(superlink="https://127.0.0.1", ca_cert=certs / "ca.crt", trusted_entities=te,
                                 private_key=certs / "p0.key", port=9094, node_config={})
    with pytest.raises(deploy.DeployError, match="port"):
        deploy.superlink_command(certs_dir=certs, host="127.0.0.1", port=70000, database=tmp_path / "s.db",
                                 superexec_secret=certs / "superexec.secret")


def test_certificate_without_loopback_san_is_refused(tmp_path):
    d = tmp_path / "c"
    pki.create_ca(d, name="ca", days=2)
    pki.create_server_cert(d, ca_dir=d, hosts=["fl.example.com"], days=2)
    with pytest.raises(deploy.DeployError, match="127.0.0.1"):
        deploy.check_loopback_san(d)


def test_superexec_secret_is_random_private_and_kept(tmp_path):
    a = deploy.ensure_superexec_secret(tmp_path)
    assert (a.stat().st_mode & 0o777) == 0o600 and len(a.read_bytes()) == 32
    assert deploy.ensure_superexec_secret(tmp_path).read_bytes() == a.read_bytes()
    b = deploy.ensure_superexec_secret(tmp_path / "other")
    assert a.read_bytes() != b.read_bytes()
    os.chmod(a, 0o644)
    with pytest.raises(deploy.DeployError, match="chmod 600"):
        deploy.ensure_superexec_secret(tmp_path)


def test_flower_children_are_found_without_an_activated_venv(tmp_path, monkeypatch):
    """Flower starts flower-superexec, flwr-serverapp and flwr-clientapp by bare name: the environment of
    every Flower process fedprop starts puts this interpreter's bin/ first on PATH."""
    import shutil

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = deploy.flower_env(tmp_path)
    assert env["PATH"].split(os.pathsep)[0] == VENV_BIN
    for name in ("flower-superexec", "flwr-serverapp", "flwr-clientapp", "flower-supernode", "flower-superlink"):
        assert shutil.which(name, path=env["PATH"]) == os.path.join(VENV_BIN, name)
        assert deploy.flower_executable(name) == os.path.join(VENV_BIN, name)


def test_cli_connection_config_toml(certs, tmp_path):
    import tomllib

    conn = deploy.write_cli_connection(tmp_path / "home", address="127.0.0.1:9443",
                                       root_certificates=certs / "ca.crt")
    config = tomllib.loads((tmp_path / "home" / "config.toml").read_text())
    assert config == {"superlink": {"default": "fedprop", "fedprop": {
        "address": "127.0.0.1:9443", "root-certificates": str(certs / "ca.crt")}}}
    env = conn.env()
    assert env["FLWR_HOME"] == str(tmp_path / "home") and env["FLWR_TELEMETRY_ENABLED"] == "0"


def test_start_commands_print_exact_flower_lines(certs, tmp_path, capsys):
    assert deploy_cli.main(["server", "start", "--certs", str(certs), "--port", "9443",
                            "--state-dir", str(tmp_path / "sl"), "--print-command"]) == 0
    fp = public_key_fingerprint(certs / "app-signing.pub")
    assert deploy_cli.main(["client", "start", "--certs", str(certs), "--superlink", "127.0.0.1:9443",
                            "--key", str(certs / "p0.key"), "--node-config", "partition-id=0 num-partitions=3",
                            "--app-public-key", str(certs / "app-signing.pub"), "--app-key-fingerprint", fp,
                            "--state-dir", str(tmp_path / "node"), "--print-command"]) == 0
    lines = [ln for ln in capsys.readouterr().out.strip().splitlines() if not ln.startswith("#")]
    superlink_line, superexec_line, proxy_line, client_line = lines
    assert "--enable-supernode-auth" in shlex.split(superlink_line)
    assert shlex.split(superlink_line)[-4:] == ["--host", "127.0.0.1", "--port", "9093"]
    assert "--superexec-auth-secret-file" in shlex.split(superexec_line)
    proxy = shlex.split(proxy_line)
    assert proxy[proxy.index("--listen") + 1] == "0.0.0.0:9443" and proxy[proxy.index("--upstream") + 1] == "127.0.0.1:9093"
    assert shlex.split(client_line)[-2:] == ["--node-config", "partition-id=0 num-partitions=3"]
    assert not (tmp_path / "node").exists() and not (tmp_path / "sl").exists()  # --print-command creates nothing
    generate_keypair(tmp_path / "evil.key", tmp_path / "evil.pub")
    base = ["client", "start", "--certs", str(certs), "--superlink", "127.0.0.1:9443", "--key", str(certs / "p0.key"),
            "--print-command"]
    assert deploy_cli.main([*base, "--node-config", "partition-id=0 junk", "--app-public-key",
                            str(certs / "app-signing.pub")]) == deploy_cli.EXIT_ERROR
    assert deploy_cli.main([*base, "--app-public-key", str(tmp_path / "evil.pub"),
                            "--app-key-fingerprint", fp]) == deploy_cli.EXIT_ERROR  # wrong key for the pin
    with pytest.raises(SystemExit):  # no app key: argparse refuses, nothing runs
        deploy_cli.main(base)
    with pytest.raises(SystemExit):  # submit without the app-signing key
        deploy_cli.main(["server", "submit", str(tmp_path), "--certs", str(certs)])


def test_run_config_flags_merge_in_order():
    assert deploy_cli.parse_run_config(["num-server-rounds=2", 'a="x" num-server-rounds=3']) == {
        "num-server-rounds": 3, "a": "x"}
