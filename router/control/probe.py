"""Check who answers at a node's address before the router sends it anything (mutual TLS only).

gRPC's Python client cannot show the certificate a server presented, so the directory opens one TLS
connection of its own (the router's certificate, the cluster CA as the only trust anchor, ALPN h2) and reads
it: the chain must validate, the certificate must be a node's, and its sha256 must be the fingerprint the node
advertised over mDNS. Only then does the node count as up.
"""

from __future__ import annotations

import functools
import os
import socket
import ssl
import tempfile
from dataclasses import dataclass

from cryptography import x509

from faasmoe.proto import credentials as cr
from faasmoe.proto.errors import Forbidden, NodeUnavailable


@dataclass(frozen=True)
class Verified:
    node_id: str
    fingerprint: str


@functools.lru_cache(maxsize=8)
def _context(tls: cr.TlsMaterial) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=tls.ca_pem.decode())
    context.set_alpn_protocols(["h2"])
    with tempfile.TemporaryDirectory() as tmp:     # ssl loads a key pair from files only; 0700, gone at once
        key, cert = os.path.join(tmp, "k.pem"), os.path.join(tmp, "c.pem")
        for path, data in ((key, tls.key_pem), (cert, tls.cert_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        context.load_cert_chain(cert, key)
    return context


def probe(address: str, tls: cr.TlsMaterial, advertised: str | None, timeout_s: float) -> Verified:
    """The node identity at ``address``; Forbidden when its certificate is not the cluster's or not the one
    advertised (``advertised`` None: any node certificate of the cluster), NodeUnavailable when unreachable."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as sock:
            with _context(tls).wrap_socket(sock, server_hostname=cr.san_of("node")) as conn:
                der = conn.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as exc:
        raise Forbidden(f"it presents a certificate the cluster CA did not sign ({exc.verify_message})",
                        node=address) from None
    except ssl.SSLError as exc:
        raise Forbidden(f"it does not speak mutual TLS with this cluster ({exc.reason or exc})",
                        node=address) from None
    except OSError as exc:
        raise NodeUnavailable(f"unreachable ({exc})", node=address) from None
    if der is None:
        raise Forbidden("it presented no certificate", node=address)
    role, node_id = cr.cert_role(x509.load_der_x509_certificate(der))
    found = cr.fingerprint(der)
    if role != "node":
        raise Forbidden(f"it presents a certificate that is not a node's ({role or 'no role'})", node=address)
    if advertised is not None and found != advertised:
        raise Forbidden(f"it presents certificate {found[:16]}…, not the advertised {advertised[:16]}…",
                        node=address)
    return Verified(node_id, found)
