"""The control plane's connection to one node: deploy, undeploy, status, load. Failed calls become the error
tree of :mod:`faasmoe.proto.errors` (its one mapping). The channel comes from
:func:`faasmoe.router.mesh.channel.make_channel`."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import grpc

from faasmoe.proto import faasmoe_pb2 as pb
from faasmoe.proto import methods
from faasmoe.proto.errors import CheckpointError, from_rpc_error
from faasmoe.router.mesh.channel import make_channel
from faasmoe.proto.credentials import TlsMaterial
from faasmoe.proto.frames import DEFAULT_MAX_MESSAGE_BYTES

DEPLOY_CHUNK_BYTES = 1 << 19      # well under the smallest message limit a node accepts (1 MiB)


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

