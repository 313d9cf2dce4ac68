"""Concurrent Invoke calls on grpc.aio, driven from the caller's own thread.

The sync gRPC API starts a polling thread for every ``future()`` (~0.4 ms each here); instead each calling
thread owns a private event loop and aio channels, and runs the fan-out with ``run_until_complete``: no
thread hand-off, one absolute deadline. A single call uses the sync channel's blocking call, cheaper still.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Sequence

import grpc

from faasmoe.router.client import SERVICE, NodeClient, make_channel

_local = threading.local()


def _loop_state():
    state = getattr(_local, "state", None)
    if state is None:
        state = _local.state = (asyncio.new_event_loop(), {})
    return state


def _aio_invoke(client: NodeClient):
    _, channels = _loop_state()
    key = (client.address, client.max_message_bytes)
    if key not in channels:
        channel = make_channel(client.address, client.max_message_bytes, aio=True)
        channels[key] = (channel, channel.unary_unary(SERVICE + "Invoke"))
    return channels[key][1]


def invoke_all(calls: Sequence[tuple[NodeClient, bytes]], deadline_s: float) -> list[bytes | grpc.RpcError]:
    """Send every frame concurrently; return each reply or its RpcError, in order. ``deadline_s`` is on
    ``time.perf_counter``'s clock; calls not finished by then fail with DEADLINE_EXCEEDED."""
    timeout_s = max(deadline_s - time.perf_counter(), 0.001)
    if len(calls) == 1:
        client, frame = calls[0]
        try:
            return [client.invoke_blocking(frame, timeout_s)]
        except grpc.RpcError as exc:
            return [exc]
    loop, _ = _loop_state()

    async def gather():
        stubs = [_aio_invoke(client) for client, _ in calls]      # aio channels bind to the running loop
        tasks = [asyncio.ensure_future(stub(frame, timeout=timeout_s)) for stub, (_, frame) in zip(stubs, calls)]
        try:
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()      # stragglers after an error; no-op for finished calls

    results = loop.run_until_complete(gather())
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, grpc.RpcError):
            raise r
    return results
