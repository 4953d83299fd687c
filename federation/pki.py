"""Key material for a fedprop federation on Flower's deployment engine (uses `cryptography` only).

What it creates, into a directory the operator names:

- ``ca.crt`` / ``ca.key``: the federation CA (self-signed, EC P-384). SuperNodes and the ``flwr`` CLI trust
  it (``--root-certificates`` / ``root-certificates``); the SuperLink gets it as ``--ssl-ca-certfile``.
- ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by the CA, with every host name
  and IP the nodes dial as a SubjectAltName (TLS clients check the SAN, not the CN).
- ``<partner>.key`` / ``<partner>.pub``: a SuperNode authentication key pair. Flower 1.41 accepts EC keys on
  NIST curves only (``flwr.supercore.primitives.asymmetric.uses_nist_ec_curve``), the private key in OpenSSH
  format (``load_ssh_private_key``), the public key as an OpenSSH line (``load_ssh_public_key``). We use
  P-384, the curve Flower's own docs and ``flwr supernode register --help`` name.

Private keys are created with ``os.open(..., 0o600)`` under a temporary name and renamed into place, so no
other user can read them at any moment and a crash never leaves a half-written key. They are never printed
or logged. A partner can run :func:`create_node_keypair` on its own machine and send only the ``.pub``.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from typing import NamedTuple
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.errors import FedpropError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
_CURVE = ec.SECP384R1
_PARTNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PkiError(FedpropError):
    """Key material is missing, malformed, or a request for it is invalid."""


class CertStatus(NamedTuple):
    """Expiry of one certificate file, as reported by :func:`check_certs`."""

    file: str
    not_after: dt.datetime
    days_left: int
    status: str  # "ok" | "expiring" | "expired"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret atomically with mode 0600: temp file created 0600, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask can only remove bits; make the mode exact anyway
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _refuse_overwrite(*paths: Path) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise PkiError(
            f"refusing to overwrite existing key material: {', '.join(existing)}. Overwriting a key silently "
            "would lock out nodes or servers that use it; delete the files yourself or pick another directory."
        )


def _check_days(days: int) -> None:
    if not isinstance(days, int) or isinstance(days, bool) or days < 1:
        raise PkiError(f"days must be a positive integer, got {days!r}")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def create_ca(out_dir: str | Path, *, name: str, days: int) -> Path:
    """Create a self-signed federation CA (``ca.crt``, ``ca.key``) in ``out_dir``; return the cert path."""
    _check_days(days)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    _refuse_overwrite(cert_path, key_path)
    key = ec.generate_private_key(_CURVE())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_private(key_path, _pem_key(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def _san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    if not hosts:
        raise PkiError("hosts is empty: the server certificate needs every DNS name/IP that nodes dial")
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        if not host:
            raise PkiError(f"empty host name in {hosts!r}")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    missing = [str(p) for p in (cert_path, key_path) if not p.is_file()]
    if missing:
        raise PkiError(f"CA files missing: {', '.join(missing)}; run create_ca / `fedprop certs init` first")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path} is not an EC private key")
    return cert, key


def create_server_cert(out_dir: str | Path, *, ca_dir: str | Path, hosts: list[str], days: int) -> Path:
    """Create the SuperLink TLS certificate (``server.pem``, ``server.key``) signed by the CA in ``ca_dir``.

    ``hosts`` become SubjectAltNames: IP literals as IP entries, anything else as DNS entries.
    """
    _check_days(days)
    sans = _san_entries(hosts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / SERVER_CERT, out / SERVER_KEY
    _refuse_overwrite(cert_path, key_path)
    ca_cert, ca_key = _load_ca(Path(ca_dir))
    key = ec.generate_private_key(_CURVE())
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0].strip())]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(key_path, _pem_key(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def create_node_keypair(out_dir: str | Path, *, partner: str) -> tuple[Path, Path]:
    """Create a SuperNode auth key pair ``<partner>.key`` (OpenSSH private, 0600) and ``<partner>.pub``.

    Returns ``(private_key_path, public_key_path)``. Only the ``.pub`` ever leaves the partner.
    """
    if not isinstance(partner, str) or not _PARTNER_RE.match(partner):
        raise PkiError(
            f"partner name {partner!r} is invalid: use 1-64 letters, digits, '_', '.', '-' "
            "(it becomes a file name)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out / f"{partner}.key", out / f"{partner}.pub"
    _refuse_overwrite(key_path, pub_path)
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_private(key_path, private)
    _write_public(pub_path, public + f" fedprop-{partner}\n".encode())
    return key_path, pub_path


def check_certs(directory: str | Path, *, warn_days: int = 30) -> list[CertStatus]:
    """Report the expiry of every certificate (``*.crt``, ``*.pem``) in ``directory``, sorted by file name.

    status is "expired" when not_after has passed, "expiring" within ``warn_days``, else "ok".
    Raises PkiError if the directory holds no certificate or a file is not a PEM certificate.
    """
    d = Path(directory)
    if not d.is_dir():
        raise PkiError(f"{d} is not a directory")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix in (".crt", ".pem"))
    if not files:
        raise PkiError(f"no certificates (*.crt, *.pem) in {d}")
    now = _now()
    report: list[CertStatus] = []
    for path in files:
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except ValueError as err:
            raise PkiError(f"{path} is not a PEM certificate: {err}") from err
        not_after = cert.not_valid_after_utc
        seconds_left = (not_after - now).total_seconds()
        days_left = int(seconds_left // 86400)
        if seconds_left <= 0:
            status = "expired"
        elif seconds_left <= warn_days * 86400:
            status = "expiring"
        else:
            status = "ok"
        report.append(CertStatus(path.name, not_after, days_left, status))
    return report
