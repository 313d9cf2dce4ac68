"""Attributing the nodes' memory to tenants: who used the loaded functions, and for how long.

Every poll interval the router reads each node's status: which functions are loaded, their resident bytes,
and the rows each caller (router) had them compute. A loaded function costs ``resident bytes × interval``.
That cost is shared between the routers that used it in the interval, pro rata by the node's own row counts,
and a router's share between its tenants pro rata by their rows on the function (from the replies' attribution).
A function loaded but used by nobody in the interval is the keep-alive's cost: unattributed.
:func:`attribute_memory` is the decision (pure); :class:`MemoryPoller` reads the nodes from a thread.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """One function copy on one node at a poll."""

    resident_bytes: int
    rows: int                          # the node's count since deploy
    rows_mine: int                     # of those, this router's


def attribute_memory(before: Mapping[tuple[str, str], Loaded], now: Mapping[tuple[str, str], Loaded],
                     my_rows: Mapping[tuple[str, str], int], interval_s: float) -> tuple[dict[str, float], float]:
    """``before``/``now``: (node, function) -> Loaded at the last and this poll (loaded copies only);
    ``my_rows``: (function, tenant) -> rows this router sent in the interval. Returns (byte-seconds per tenant,
    byte-seconds unattributed)."""
    by_tenant: dict[str, float] = {}
    unattributed = 0.0
    tenant_rows: dict[str, dict[str, int]] = {}
    for (fid, tenant), n in my_rows.items():
        tenant_rows.setdefault(fid, {})[tenant] = tenant_rows.get(fid, {}).get(tenant, 0) + n
    for key, cur in now.items():
        node, fid = key
        prev = before.get(key)
        if prev is None:             # loaded since the last poll (or the node did not answer): no baseline yet
            continue
        cost = cur.resident_bytes * interval_s
        used = cur.rows - prev.rows
        mine = cur.rows_mine - prev.rows_mine
        if used <= 0:
            unattributed += cost
            continue
        my_cost = cost * min(1.0, max(0, mine) / used)
        rows = tenant_rows.get(fid, {})
        total = sum(rows.values())
        if my_cost and total:
            for tenant, n in rows.items():
                by_tenant[tenant] = by_tenant.get(tenant, 0.0) + my_cost * n / total
    return by_tenant, unattributed


class MemoryPoller:
    """Every ``interval_s``: read the routed nodes' status, attribute, hand the result to ``sink``."""

    def __init__(self, session, caller: str, take_rows: Callable[[], dict], sink: Callable, interval_s: float = 5.0):
        self.session, self.caller, self.take_rows, self.sink = session, caller, take_rows, sink
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._before: dict[tuple[str, str], Loaded] = {}
        self._thread = threading.Thread(target=self._run, name="faasmoe-memory-poller", daemon=True)

    def start(self) -> MemoryPoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def poll(self, interval_s: float) -> None:
        now: dict[tuple[str, str], Loaded] = {}
        mine = {f.function_id for f in self.session.manifest.functions}
        for address in sorted({n for nodes in dict(self.session.placement).values() for n in nodes}):
            try:
                status = self.session.client(address).status(2.0)
            except Exception as exc:  # noqa: BLE001 - a node that does not answer costs nothing this round
                log.debug("memory poll of %s failed: %s", address, exc)
                continue
            for f in status.functions:
                if f.loaded and f.function_id in mine:
                    now[(address, f.function_id)] = Loaded(f.resident_bytes, f.rows, f.rows_by_caller.get(self.caller, 0))
        by_tenant, unattributed = attribute_memory(self._before, now, self.take_rows(), interval_s)
        self._before = now
        self.sink(by_tenant, unattributed, interval_s)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            try:
                self.poll(now - last)                       # the measured interval, not the configured one
            except Exception:  # noqa: BLE001 - accounting must not stop
                log.exception("memory attribution failed")
            last = now
