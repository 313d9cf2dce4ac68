"""The cluster's authority, kept by the router in a folder (``faasmoe-router init-cluster --dir DIR``):

    DIR/ca.key, ca.crt          the cluster CA (the key never leaves this folder)
    DIR/router.key, router.crt  the router's own identity (role router: may Deploy and Undeploy)
    DIR/cluster.json            the enrolment address and every join token (only its secret's sha256), with
                                its expiry and whether it was revoked; the nodes enrolled and their renewal
                                secrets (hashed)

Join tokens are multi-use until they expire or are revoked; a node presents one once, with a certificate
request, and gets a node certificate and a renewal secret. It renews with that secret before the certificate
expires; revoking a node's token stops its renewals.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from contextlib import contextmanager
from pathlib import Path

from cryptography import x509

from faasmoe.proto import credentials as cr
from faasmoe.proto.errors import ConfigError, Unauthorized

NODE_CERT_DAYS = 30.0
ROUTER_CERT_DAYS = 365.0


class Cluster:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not (self.dir / "ca.crt").is_file():
            raise ConfigError(f"{self.dir}: no cluster here (make one with 'faasmoe-router init-cluster --dir "
                              f"{self.dir}')")
        self.ca_cert = cr.load_cert((self.dir / "ca.crt").read_bytes())

    @classmethod
    def init(cls, directory: str | Path, enroll_address: str, name: str = "faasmoe") -> Cluster:
        d = Path(directory)
        if (d / "ca.crt").exists():
            raise ConfigError(f"{d}: a cluster exists already")
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        ca_key, ca_cert = cr.new_ca(name)
        _write(d / "ca.key", cr.key_pem(ca_key), 0o600)
        _write(d / "ca.crt", cr.cert_pem(ca_cert), 0o644)
        key = cr.new_key()
        cert = cr.issue(ca_key, ca_cert, cr.new_csr(key, "router", name), "router", name, ROUTER_CERT_DAYS)
        _write(d / "router.key", cr.key_pem(key), 0o600)
        _write(d / "router.crt", cr.cert_pem(cert), 0o644)
        _write(d / "cluster.json", json.dumps({"address": enroll_address, "tokens": {}, "nodes": {}}).encode(), 0o600)
        return cls(d)

    @property
    def router_tls(self) -> cr.TlsMaterial:
        return cr.TlsMaterial((self.dir / "ca.crt").read_bytes(), (self.dir / "router.key").read_bytes(),
                           (self.dir / "router.crt").read_bytes())

    @contextmanager
    def _state(self):
        with open(self.dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = json.loads((self.dir / "cluster.json").read_text())
            yield state
            _write(self.dir / "cluster.json", json.dumps(state, indent=1).encode(), 0o600)

    @property
    def address(self) -> str:
        return json.loads((self.dir / "cluster.json").read_text())["address"]

    def set_address(self, address: str) -> None:
        """Where nodes enrol (written into the join tokens created from now on)."""
        with self._state() as state:
            state["address"] = address

    def listen_address(self, listen: str | None = None) -> tuple[str, int]:
        """(host, port) the enrolment endpoint binds: ``listen``, or every interface at the address's port."""
        text = listen or f"0.0.0.0:{self.address.rpartition(':')[2]}"
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError(f"{text!r} is not HOST:PORT")
        return host.strip("[]"), int(port)

    def nodes(self) -> dict:
        return json.loads((self.dir / "cluster.json").read_text())["nodes"]

    # -- tokens ----------------------------------------------------------------------------------------
    def create_token(self, ttl_s: float) -> cr.JoinToken:
        secret, token_id = cr.new_secret(), secrets.token_hex(6)
        expires = time.time() + ttl_s
        with self._state() as state:
            state["tokens"][token_id] = {"sha256": cr.secret_hash(secret), "expires": expires, "revoked": False}
            address = state["address"]
        return cr.JoinToken(cr.fingerprint(self.ca_cert), address, token_id, secret, expires)

    def revoke(self, token_id: str) -> None:
        with self._state() as state:
            if token_id not in state["tokens"]:
                raise ConfigError(f"no token {token_id!r}")
            state["tokens"][token_id]["revoked"] = True

    def tokens(self) -> dict:
        return json.loads((self.dir / "cluster.json").read_text())["tokens"]

    # -- certificates ----------------------------------------------------------------------------------
    def _sign(self, csr_pem: bytes, role: str, identity: str, days: float) -> bytes:
        ca_key = cr.load_key((self.dir / "ca.key").read_bytes())
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise Unauthorized("not a PEM certificate request") from None
        return cr.cert_pem(cr.issue(ca_key, self.ca_cert, csr, role, identity, days))

    def enroll(self, token_id: str, secret: str, node_id: str, csr_pem: bytes) -> tuple[bytes, str]:
        """A node presents a join token: its certificate and renewal secret, or Unauthorized."""
        if not node_id or len(node_id) > 128 or not all(c.isalnum() or c in "-_." for c in node_id):
            raise Unauthorized("node ids are 1-128 letters, digits, '-', '_' or '.'")
        with self._state() as state:
            token = state["tokens"].get(token_id)
            if token is None or not secrets.compare_digest(token["sha256"], cr.secret_hash(secret)):
                raise Unauthorized("unknown join token")
            if token["revoked"]:
                raise Unauthorized("this join token was revoked")
            if time.time() > token["expires"]:
                raise Unauthorized("this join token expired: create a new one with 'faasmoe-router tokens create'")
            held = state["nodes"].get(node_id)
            if held is not None and not state["tokens"].get(held["token"], {}).get("revoked"):
                raise Unauthorized(f"node id {node_id!r} is enrolled already: give this node another --node-id, or "
                                   f"free the id with 'faasmoe-router tokens forget-node {node_id}'")
            cert = self._sign(csr_pem, "node", node_id, NODE_CERT_DAYS)
            renew = cr.new_secret()
            state["nodes"][node_id] = {"token": token_id, "renew_sha256": cr.secret_hash(renew),
                                       "enrolled": time.time()}
        return cert, renew

    def forget_node(self, node_id: str) -> None:
        """Free a node id (the node lost its identity and must enrol again): its renewals stop working."""
        with self._state() as state:
            if state["nodes"].pop(node_id, None) is None:
                raise ConfigError(f"no node {node_id!r} is enrolled")

    def renew(self, node_id: str, renew_secret: str, csr_pem: bytes) -> tuple[bytes, str]:
        with self._state() as state:
            node = state["nodes"].get(node_id)
            given = cr.secret_hash(renew_secret)
            current = node is not None and secrets.compare_digest(node["renew_sha256"], given)
            # the previous secret stays good until the new one is used: a node that lost the last reply (or
            # crashed before keeping it) can still renew
            previous = node is not None and secrets.compare_digest(node.get("prev_renew_sha256", ""), given)
            if not (current or previous):
                raise Unauthorized("unknown node or renewal secret")
            if state["tokens"].get(node["token"], {}).get("revoked"):
                raise Unauthorized("the token this node joined with was revoked")
            cert = self._sign(csr_pem, "node", node_id, NODE_CERT_DAYS)
            renew = cr.new_secret()
            if current:
                node["prev_renew_sha256"] = node["renew_sha256"]
            node["renew_sha256"] = cr.secret_hash(renew)
        return cert, renew


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
