"""A throwaway PKI for the TLS tests: a CA, a switch (server) certificate, front-end (client)
certificates good and bad, written as PEM files under a directory the test owns.

Keys are ECDSA P-256: generated in well under a millisecond, so every test can have its own.
Nothing here is secret or kept: the files live in pytest's ``tmp_path``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime.now(dt.timezone.utc)
DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, in memory and as files."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def sha256(self) -> str:
        return self.cert.fingerprint(hashes.SHA256()).hex()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "iso-gateway tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
           chain: tuple[x509.Certificate, ...] = ()) -> Issued:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{stem}.crt"
    key_path = directory / f"{stem}.key"
    cert_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, *chain)))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Issued(cert, key, cert_path, key_path)


class Authority:
    """A CA that issues server and client certificates into ``directory``."""

    def __init__(self, directory: Path, name: str = "Test Root CA", *, not_after: dt.datetime | None = None) -> None:
        self.directory = directory
        key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(name)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - 30 * DAY)
            .not_valid_after(not_after or NOW + 3650 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        self.cert = cert
        self.key = key
        stem = name.lower().replace(" ", "-")
        self.cert_path = directory / f"{stem}.crt"
        directory.mkdir(parents=True, exist_ok=True)
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, stem: str, cn: str, *, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (),
              server: bool = False, not_before: dt.datetime | None = None,
              not_after: dt.datetime | None = None, with_chain: bool = False) -> Issued:
        """A leaf certificate for ``cn`` (SANs ``dns`` and ``ips``), for a server or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or NOW - DAY)
            .not_valid_after(not_after or NOW + 365 * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                  else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return _write(self.directory, stem, cert, key, (self.cert,) if with_chain else ())


@dataclass(frozen=True)
class Pki:
    """Everything a TLS test needs, by role."""

    ca: Authority
    other_ca: Authority  # a CA nobody trusts: what it signs is "wrongly signed"
    server: Issued  # the switch / the gateway's listener: "switch.test", 127.0.0.1
    server_expired: Issued
    server_wrong_name: Issued
    server_other_ca: Issued
    client: Issued  # a front end: CN front-1, SAN front-1.acquirer.test
    client_expired: Issued
    client_other_ca: Issued
    client_wrong_name: Issued  # signed by the right CA, but not a name the listener allows


def make_pki(directory: Path) -> Pki:
    ca = Authority(directory, "Test Root CA")
    other = Authority(directory, "Untrusted CA")
    past = NOW - 10 * DAY
    return Pki(
        ca=ca,
        other_ca=other,
        server=ca.issue("server", "switch.test", dns=("switch.test",), ips=("127.0.0.1",), server=True),
        server_expired=ca.issue("server-expired", "switch.test", dns=("switch.test",), ips=("127.0.0.1",),
                                server=True, not_before=past - 30 * DAY, not_after=past),
        server_wrong_name=ca.issue("server-wrong-name", "elsewhere.test", dns=("elsewhere.test",), server=True),
        server_other_ca=other.issue("server-other-ca", "switch.test", dns=("switch.test",), ips=("127.0.0.1",),
                                    server=True),
        client=ca.issue("client", "front-1", dns=("front-1.acquirer.test",)),
        client_expired=ca.issue("client-expired", "front-1", dns=("front-1.acquirer.test",),
                                not_before=past - 30 * DAY, not_after=past),
        client_other_ca=other.issue("client-other-ca", "front-1", dns=("front-1.acquirer.test",)),
        client_wrong_name=ca.issue("client-wrong-name", "intruder", dns=("intruder.test",)),
    )
