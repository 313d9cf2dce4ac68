"""Eviction decisions as pure functions over plain data (no ONNX Runtime, no asyncio, no clock).

- :func:`evict_for_load`: which loaded sessions to release so a load of N bytes fits the memory budget;
- :func:`past_keep_alive`: which sessions have been idle longer than the keep-alive window;
- :func:`files_to_drop`: which stored files to delete so N more bytes fit the disk budget.

Rules: least recently used first (ties broken by id, so results are deterministic); a session with calls in
flight is never chosen; a file of a deployed function (``pinned``) is never chosen; ``None`` means
"impossible right now" (the caller waits or refuses), ``[]`` means "fits already".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class LoadedFunction:
    function_id: str
    resident_bytes: int      # bytes accounted while its session is loaded
    in_flight: int           # calls running or waiting on this function
    last_used_s: float       # clock time (any monotonic clock) the last call ended, or the load finished


@dataclass(frozen=True)
class StoredFile:
    function_id: str
    size_bytes: int          # bytes on disk
    last_used_s: float       # clock time of the last deploy or load of this file
    pinned: bool             # deployed: never dropped


def _lru(items: Iterable, idle) -> list:
    return sorted((i for i in items if idle(i)), key=lambda i: (i.last_used_s, i.function_id))


def evict_for_load(loaded: Sequence[LoadedFunction], need_bytes: int, memory_budget_bytes: int,
                   reserved_bytes: int = 0) -> list[str] | None:
    """Ids to release (LRU idle first) so ``need_bytes`` more fit; ``None`` when no choice can make room.

    ``reserved_bytes``: memory already promised elsewhere (e.g. a load in progress).
    """
    if need_bytes > memory_budget_bytes:
        return None
    free_bytes = memory_budget_bytes - reserved_bytes - sum(f.resident_bytes for f in loaded)
    victims: list[str] = []
    for f in _lru(loaded, lambda f: f.in_flight == 0):
        if free_bytes >= need_bytes:
            break
        victims.append(f.function_id)
        free_bytes += f.resident_bytes
    return victims if free_bytes >= need_bytes else None


def past_keep_alive(loaded: Sequence[LoadedFunction], now_s: float, keep_alive_s: float) -> list[str]:
    """Ids idle (no call in flight) for at least ``keep_alive_s``, oldest first. ``inf`` keeps everything."""
    if math.isinf(keep_alive_s):
        return []
    return [f.function_id for f in _lru(loaded, lambda f: f.in_flight == 0 and now_s - f.last_used_s >= keep_alive_s)]


def next_keep_alive_deadline_s(loaded: Sequence[LoadedFunction], keep_alive_s: float) -> float | None:
    """When the next idle session expires (clock time), or ``None`` if none can."""
    idle = [f.last_used_s for f in loaded if f.in_flight == 0]
    if not idle or math.isinf(keep_alive_s):
        return None
    return min(idle) + keep_alive_s


def files_to_drop(files: Sequence[StoredFile], need_bytes: int, disk_budget_bytes: int,
                  reserved_bytes: int = 0) -> list[str] | None:
    """Ids of unpinned files to delete (LRU first) so ``need_bytes`` more fit; ``None`` when impossible."""
    if need_bytes > disk_budget_bytes:
        return None
    free_bytes = disk_budget_bytes - reserved_bytes - sum(f.size_bytes for f in files)
    victims: list[str] = []
    for f in _lru(files, lambda f: not f.pinned):
        if free_bytes >= need_bytes:
            break
        victims.append(f.function_id)
        free_bytes += f.size_bytes
    return victims if free_bytes >= need_bytes else None
