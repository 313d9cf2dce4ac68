"""A router's connection to one node: deploy, invoke, status, load. Failed calls become the error tree
of :mod:`faasmoe.proto.errors` here (the router's one mapping point).

Every channel is made by :func:`make_channel`: plaintext, or mutual TLS with the cluster's credentials.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import grpc

from faasmoe.proto import faasmoe_pb2 as pb
from faasmoe.proto import methods
from faasmoe.proto.errors import CheckpointError, from_rpc_error
from faasmoe.proto.credentials import TlsMaterial, san_of
from faasmoe.proto.frames import DEFAULT_MAX_MESSAGE_BYTES

DEPLOY_CHUNK_BYTES = 1 << 19      # well under the smallest message limit a node accepts (1 MiB)


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 0),
        # reconnect quickly after a node comes back (gRPC's default backoff grows to 120 s)
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.keepalive_time_ms", methods.CLIENT_PING_MS),             # see faasmoe.proto.methods
        ("grpc.keepalive_timeout_ms", methods.CLIENT_PING_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def make_channel(address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, *, aio: bool = False,
                 tls: TlsMaterial | None = None) -> grpc.Channel | grpc.aio.Channel:
    """Every router-to-node channel is made here (sync, or grpc.aio for the fan-out). With cluster ``tls`` it
    is mutual TLS: the node must present a certificate of the cluster CA, and the router presents its own."""
    options = channel_options(max_message_bytes)
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options) if aio else grpc.insecure_channel(address, options)
    creds = grpc.ssl_channel_credentials(root_certificates=tls.ca_pem, private_key=tls.key_pem,
                                         certificate_chain=tls.cert_pem)
    options = options + [("grpc.ssl_target_name_override", san_of("node"))]   # only node certificates pass
    if aio:
        return grpc.aio.secure_channel(address, creds, options=options)
    return grpc.secure_channel(address, creds, options=options)


class NodeClient:
    """Thread-safe; one per node. ``node`` names it in errors (its id, or its address)."""

    def __init__(self, address: str, node: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, tls: TlsMaterial | None = None):
        self.address = address
        self.node = node or address
        self.max_message_bytes = max_message_bytes
        self.channel = make_channel(address, max_message_bytes, tls=tls)
        self._deploy = methods.stub(self.channel, methods.DEPLOY)
        self._undeploy = methods.stub(self.channel, methods.UNDEPLOY)
        self._load = methods.stub(self.channel, methods.LOAD)
        self._status = methods.stub(self.channel, methods.STATUS)

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request, timeout_s: float):
        try:
            return method(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.node) from None

    def status(self, timeout_s: float = 5.0) -> pb.StatusReply:
        return self._call(self._status, pb.StatusRequest(), timeout_s)

    def undeploy(self, function_id: str, owner: str = "", timeout_s: float = 10.0) -> pb.UndeployReply:
        """Drop ``owner``'s lease on the function (the node removes it with its last lease)."""
        return self._call(self._undeploy, pb.UndeployRequest(function_id=function_id, owner=owner), timeout_s)

    def load(self, function_ids: list[str], wait: bool, timeout_s: float = 60.0) -> pb.LoadReply:
        return self._call(self._load, pb.LoadRequest(function_ids=function_ids, wait=wait), timeout_s)

    def deploy(self, path: Path, header: pb.FunctionHeader, timeout_s: float = 300.0) -> pb.DeployReply:
        """Stream ``path`` to the node (1 MiB chunks, header first). The node verifies its sha256."""
        if not Path(path).is_file():
            raise CheckpointError(f"function file {path} is missing from the store: split the model again")
        return self._call(self._deploy, _chunks(Path(path), header), timeout_s)


def _chunks(path: Path, header: pb.FunctionHeader) -> Iterator[pb.DeployChunk]:
    with open(path, "rb") as fh:
        first = fh.read(DEPLOY_CHUNK_BYTES)
        yield pb.DeployChunk(header=header, data=first)
        while chunk := fh.read(DEPLOY_CHUNK_BYTES):
            yield pb.DeployChunk(data=chunk)

