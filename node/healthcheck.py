"""``python -m faasmoe.node.healthcheck``: exit 0 when the node on this host reports SERVING (the container
healthcheck of compose/Dockerfile.node).

It asks the gRPC health service on $FAASMOE_NODE_HOST (127.0.0.1 when unset or a wildcard) at
$FAASMOE_NODE_PORT (default 50051). A node that has enrolled
(an identity in $FAASMOE_NODE_STORE_DIR/identity) serves mutual TLS only, so the check presents that same
identity, which the node's CA accepts; a node without one is asked in plaintext.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from faasmoe.node.identity import identity_dir
from faasmoe.proto.credentials import san_of

TIMEOUT_S = 3.0


def channel(port: str, store_dir: str | None, host: str | None = None) -> grpc.Channel:
    host = "127.0.0.1" if not host or host in ("0.0.0.0", "::", "[::]") else host
    address = f"[{host.strip('[]')}]:{port}" if ":" in host.strip("[]") else f"{host}:{port}"
    d = identity_dir(Path(store_dir)) if store_dir else None
    if d is None or not (d / "node.crt").is_file():
        return grpc.insecure_channel(address)
    creds = grpc.ssl_channel_credentials((d / "ca.crt").read_bytes(), (d / "node.key").read_bytes(),
                                         (d / "node.crt").read_bytes())
    return grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", san_of("node"))])


def main() -> int:
    port = os.environ.get("FAASMOE_NODE_PORT", "50051")
    try:
        with channel(port, os.environ.get("FAASMOE_NODE_STORE_DIR"), os.environ.get("FAASMOE_NODE_HOST")) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    except (grpc.RpcError, OSError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
