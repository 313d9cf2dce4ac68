"""A fault injector in user space: a TCP proxy in front of a node (the kernel here has no netem).

Point the router at the proxy's address instead of the node's; then, at any time (thread-safe):

- ``set(delay_s=0.2)``: every chunk is delivered ``delay_s`` late, in order, in both directions (latency, not
  lower throughput);
- ``set(drop_p=0.05)``: each chunk is lost with probability ``drop_p`` (TCP would retransmit a lost segment;
  a chunk lost above TCP leaves the peer with a broken HTTP/2 stream, which it must detect and drop);
- ``set(blackhole=True)``: connections stay open and accepted, and nothing is delivered any more (a partition
  or a hung host: the worst case, since nothing tells the peer);
- ``reset()``: every open connection is aborted with a TCP RST; ``set(refuse=True)`` resets new ones too;
- ``set()``: back to a clean link.

:class:`FaultProxy` runs its own event loop in a daemon thread; ``stats`` counts what it did.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass


@dataclass
class ProxyStats:
    connections: int = 0
    bytes_forwarded: int = 0
    chunks_dropped: int = 0
    chunks_blackholed: int = 0
    resets: int = 0


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), not FIN."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    def __init__(self, target: str, listen_host: str = "127.0.0.1", seed: int = 0):
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.listen_host = listen_host
        self.delay_s, self.drop_p, self.blackhole, self.refuse = 0.0, 0.0, False, False
        self.stats = ProxyStats()
        self._random = random.Random(seed)
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self.address = ""

    # -- control (any thread) --------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, self.listen_host, 0), self._loop).result(10)
        self.address = "%s:%d" % self._server.sockets[0].getsockname()[:2]
        return self

    def set(self, *, delay_s: float = 0.0, drop_p: float = 0.0, blackhole: bool = False,
            refuse: bool = False) -> None:
        if delay_s < 0 or not 0 <= drop_p <= 1:
            raise ValueError("delay_s must be >= 0 and drop_p in [0, 1]")
        self.delay_s, self.drop_p, self.blackhole, self.refuse = delay_s, drop_p, blackhole, refuse

    def reset(self) -> int:
        """Abort every open connection with RST; returns how many."""
        return asyncio.run_coroutine_threadsafe(self._reset_all(), self._loop).result(10)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the loop --------------------------------------------------------------------------------------
    async def _reset_all(self) -> int:
        conns, self._conns = list(self._conns), set()
        for client, upstream in conns:
            _abort(client)
            _abort(upstream)
        self.stats.resets += len(conns)
        return len(conns)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset_all()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            _abort(writer)
            self.stats.resets += 1
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _abort(writer)
            return
        self.stats.connections += 1
        pair = (writer, up_writer)
        self._conns.add(pair)
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._conns.discard(pair)
            for w in pair:
                w.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Copy src to dst, applying the faults in force when each chunk arrives."""
        queue: asyncio.Queue = asyncio.Queue()
        writer = asyncio.ensure_future(self._deliver(queue, dst))
        try:
            while data := await src.read(1 << 16):
                if self.blackhole:
                    self.stats.chunks_blackholed += 1
                    continue
                if self.drop_p and self._random.random() < self.drop_p:
                    self.stats.chunks_dropped += 1
                    continue
                queue.put_nowait((time.monotonic() + self.delay_s, data))
            queue.put_nowait(None)
            await writer
            with contextlib.suppress(OSError, RuntimeError):
                dst.write_eof()
        finally:
            writer.cancel()

    async def _deliver(self, queue: asyncio.Queue, dst: asyncio.StreamWriter) -> None:
        while (item := await queue.get()) is not None:
            due_s, data = item
            wait_s = due_s - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)     # latency injection, not synchronisation
            if self.blackhole:                  # went dark while this chunk was in flight
                self.stats.chunks_blackholed += 1
                continue
            dst.write(data)
            await dst.drain()
            self.stats.bytes_forwarded += len(data)
