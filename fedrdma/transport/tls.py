"""A process's TLS credentials: the federation's CA, its own certificate and key, and what they say.

One federation has one CA (`fedrdma certs init`); the aggregator holds a server certificate
for the host names silos dial, each silo a client certificate whose name is its silo id
(`fedrdma certs issue`). The control plane is mutual TLS with these (gRPC's own TLS); the
data plane's `tcp-e` seals its chunks with keys that travel inside it.

`check` tells a misconfigured side what is wrong before it dials or listens, in words: a
TLS handshake that fails says only "socket closed" to the side that was refused.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedrdma.core.errors import FedRDMAError

log = logging.getLogger(__name__)

CA_FILE = "ca.pem"
"""The federation CA's certificate, in every site's certificate directory."""

SERVER, CLIENT = "aggregator", "silo"
"""The two kinds of certificate: the aggregator's (TLS server), a silo's (TLS client)."""

_PURPOSE = {SERVER: ExtendedKeyUsageOID.SERVER_AUTH, CLIENT: ExtendedKeyUsageOID.CLIENT_AUTH}


class CredentialError(FedRDMAError):
    """Certificates that cannot work; the message names the file, the problem and the fix."""


def cert_file(directory: Path, name: str) -> Path:
    return Path(directory) / f"{name}.pem"


def key_file(directory: Path, name: str) -> Path:
    return Path(directory) / f"{name}.key"


@dataclass(frozen=True)
class Credentials:
    """PEM bytes of the CA, this side's certificate and its key, with the certificate's name."""

    ca: bytes
    cert: bytes
    key: bytes
    name: str
    source: str
    """Where they were read from, for error messages."""

    @classmethod
    def load(cls, directory: Path, name: str) -> Credentials:
        """`ca.pem`, `NAME.pem` and `NAME.key` from a certificate directory (`fedrdma certs`)."""
        directory = Path(directory)
        paths = [directory / CA_FILE, cert_file(directory, name), key_file(directory, name)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise CredentialError(
                f"{', '.join(missing)} missing: a site needs the federation's {CA_FILE} and its own certificate "
                f"and key (`fedrdma certs issue DIR {name} --role ...` makes them)"
            )
        ca, cert, key = (p.read_bytes() for p in paths)
        return cls(ca, cert, key, name, str(directory))

    def certificate(self) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(self.cert)
        except ValueError as exc:
            raise CredentialError(f"{self.source}: {self.name}.pem is not a PEM certificate ({exc})") from None

    def check(self, kind: str, now: datetime.datetime | None = None) -> None:
        """Refuse credentials that the peer would refuse, naming why: before any connection."""
        now = now or datetime.datetime.now(datetime.timezone.utc)
        cert = self.certificate()
        try:
            ca = x509.load_pem_x509_certificate(self.ca)
        except ValueError as exc:
            raise CredentialError(f"{self.source}: {CA_FILE} is not a PEM certificate ({exc})") from None
        where = f"{self.source}/{self.name}.pem"
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise CredentialError(
                f"{where} was not issued by the CA in {self.source}/{CA_FILE}: it belongs to another federation; "
                "issue one from this federation's CA (`fedrdma certs issue`)"
            ) from None
        if now < cert.not_valid_before_utc:
            raise CredentialError(f"{where} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
        if now > cert.not_valid_after_utc:
            raise CredentialError(
                f"{where} expired on {cert.not_valid_after_utc:%Y-%m-%d}: issue a new one (`fedrdma certs issue "
                f"DIR {self.name} --role {kind} --force`)"
            )
        if kind_of(cert) != kind:
            raise CredentialError(
                f"{where} is {'an' if kind_of(cert) == SERVER else 'a'} {kind_of(cert) or 'unknown'} certificate, "
                f"not {'an' if kind == SERVER else 'a'} {kind} certificate: issue one with --role {kind}"
            )
        try:
            key = serialization.load_pem_private_key(self.key, password=None)
        except (ValueError, TypeError) as exc:
            raise CredentialError(f"{self.source}/{self.name}.key is not an unencrypted PEM key ({exc})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise CredentialError(f"{self.source}/{self.name}.key is not the key of {where}")

    @classmethod
    def of_process(cls, directory: Path | None, name: str, kind: str, plaintext_warning: str) -> Credentials | None:
        """A process's credentials, checked before it serves or dials; None with --insecure
        (no directory), which is said out loud with `plaintext_warning`."""
        if directory is None:
            log.warning("the control plane is plaintext (--insecure): %s", plaintext_warning)
            return None
        credentials = cls.load(directory, name)
        credentials.check(kind)
        return credentials



def kind_of(cert: x509.Certificate) -> str:
    """SERVER, CLIENT or "" by the certificate's extended key usage."""
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return ""
    for kind, purpose in _PURPOSE.items():
        if purpose in usages:
            return kind
    return ""


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def peer_name(auth_context: dict[str, list[bytes]]) -> str | None:
    """The name in the certificate a TLS peer presented (gRPC's auth context), or None without TLS."""
    names = auth_context.get("x509_common_name") or []
    return names[0].decode() if names else None
