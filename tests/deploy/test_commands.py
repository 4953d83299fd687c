"""The exact Flower 1.41 command lines fedprop builds (fast; nothing is started)."""
from __future__ import annotations

import shlex

import pytest
from flwr.common.config import parse_config_args

from federation import pki
from server import deploy, deploy_cli


@pytest.fixture
def certs(tmp_path):
    d = tmp_path / "certs"
    pki.create_ca(d, name="ca", days=2)
    pki.create_server_cert(d, ca_dir=d, hosts=["127.0.0.1"], days=2)
    pki.create_node_keypair(d, partner="p0")
    return d


def test_superlink_command_enables_tls_auth_and_offline_mode(certs, tmp_path):
    cmd = deploy.superlink_command(certs_dir=certs, host="127.0.0.1", port=9443, database=tmp_path / "s.db")
    assert cmd[0].endswith("flower-superlink")
    assert cmd[1:] == [
        "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
        "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth",
        "--disable-runtime-dependency-installation", "--database", str(tmp_path / "s.db"),
        "--host", "127.0.0.1", "--port", "9443",
    ]
    assert "--insecure" not in cmd


def test_supernode_command_and_node_config_round_trip_through_flowers_parser(certs):
    node_config = {"partition-id": 0, "num-partitions": 3, "data-path": "/data/a b.parquet", "dp": True,
                   "budget-epsilon": 2.5}
    cmd = deploy.supernode_command(superlink="127.0.0.1:9443", ca_cert=certs / "ca.crt",
                                   private_key=certs / "p0.key", port=9094, node_config=node_config)
    assert cmd[1:11] == ["--superlink", "127.0.0.1:9443", "--root-certificates", str(certs / "ca.crt"),
                         "--auth-supernode-private-key", str(certs / "p0.key"), "--host", "127.0.0.1",
                         "--port", "9094"]
    rendered = cmd[cmd.index("--node-config") + 1]
    assert parse_config_args([rendered]) == node_config  # what flower-supernode will see
    assert deploy_cli.parse_node_config(rendered) == node_config


@pytest.mark.parametrize("bad", [{"k": [1]}, {"bad key": 1}, {"k": 'say "hi"'}])
def test_node_config_rejects_what_flower_cannot_carry(bad):
    with pytest.raises(deploy.DeployError):
        deploy.format_node_config(bad)


def test_missing_files_and_bad_addresses_fail_early(certs, tmp_path):
    with pytest.raises(deploy.DeployError, match="private key not found"):
        deploy.supernode_command(superlink="127.0.0.1:1", ca_cert=certs / "ca.crt",
                                 private_key=tmp_path / "nope.key", port=9094, node_config={})
    with pytest.raises(deploy.DeployError, match="HOST:PORT"):
        deploy.supernode_command(superlink="https://127.0.0.1", ca_cert=certs / "ca.crt",
                                 private_key=certs / "p0.key", port=9094, node_config={})
    with pytest.raises(deploy.DeployError, match="port"):
        deploy.superlink_command(certs_dir=certs, host="127.0.0.1", port=70000, database=tmp_path / "s.db")


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
    assert deploy_cli.main(["client", "start", "--certs", str(certs), "--superlink", "127.0.0.1:9443",
                            "--key", str(certs / "p0.key"), "--node-config", "partition-id=0 num-partitions=3",
                            "--print-command"]) == 0
    server_line, client_line = capsys.readouterr().out.strip().splitlines()
    assert "--enable-supernode-auth" in shlex.split(server_line)
    assert shlex.split(client_line)[-2:] == ["--node-config", "partition-id=0 num-partitions=3"]
    assert not (tmp_path / "sl").exists()  # --print-command runs and creates nothing
    assert deploy_cli.main(["client", "start", "--certs", str(certs), "--superlink", "127.0.0.1:9443",
                            "--key", str(certs / "p0.key"), "--node-config", "partition-id=0 junk",
                            "--print-command"]) == deploy_cli.EXIT_ERROR
