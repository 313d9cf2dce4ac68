"""Cluster identity, shared by node and router (the ``cryptography`` package; nothing shells out to openssl).

- A cluster has one CA (EC P-256). It signs a certificate per identity; the identity's role is the first part
  of its common name: ``router:<id>`` or ``node:<id>``. Every certificate carries the DNS name ``faasmoe`` so
  TLS can check the chain whatever address a node is reached at; the CA is the only trust anchor.
- A join token pins the CA by the sha256 of its DER encoding and carries a one-time secret and where to enrol:
  ``fmj1.<base64url(JSON)>``. The node checks the CA's hash before it sends anything.
- A certificate's fingerprint (sha256 of its DER) is what a node advertises over mDNS and what the router
  checks against the certificate the node presents.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from faasmoe.proto.errors import ConfigError

TOKEN_PREFIX = "fmj1."
def san_of(role: str) -> str:
    """The DNS name a certificate of ``role`` carries, and the TLS target name its peers check: a router dials
    nodes expecting "node.faasmoe" (so a router certificate cannot pose as a node), and a node dials the
    enrolment endpoint expecting "router.faasmoe" (so an enrolled node cannot pose as the enrolment server)."""
    return f"{role}.faasmoe"
ROLES = ("router", "node")


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_key(pem: bytes):
    return serialization.load_pem_private_key(pem, password=None)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate ({exc})") from None


def fingerprint(cert: x509.Certificate | bytes) -> str:
    """sha256 hex of a certificate's DER (``bytes``: DER already)."""
    der = cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def new_ca(name: str, days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"faasmoe cluster CA {name}")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now() - datetime.timedelta(minutes=5))
            .not_valid_after(now() + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def new_csr(key, role: str, identity: str) -> x509.CertificateSigningRequest:
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{role}:{identity}")]))
            .sign(key, hashes.SHA256()))


def csr_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def issue(ca_key, ca_cert: x509.Certificate, csr: x509.CertificateSigningRequest, role: str, identity: str,
          days: float) -> x509.Certificate:
    """Sign ``csr``'s key as ``role:identity`` (the CSR's own subject is not trusted)."""
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}")
    if not csr.is_signature_valid:
        raise ConfigError("the certificate request's signature is invalid")
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{role}:{identity}")]))
            .issuer_name(ca_cert.subject).public_key(csr.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now() - datetime.timedelta(minutes=5))
            .not_valid_after(now() + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(san_of(role))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                  x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))


def role_of(common_name: str) -> tuple[str, str]:
    role, _, identity = common_name.partition(":")
    return (role, identity) if role in ROLES and identity else ("", "")


def cert_role(cert: x509.Certificate) -> tuple[str, str]:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return role_of(names[0].value) if names else ("", "")


def verify_issued(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    """Raise ConfigError unless ``cert`` is signed by ``ca_cert`` and valid now."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except Exception as exc:  # noqa: BLE001 - InvalidSignature, ValueError, TypeError
        raise ConfigError(f"the certificate is not signed by the cluster CA ({type(exc).__name__})") from None
    if not cert.not_valid_before_utc <= now() <= cert.not_valid_after_utc:
        raise ConfigError("the certificate is not valid now")


@dataclass(frozen=True)
class TlsMaterial:
    """What one side needs for mutual TLS: the CA to trust, its own key and certificate (PEM)."""

    ca_pem: bytes
    key_pem: bytes
    cert_pem: bytes


@dataclass(frozen=True)
class JoinToken:
    ca_sha256: str          # the CA certificate's DER, hashed
    address: str            # host:port of the enrolment endpoint
    token_id: str
    secret: str
    expires: float          # unix seconds

    def encode(self) -> str:
        raw = json.dumps({"v": 1, "ca": self.ca_sha256, "addr": self.address, "id": self.token_id,
                          "secret": self.secret, "exp": self.expires}, separators=(",", ":")).encode()
        return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @staticmethod
    def decode(text: str) -> JoinToken:
        if not text.startswith(TOKEN_PREFIX):
            raise ConfigError("not a faasmoe join token (they start with fmj1.): copy it whole from "
                              "'faasmoe-router init-cluster' or 'faasmoe-router tokens create'")
        body = text[len(TOKEN_PREFIX):]
        try:
            raw = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            return JoinToken(str(raw["ca"]), str(raw["addr"]), str(raw["id"]), str(raw["secret"]), float(raw["exp"]))
        except (ValueError, KeyError, TypeError):
            raise ConfigError("the join token is damaged: copy it whole") from None


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
