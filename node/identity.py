"""The node's cluster identity: enrolment with a join token, the files it keeps, renewal.

``faasmoe-node --join TOKEN`` enrols once: the node fetches the cluster CA from the token's address *without
sending anything*, checks its sha256 against the token, then sends the token's secret and a certificate
request over TLS verified against that CA only. It keeps, in ``STORE/identity/`` (mode 0700):

    ca.crt  node.key  node.crt  renew.secret

From then on it serves mutual-TLS gRPC only. Before its certificate expires (a third of its life left) it
renews with the renewal secret; the new certificate applies to new connections.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import ssl
import socket
from dataclasses import dataclass
from pathlib import Path

from faasmoe.proto import credentials as cr
from faasmoe.proto.errors import ConfigError

log = logging.getLogger(__name__)
TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Identity:
    node_id: str
    ca_pem: bytes
    key_pem: bytes
    cert_pem: bytes

    @property
    def fingerprint(self) -> str:
        return cr.fingerprint(cr.load_cert(self.cert_pem))

    @property
    def expires(self) -> float:
        return cr.load_cert(self.cert_pem).not_valid_after_utc.timestamp()

    @property
    def lifetime_s(self) -> float:
        cert = cr.load_cert(self.cert_pem)
        return (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()


def join_token_text(value: str) -> str:
    """``--join TOKEN``, or ``--join @FILE``: the token is the file's first line (read when the node starts,
    which keeps it out of process listings and lets it arrive after the node's configuration)."""
    if not value.startswith("@"):
        return value
    path = value[1:]
    try:
        lines = Path(path).read_text().strip().splitlines()
    except OSError as exc:
        raise ConfigError(f"--join @{path}: cannot read the token file ({exc.strerror})") from None
    if not lines:
        raise ConfigError(f"--join @{path}: the token file is empty")
    return lines[0].strip()


def identity_dir(store_dir: Path) -> Path:
    return Path(store_dir) / "identity"


def load_identity(store_dir: Path, node_id: str) -> Identity | None:
    d = identity_dir(store_dir)
    if not d.exists():                         # a swap was interrupted: take the complete folder
        for candidate in (d.with_name("identity.new"), d.with_name("identity.old")):
            if all((candidate / f).is_file() for f in ("ca.crt", "node.key", "node.crt", "renew.secret", "address")):
                os.rename(candidate, d)
                break
    if not (d / "node.crt").is_file():
        return None
    ident = Identity(node_id, (d / "ca.crt").read_bytes(), (d / "node.key").read_bytes(), (d / "node.crt").read_bytes())
    role, who = cr.cert_role(cr.load_cert(ident.cert_pem))
    if role != "node" or who != node_id:
        raise ConfigError(f"{d}: the certificate there belongs to {role}:{who}, not node:{node_id}; enrol again "
                          "with --join (or give the matching --node-id)")
    return ident


def _request(address: str, method: str, path: str, body: dict | None, context: ssl.SSLContext) -> tuple[int, bytes]:
    """One HTTPS request to the enrolment endpoint; the server must present a router certificate (the name
    ``router.faasmoe``) whatever address it is reached at."""
    host, _, port = address.rpartition(":")
    conn = None
    try:
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=TIMEOUT_S)
        raw = socket.create_connection((host.strip("[]"), int(port)), timeout=TIMEOUT_S)
        conn.sock = context.wrap_socket(raw, server_hostname=cr.san_of("router"))   # a node cannot pose as it
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Host": cr.san_of("router"), "Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read(1 << 20)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise ConfigError(f"cannot reach the cluster at {address} ({exc})") from None
    finally:
        if conn is not None:
            conn.close()


def _post(address: str, path: str, body: dict, ca_pem: bytes) -> dict:
    context = ssl.create_default_context(cadata=ca_pem.decode())     # the pinned CA only
    status, data = _request(address, "POST", path, body, context)
    try:
        reply = json.loads(data)
    except ValueError:
        reply = {}
    if status != 200:
        raise ConfigError(f"the cluster refused: {reply.get('error', f'HTTP {status}')}")
    return reply


def fetch_ca(address: str, ca_sha256: str) -> bytes:
    """The CA certificate at ``address``, checked against the pinned hash (nothing is sent but the GET)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE     # not trusted until its hash matches
    status, body = _request(address, "GET", "/v1/cluster/ca", None, context)
    if status != 200:
        raise ConfigError(f"{address} did not answer with the cluster CA (HTTP {status})")
    ca = cr.load_cert(body)
    if cr.fingerprint(ca) != ca_sha256:
        raise ConfigError(f"the CA at {address} is not the one the join token pins (sha256 "
                          f"{cr.fingerprint(ca)[:16]}…, token {ca_sha256[:16]}…): refusing to enrol")
    return cr.cert_pem(ca)


def enroll(token_text: str, node_id: str, store_dir: Path) -> Identity:
    token = cr.JoinToken.decode(token_text)
    ca_pem = fetch_ca(token.address, token.ca_sha256)
    key = cr.new_key()
    csr = cr.csr_pem(cr.new_csr(key, "node", node_id))
    reply = _post(token.address, "/v1/cluster/enroll",
                  {"token_id": token.token_id, "secret": token.secret, "node_id": node_id, "csr": csr.decode()},
                  ca_pem)
    return _keep(store_dir, node_id, ca_pem, key, reply, token.address)


def renew(ident: Identity, store_dir: Path) -> Identity:
    d = identity_dir(store_dir)
    secret, address = (d / "renew.secret").read_text().strip(), (d / "address").read_text().strip()
    key = cr.new_key()
    csr = cr.csr_pem(cr.new_csr(key, "node", ident.node_id))
    reply = _post(address, "/v1/cluster/renew", {"node_id": ident.node_id, "renew_secret": secret,
                                                  "csr": csr.decode()}, ident.ca_pem)
    return _keep(store_dir, ident.node_id, ident.ca_pem, key, reply, address)


def _keep(store_dir: Path, node_id: str, ca_pem: bytes, key, reply: dict, address: str) -> Identity:
    cert = cr.load_cert(reply["cert"].encode())
    cr.verify_issued(cert, cr.load_cert(ca_pem))
    if cr.cert_role(cert) != ("node", node_id) or cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise ConfigError("the cluster returned a certificate that is not this node's")
    # the whole identity is written to a new folder and swapped in, so a crash never leaves a key that does not
    # match its certificate (load_identity finishes an interrupted swap)
    d = identity_dir(store_dir)
    new, old = d.with_name("identity.new"), d.with_name("identity.old")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True, mode=0o700)
    for name, data in (("ca.crt", ca_pem), ("node.key", cr.key_pem(key)), ("node.crt", cr.cert_pem(cert)),
                       ("renew.secret", reply["renew_secret"].encode()), ("address", address.encode())):
        fd = os.open(new / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    shutil.rmtree(old, ignore_errors=True)
    if d.exists():
        os.rename(d, old)
    os.rename(new, d)
    shutil.rmtree(old, ignore_errors=True)
    return Identity(node_id, ca_pem, cr.key_pem(key), cr.cert_pem(cert))
