"""The ready line: the one line a faasmoe process prints on stdout once it serves, and the one way to read it.

    FAASMOE_NODE_READY {"node_id": "...", "address": "HOST:PORT", "pid": N, "tls": false, "cert": null}
    FAASMOE_ROUTER_READY {"url": "http://HOST:PORT", "model": "...", ...}

Nodes print it (``node/cli.py``), routers print it (``router/api/front.py``); launchers, tests and benchmarks wait
for it with :class:`ReadyLines` (or :func:`parse_ready` on a line they already have).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from typing import IO

from faasmoe.proto.errors import FaasmoeError

NODE_READY = "FAASMOE_NODE_READY "
ROUTER_READY = "FAASMOE_ROUTER_READY "


def ready_line(prefix: str, info: dict) -> str:
    """The ready line for ``info`` (no newline)."""
    return prefix + json.dumps(info)


def parse_ready(line: str, prefix: str) -> dict | None:
    """The information of a ready line with ``prefix``; None for any other line."""
    return json.loads(line[len(prefix):]) if line.startswith(prefix) else None


class ReadyLines:
    """Drains a child's stdout in a daemon thread (so the child never blocks on a full pipe) and waits for its
    ready line with a deadline."""

    def __init__(self, stream: IO[str], process=None):
        self._process = process                 # a subprocess.Popen: its exit code goes into the error
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                self._lines.put(line)
        finally:
            self._lines.put(None)

    def wait(self, prefix: str, timeout_s: float, what: str = "the process") -> dict:
        """The ready line's information; :class:`FaasmoeError` when it does not come within ``timeout_s`` or the
        stream ends first (the child exited). Lines before it are skipped."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise FaasmoeError(f"{what} did not report ready within {timeout_s:.0f} s") from None
            if line is None:
                code = f" with code {self._process.wait()}" if self._process is not None else ""
                raise FaasmoeError(f"{what} exited{code} before it was ready")
            info = parse_ready(line, prefix)
            if info is not None:
                return info
