"""The engine core's own thread and event loop, so that the HTTP loop never waits on the model.

The server builds its serving stack (dense model, mesh transport, engine) on this loop and keeps its API on
another: a prefill of thousands of tokens then delays no health check and no admission. The API talks to the
engine only through its thread-safe calls (:meth:`Engine.submit`, :meth:`Engine.cancel`, :meth:`Engine.events`),
which never wait for a step.

    core = EngineCore().start()
    serving = await core.run(start_serving(session, config))
    ...
    await core.run(serving.close())
    core.stop()
"""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Awaitable, TypeVar

T = TypeVar("T")

# How long a thread may hold the GIL while another waits for it (CPython's default: 5 ms). The engine's thread
# is busy in Python between torch calls; the HTTP thread wants the GIL back after every socket call, so with
# the default it waits ~5 ms each time (the convoy effect). Measured at 8 clients on the trained model
# (bench/serving.py, mesh phase): 5 ms → 0.2 ms took the time per output token from 67–70 to 55 ms.
SWITCH_INTERVAL_S = 0.0002


class EngineCore:
    def __init__(self, name: str = "faasmoe-engine"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def start(self) -> EngineCore:
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self._thread.start()
        return self

    async def run(self, coro: Awaitable[T]) -> T:
        """Run ``coro`` on the engine's loop and await its result from the caller's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout_s)
