"""Fast tests of fedprop's federation PKI and the `fedprop certs` commands (no network, no Flower processes)."""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

from federation import pki
from federation.errors import FedpropError
from server import provision


@pytest.fixture
def certs(tmp_path):
    d = tmp_path / "certs"
    pki.create_ca(d, name="test CA", days=30)
    pki.create_server_cert(d, ca_dir=d, hosts=["127.0.0.1", "localhost", "link.example.org", "::1"], days=10)
    return d


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_server_cert_has_sans_and_chains_to_ca(certs):
    cert = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                            ipaddress.ip_address("::1")}
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "link.example.org"}
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)  # raises if the signature or issuer does not match
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_private_keys_are_0600_even_with_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        d = tmp_path / "k"
        pki.create_ca(d, name="ca", days=1)
        pki.create_server_cert(d, ca_dir=d, hosts=["127.0.0.1"], days=1)
        key, pub = pki.create_node_keypair(d, partner="acme")
    finally:
        os.umask(old)
    for secret in (d / "ca.key", d / "server.key", key):
        assert _mode(secret) == 0o600, secret
    assert _mode(pub) == 0o644
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]  # atomic write left no temp file


def test_node_keypair_is_what_flower_supernode_auth_accepts(tmp_path):
    key_path, pub_path = pki.create_node_keypair(tmp_path, partner="acme")
    # The SuperNode loads the private key with load_ssh_private_key and requires an EC key ...
    private = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    # ... and `flwr supernode register` loads the .pub with Flower's own validator (NIST EC curve only).
    registered = try_load_public_key(pub_path)
    public = serialization.load_ssh_public_key(pub_path.read_bytes())
    assert uses_nist_ec_curve(public)
    assert pub_path.read_text().startswith("ecdsa-sha2-nistp384 ")
    # What the SuperLink stores at registration is what the node presents when it activates.
    assert registered == public_key_to_bytes(private.public_key())


def test_refuses_to_overwrite_and_rejects_bad_input(tmp_path, certs):
    with pytest.raises(pki.PkiError, match="refusing to overwrite"):
        pki.create_ca(certs, name="again", days=1)
    pki.create_node_keypair(tmp_path, partner="acme")
    with pytest.raises(pki.PkiError, match="refusing to overwrite"):
        pki.create_node_keypair(tmp_path, partner="acme")
    with pytest.raises(pki.PkiError, match="partner name"):
        pki.create_node_keypair(tmp_path, partner="../evil")
    with pytest.raises(pki.PkiError, match="hosts is empty"):
        pki.create_server_cert(tmp_path / "s", ca_dir=certs, hosts=[], days=1)
    with pytest.raises(pki.PkiError, match="CA files missing"):
        pki.create_server_cert(tmp_path / "s", ca_dir=tmp_path / "nowhere", hosts=["x"], days=1)
    with pytest.raises(pki.PkiError, match="days"):
        pki.create_ca(tmp_path / "c", name="c", days=0)
    assert issubclass(pki.PkiError, FedpropError)


def test_check_reports_expiry_per_certificate(certs):
    report = pki.check_certs(certs, warn_days=5)
    assert [r.file for r in report] == ["ca.crt", "server.pem"]
    by_file = {r.file: r for r in report}
    assert by_file["ca.crt"].status == "ok" and 28 <= by_file["ca.crt"].days_left <= 30
    assert by_file["server.pem"].status == "ok" and 8 <= by_file["server.pem"].days_left <= 10
    assert pki.check_certs(certs, warn_days=20)[1].status == "expiring"
    file, not_after, days_left, status = report[0]  # a plain tuple shape too
    assert not_after.tzinfo is not None and status == "ok"


def _write_expired_cert(path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "old")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=10))
            .not_valid_after(now - dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_certs_check_cli_exit_codes(certs, capsys):
    assert provision.main(["certs", "check", str(certs), "--warn-days", "5"]) == 0
    out = capsys.readouterr().out
    assert "ca.crt" in out and "server.pem" in out and "ok" in out
    assert provision.main(["certs", "check", str(certs), "--warn-days", "20"]) == provision.EXIT_EXPIRING
    _write_expired_cert(certs / "old.crt")
    assert provision.main(["certs", "check", str(certs), "--warn-days", "5"]) == provision.EXIT_EXPIRING
    captured = capsys.readouterr()
    assert "expired" in captured.out and "old.crt" in captured.err


def test_certs_init_and_node_key_cli_never_print_private_keys(tmp_path, capsys):
    out_dir = tmp_path / "fed"
    assert provision.main(["certs", "init", str(out_dir), "--hosts", "127.0.0.1,localhost",
                           "--partners", "3", "--days", "365"]) == 0
    assert provision.main(["certs", "node-key", str(tmp_path / "own"), "--partner", "acme"]) == 0
    printed = capsys.readouterr()
    assert "PRIVATE KEY" not in printed.out + printed.err
    assert sorted(p.name for p in (out_dir / "nodes").iterdir()) == [
        f"partner-{i}.{ext}" for i in range(3) for ext in ("key", "pub")]
    assert _mode(tmp_path / "own" / "acme.key") == 0o600
    assert [r.status for r in pki.check_certs(out_dir)] == ["ok", "ok"]
    # A second init into the same directory is refused with a message and exit code 2, no traceback.
    assert provision.main(["certs", "init", str(out_dir), "--hosts", "127.0.0.1"]) == provision.EXIT_ERROR
    assert "refusing to overwrite" in capsys.readouterr().err


def test_register_mounts_on_a_foreign_parser():
    parser = argparse.ArgumentParser(prog="fedprop")
    provision.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["certs", "node-key", "/tmp/x", "--partner", "p"])
    assert args.command == "certs" and args.certs_command == "node-key" and callable(args.func)
