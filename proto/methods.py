"""The ``faasmoe.v1.ExpertNode`` gRPC service as one table, used by both sides: the node registers its
handlers from it (:func:`handlers`), routers and tests make their callables from it (:func:`stub`).

Invoke and InvokeStream carry raw frames (:mod:`faasmoe.proto.frames`): no protobuf (de)serializer, so
tensors are never copied into protobuf fields. The other methods carry the protobuf messages named here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import grpc

from faasmoe.proto import faasmoe_pb2 as pb

SERVICE = "faasmoe.v1.ExpertNode"

# Keepalive, agreed by both sides: routers ping every CLIENT_PING_MS and give up after CLIENT_PING_TIMEOUT_MS (a
# partitioned or paused node is noticed within ~8 s with nothing in flight); nodes accept pings that often and
# ping their callers on their own, more slowly.
CLIENT_PING_MS, CLIENT_PING_TIMEOUT_MS = 5_000, 3_000
NODE_MIN_PING_INTERVAL_MS = 4_000            # < CLIENT_PING_MS, or the node would answer the pings with GOAWAY
NODE_PING_MS, NODE_PING_TIMEOUT_MS = 10_000, 5_000


@dataclass(frozen=True)
class Method:
    name: str
    kind: str              # unary_unary | stream_unary | stream_stream
    request: type | None   # protobuf message class; None = raw frame bytes
    reply: type | None

    @property
    def path(self) -> str:
        return f"/{SERVICE}/{self.name}"


DEPLOY = Method("Deploy", "stream_unary", pb.DeployChunk, pb.DeployReply)
UNDEPLOY = Method("Undeploy", "unary_unary", pb.UndeployRequest, pb.UndeployReply)
INVOKE = Method("Invoke", "unary_unary", None, None)
INVOKE_STREAM = Method("InvokeStream", "stream_stream", None, None)
LOAD = Method("Load", "unary_unary", pb.LoadRequest, pb.LoadReply)
STATUS = Method("Status", "unary_unary", pb.StatusRequest, pb.StatusReply)
METHODS = (DEPLOY, UNDEPLOY, INVOKE, INVOKE_STREAM, LOAD, STATUS)


def stub(channel: grpc.Channel | grpc.aio.Channel, method: Method) -> Callable:
    """The client callable of ``method`` on ``channel`` (sync or grpc.aio)."""
    factory = getattr(channel, method.kind)
    return factory(method.path,
                   request_serializer=method.request.SerializeToString if method.request else None,
                   response_deserializer=method.reply.FromString if method.reply else None)


def handlers(implementations: Mapping[str, Callable]) -> grpc.GenericRpcHandler:
    """The server's handler for every method of the table; ``implementations`` maps each name to its
    behaviour (a method missing from it is a programming error)."""
    missing = {m.name for m in METHODS} - set(implementations)
    if missing:
        raise ValueError(f"no implementation for {sorted(missing)}")
    table = {}
    for m in METHODS:
        make = getattr(grpc, f"{m.kind}_rpc_method_handler")
        table[m.name] = make(implementations[m.name], m.request.FromString if m.request else None,
                             m.reply.SerializeToString if m.reply else None)
    return grpc.method_handlers_generic_handler(SERVICE, table)
