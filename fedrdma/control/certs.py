"""A federation's certificates: one CA, a server certificate for the aggregator, one client
certificate per silo (`fedrdma certs init` and `fedrdma certs issue`).

Everything cryptographic is the `cryptography` package's; this module only chooses: ECDSA
P-256 keys, certificates that expire, the aggregator's host names as subject alternative
names, a silo's id as its certificate's name. Keys are written readable by their owner
only. The CA's key stays with whoever runs the federation: sites get `ca.pem` and their own
pair, never `ca.key`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedrdma.config import SILO_ID_PATTERN
from fedrdma.core.addresses import LOOPBACK_HOST
from fedrdma.transport.tls import CA_FILE, CLIENT, SERVER, CredentialError, cert_file, key_file

CA_KEY_FILE = "ca.key"
"""The CA's private key, next to `ca.pem` where the federation's certificates are made."""

CA_DAYS = 3650
"""A CA outlives many rounds of site certificates; rotating it means re-issuing every site's."""

CERT_DAYS = 365
"""Site certificates expire yearly: a stolen key stops working without anyone revoking it."""

CLOCK_SKEW = datetime.timedelta(minutes=5)
"""Certificates are valid from a little before now: sites whose clocks run behind still accept them."""

DEFAULT_HOSTS = ("localhost", LOOPBACK_HOST)
"""The aggregator's names when none are given: enough for a federation on one host."""

KEY_MODE = 0o600
"""Private keys are readable by their owner only."""

_NAME = re.compile(SILO_ID_PATTERN)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    """Before anything is written: a half-replaced pair would match nothing."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise CredentialError(f"{', '.join(existing)} exist(s): pass --force to replace (rotation)")


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, force: bool) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, KEY_MODE)
    except FileExistsError:
        raise CredentialError(f"{path} exists: pass --force to replace it (rotation)") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, KEY_MODE)  # an existing file replaced with --force keeps no wider mode


def _write_cert(path: Path, cert: x509.Certificate, force: bool) -> None:
    if path.exists() and not force:
        raise CredentialError(f"{path} exists: pass --force to replace it (rotation)")
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def init_ca(directory: Path, name: str = "fedrdma federation CA", days: int = CA_DAYS, force: bool = False) -> Path:
    """Create the federation's CA in `directory`: `ca.pem` and `ca.key`. Returns the certificate's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _refuse_existing([directory / CA_KEY_FILE, directory / CA_FILE], force)
    _write_key(directory / CA_KEY_FILE, key, force)
    _write_cert(directory / CA_FILE, cert, force)
    return directory / CA_FILE


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue(
    directory: Path, name: str, kind: str, hosts: Sequence[str] = (), days: int = CERT_DAYS,
    force: bool = False, now: datetime.datetime | None = None,
) -> tuple[Path, Path]:
    """Issue `NAME.pem` and `NAME.key` in `directory` from its CA: an aggregator's or a silo's.

    An aggregator's certificate names the hosts silos dial (DNS names or IP addresses); a
    silo's is named by its silo id, which is how the aggregator knows it. `now` moves the
    validity window (tests issue expired certificates with it).
    """
    directory = Path(directory)
    if kind not in (SERVER, CLIENT):
        raise CredentialError(f"a certificate is for an {SERVER} or a {CLIENT}, not {kind!r}")
    if not _NAME.match(name):
        raise CredentialError(f"{name!r} cannot name a certificate: use letters, digits, '_', '.', '-' (1-64)")
    if kind == CLIENT and hosts:
        raise CredentialError("--host names the aggregator's addresses; a silo's certificate is named by its id alone")
    try:
        ca_key = serialization.load_pem_private_key((directory / CA_KEY_FILE).read_bytes(), password=None)
        ca = x509.load_pem_x509_certificate((directory / CA_FILE).read_bytes())
    except FileNotFoundError:
        raise CredentialError(f"{directory} holds no CA: run `fedrdma certs init {directory}` first") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CredentialError(f"{directory / CA_KEY_FILE} is not a key fedrdma made")
    key = _new_key()
    start = now or datetime.datetime.now(datetime.timezone.utc)
    purpose = ExtendedKeyUsageOID.SERVER_AUTH if kind == SERVER else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if kind == SERVER:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(h) for h in (hosts or DEFAULT_HOSTS)]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    _refuse_existing([key_file(directory, name), cert_file(directory, name)], force)
    _write_key(key_file(directory, name), key, force)
    _write_cert(cert_file(directory, name), cert, force)
    return cert_file(directory, name), key_file(directory, name)
