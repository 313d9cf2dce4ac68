"""What the node keeps per deployed function and in total: the registry's records (plain data)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import onnxruntime as ort

from faasmoe.node.metrics import HeatWindow
from faasmoe.node.store import FunctionInfo


@dataclass
class FunctionStats:
    invocations: int = 0
    rows: int = 0
    in_flight: int = 0                    # calls running or waiting on this function
    cold_starts: int = 0                  # loads caused by calls
    loads: int = 0                        # all loads (calls and prefetch)
    load_s: float = 0.0                   # seconds, last load including warm-up
    compute_s: float = 0.0                # seconds of session runs, total
    last_used_s: float = field(default_factory=time.monotonic)  # monotonic; last call end, load or deploy
    rss_delta_bytes: int = 0              # RSS change measured around the last load
    wait_s: float = 0.0                   # seconds finished calls waited for a run slot (contention, not loading)
    waits: int = 0                        # calls that waited for a run slot
    waiting: int = 0                      # calls waiting for a run slot right now
    waiting_since_sum_s: float = 0.0      # sum of their perf_counter() at the start of the wait

    def wait_s_now(self, now_s: float) -> float:
        """Seconds calls waited for a run slot, including the calls still waiting."""
        return self.wait_s + self.waiting * now_s - self.waiting_since_sum_s
    heat: HeatWindow = field(default_factory=HeatWindow)   # rows per expert, sliding window
    rows_by_caller: dict[str, int] = field(default_factory=dict)


@dataclass
class NodeCounters:
    loads: int = 0
    cold_starts: int = 0
    evictions_keep_alive: int = 0
    evictions_memory: int = 0
    backpressure: int = 0                 # calls refused with Backpressure
    memory_waits: int = 0                 # loads that had to wait for in-flight calls to free memory


@dataclass
class Function:
    info: FunctionInfo
    stats: FunctionStats = field(default_factory=FunctionStats)
    session: ort.InferenceSession | None = None
    resident_bytes: int = 0               # accounted while loaded or loading
    deployed: bool = True
    owners: set[str] = field(default_factory=set)   # routers holding a lease; undeployed when none is left
    breaches: int = 0                     # loads that grew RSS past the estimate
    broken: str = ""                      # why it may not load again (it broke its memory estimate twice)
    loading: asyncio.Future | None = None
