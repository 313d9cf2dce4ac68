"""Run slots shared fairly between callers (routers): when every slot is busy, waiting calls queue per
caller and a freed slot goes to the callers in turn (round robin), not to whoever queued first. A router that
floods a node with calls therefore waits behind its own calls, not in front of another router's.

``pick_next`` is the decision (pure, table-tested); :class:`FairSlots` is the asyncio plumbing around it.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Sequence


def pick_next(waiting: Sequence[str], last: str | None) -> str:
    """The caller served next: the first caller with waiters after ``last`` in ``waiting``'s order (callers in
    the order they first queued), wrapping around."""
    if last in waiting:
        i = waiting.index(last)
        return (list(waiting[i + 1:]) + list(waiting[:i + 1]))[0]
    return waiting[0]


class FairSlots:
    def __init__(self, slots: int):
        self.free = slots
        self._queues: dict[str, collections.deque[asyncio.Future]] = {}
        self._last: str | None = None

    def locked(self) -> bool:
        return self.free == 0

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def acquire(self, caller: str = "") -> None:
        if self.free > 0 and not self._queues:
            self.free -= 1
            return
        future = asyncio.get_running_loop().create_future()
        self._queues.setdefault(caller, collections.deque()).append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():     # the slot was handed over as we were cancelled
                self.release()
            else:
                self._forget(caller, future)
            raise

    def release(self) -> None:
        while self._queues:
            caller = pick_next(list(self._queues), self._last)
            queue = self._queues[caller]
            future = queue.popleft()
            if not queue:
                del self._queues[caller]
            if not future.cancelled():
                self._last = caller
                future.set_result(None)          # the slot passes straight to the next caller's call
                return
        self.free += 1

    def _forget(self, caller: str, future: asyncio.Future) -> None:
        queue = self._queues.get(caller)
        if queue is not None and future in queue:
            queue.remove(future)
            if not queue:
                del self._queues[caller]
