"""The node's transport security: mutual TLS with its cluster identity, or plaintext for development.

- With ``--join TOKEN`` (or an identity enrolled before, in ``STORE/identity``) the node serves gRPC over TLS and
  requires a client certificate signed by the cluster CA. Callers are authorised by the role in their
  certificate (:func:`require_role`). The certificate is renewed when a third of its life is left; the gRPC
  server picks the new one up for new connections (dynamic credentials).
- Without one, it serves plaintext on loopback only, unless ``--insecure`` lets it bind another address, and
  says so at start.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from faasmoe.node.config import NodeConfig
from faasmoe.node.identity import Identity, enroll, join_token_text, load_identity, renew
from faasmoe.proto import credentials as cr
from faasmoe.proto.discovery import is_loopback
from faasmoe.proto.errors import ConfigError, Forbidden

log = logging.getLogger(__name__)
RENEW_CHECK_S = 60.0


class NodeTls:
    def __init__(self, config: NodeConfig, identity: Identity):
        self.config, self.identity = config, identity
        self._fresh: Identity | None = None          # renewed, not yet handed to the gRPC server

    @classmethod
    def start(cls, config: NodeConfig) -> NodeTls | None:
        identity = load_identity(config.store_dir, config.node_id)
        if config.join_token:
            text = join_token_text(config.join_token)
            token = cr.JoinToken.decode(text)
            if identity is None or cr.fingerprint(cr.load_cert(identity.ca_pem)) != token.ca_sha256:
                identity = enroll(text, config.node_id, config.store_dir)
                log.warning("node %s enrolled in the cluster of CA %s…", config.node_id, token.ca_sha256[:16])
        if identity is None:
            if not is_loopback(config.host) and not config.insecure:
                raise ConfigError(f"refusing plaintext gRPC on {config.host}: anyone on the network could deploy and "
                                  "call functions. Enrol with --join TOKEN ('faasmoe-router init-cluster'), or pass "
                                  "--insecure, or listen on 127.0.0.1")
            log.warning("plaintext gRPC on %s (%s): no cluster identity", config.host,
                        "loopback development mode" if is_loopback(config.host) else "--insecure")
            return None
        log.info("mutual TLS with the cluster identity node:%s (certificate %s…)", config.node_id,
                 identity.fingerprint[:16])
        return cls(config, identity)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._configuration(self.identity), self._fetch,
                                                   require_client_authentication=True)

    @staticmethod
    def _configuration(identity: Identity):
        return grpc.ssl_server_certificate_configuration([(identity.key_pem, identity.cert_pem)],
                                                         root_certificates=identity.ca_pem)

    def _fetch(self):
        fresh, self._fresh = self._fresh, None
        return self._configuration(fresh) if fresh is not None else None

    async def renew_loop(self) -> None:
        while True:
            left_s = self.identity.expires - time.time()
            if left_s < self.identity.lifetime_s / 3:
                try:
                    self.identity = self._fresh = await asyncio.to_thread(renew, self.identity, self.config.store_dir)
                    log.warning("node %s renewed its certificate (until %s)", self.config.node_id,
                                time.strftime("%Y-%m-%d", time.gmtime(self.identity.expires)))
                except Exception as exc:  # noqa: BLE001 - the loop outlives any failure and retries
                    log.error("certificate renewal failed, retrying in %.0f s: %s", RENEW_CHECK_S, exc)
            await asyncio.sleep(RENEW_CHECK_S)


def peer_identity(context) -> tuple[str, str]:
    """(role, id) of the caller's certificate, ('', '') without one."""
    try:
        names = context.auth_context().get("x509_common_name", [])
    except Exception:  # noqa: BLE001 - a context without an auth context: no identity
        names = []
    return cr.role_of(names[0].decode()) if names else ("", "")


def require_role(context, role: str) -> None:
    have, who = peer_identity(context)
    if have != role:
        raise Forbidden(f"only a {role} identity may do this (the caller is {have or 'unauthenticated'}"
                        f"{':' + who if who else ''})")
