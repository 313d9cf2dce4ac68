"""Invoke frames to nodes on long-lived ``InvokeStream`` streams, on the engine's event loop.

One grpc.aio channel and one open stream per node. Requests on a stream are pipelined: :meth:`NodeStream.send`
starts the write at once (a task whose first step hands the frame to gRPC's core, which transmits it while the
caller computes) and returns a future for the reply. A reader task keeps a read posted, so replies are taken
off the wire as they arrive; the node answers a stream's frames one at a time, so replies match requests in
order. Any failure of the stream (an error status, the node ending it, a missed deadline, which would shift
the order) fails every request still waiting on it and drops it; the next send opens a fresh one.

A stream that fails with RESOURCE_EXHAUSTED failed because a frame was larger than a side's message limit: that
is :class:`~faasmoe.proto.errors.FrameTooLarge` (split and retry), never a dead node.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging

import grpc

from faasmoe.proto import methods
from faasmoe.proto.credentials import TlsMaterial
from faasmoe.proto.errors import MeshError, NodeUnavailable, from_stream_error
from faasmoe.proto.frames import DEFAULT_MAX_MESSAGE_BYTES
from faasmoe.router.mesh.channel import make_channel

log = logging.getLogger(__name__)


class NodeStream:
    """The open InvokeStream to one node (create and use on one event loop)."""

    def __init__(self, channel: grpc.aio.Channel, node: str):
        self.node = node
        self._call = methods.stub(channel, methods.INVOKE_STREAM)()
        self._waiting: collections.deque[asyncio.Future] = collections.deque()
        self._write_lock = asyncio.Lock()
        self._broken: MeshError | None = None
        self._writes: set[asyncio.Task] = set()
        self._reader = asyncio.ensure_future(self._read_replies())

    @property
    def broken(self) -> bool:
        return self._broken is not None

    def send(self, frame: bytes) -> asyncio.Future:
        """Send ``frame``; the future resolves to the reply frame or fails with a MeshError."""
        reply = asyncio.get_running_loop().create_future()
        if self._broken is not None:
            reply.set_exception(self._broken)
            return reply
        self._waiting.append(reply)
        task = asyncio.ensure_future(self._write(frame))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return reply

    async def _write(self, frame: bytes) -> None:
        try:
            async with self._write_lock:          # gRPC takes one write at a time; the lock keeps them in order
                if self._broken is None:
                    await self._call.write(frame)
        except asyncio.CancelledError:
            self.fail(NodeUnavailable("invoke stream closed", node=self.node))
        except Exception as exc:  # noqa: BLE001 - a write that failed leaves its reply unmatched: end the stream
            self.fail(from_stream_error(exc, self.node))

    async def _read_replies(self) -> None:
        try:
            while True:
                reply = await self._call.read()
                if reply is grpc.aio.EOF:
                    self.fail(NodeUnavailable("ended its invoke stream (the node is shutting down)", node=self.node))
                    return
                if not self._waiting:
                    self.fail(NodeUnavailable("replied to a request it was not sent", node=self.node))
                    return
                future = self._waiting.popleft()
                if not future.done():
                    future.set_result(reply)
        except asyncio.CancelledError:
            self.fail(NodeUnavailable("invoke stream closed", node=self.node))
        except Exception as exc:  # noqa: BLE001 - every stream failure fails its waiters
            self.fail(from_stream_error(exc, self.node))

    def fail(self, error: MeshError) -> None:
        """Fail every waiting request with ``error`` and end the stream (idempotent)."""
        if self._broken is None:
            self._broken = error
            self._call.cancel()
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)

    async def close(self) -> None:
        self.fail(NodeUnavailable("invoke stream closed", node=self.node))
        self._reader.cancel()
        for task in list(self._writes):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.gather(self._reader, *self._writes, return_exceptions=True)


class Transport:
    """Channels and streams to every node this router talks to, on the engine's loop."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, tls: TlsMaterial | None = None):
        self.max_message_bytes, self.tls = max_message_bytes, tls
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._streams: dict[str, NodeStream] = {}

    def stream(self, address: str) -> NodeStream:
        stream = self._streams.get(address)
        if stream is None or stream.broken:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = make_channel(address, self.max_message_bytes, aio=True,
                                                                 tls=self.tls)
            stream = self._streams[address] = NodeStream(channel, address)
        return stream

    def fail_node(self, address: str, why: str) -> None:
        """Fail what is in flight to ``address`` now (its health checks say it is down)."""
        stream = self._streams.get(address)
        if stream is not None and not stream.broken:
            stream.fail(NodeUnavailable(why, node=address))

    async def forget(self, address: str) -> None:
        """Close the stream and channel of a node that left."""
        stream = self._streams.pop(address, None)
        if stream is not None:
            await stream.close()
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        for address in list(set(self._channels) | set(self._streams)):
            await self.forget(address)
