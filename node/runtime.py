"""The node's function registry and its ONNX Runtime sessions (serverless: load on demand, release when idle).

- *deployed bytes*: what the deployed functions would hold if all were loaded (their footprint estimates, below),
  at most ``memory_budget_bytes x overcommit``.
- *footprint* of a function: what it holds when loaded, a **calibrated estimate** from its file size and
  precision (not a measurement), :func:`function_resident_bytes` = 1.02 x file + 8 bytes per quantization
  block + 1 MiB, known before the load so it can be admitted; a loaded function's *resident bytes* are its
  footprint. Measured with onnxruntime 1.32 / glibc, arena off and ``M_MMAP_THRESHOLD`` 4 MiB
  (:func:`faasmoe.node.cli.tune_malloc`), with the freed heap trimmed right after each load: process RSS grows by
  1.00-1.02 x the file per loaded fp32 session, 1.07 x for int8 and 1.13 x for int4 at block 128 (MatMulNBits'
  prepacked blocks carry 8 more bytes each; the very first load adds ~10 MiB of ORT global state) and falls back
  to baseline on release. The RSS delta around each load is kept in :class:`FunctionStats`, reported in Status
  and logged (a warning when far above the estimate). Before the trim a load holds up to ~2.2 x its file (the
  parsed file, freed but not returned); loads run one at a time, which bounds that overshoot.
- *loaded bytes* (sum of resident bytes) stay within ``memory_budget_bytes``: a load evicts least recently
  used idle sessions, never one with calls in flight; when that cannot make room, it waits.

Calls that must wait (for a load or a free run slot) form a bounded queue; beyond ``max_queue`` a call fails
with :class:`Backpressure`. Concurrent calls for a cold function share one load (single flight). ORT runs in
worker threads (it releases the GIL), ``run_slots`` = CPUs // threads at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import AsyncIterator, Sequence

import numpy as np
import psutil

from faasmoe.node import eviction
from faasmoe.node.config import NodeConfig, default_threads
from faasmoe.node.functions import Function, NodeCounters
from faasmoe.node.fair_slots import FairSlots
from faasmoe.node.metrics import Listeners
from faasmoe.node.sessions import create_session, is_tiny, run_session, trim_malloc
from faasmoe.node.store import ContentStore, FunctionInfo, check_function_id
from faasmoe.proto import faasmoe_pb2 as pb
from faasmoe.proto.frames import Call
from faasmoe.proto.function_abi import MAX_FUNCTION_BYTES, resident_estimate_bytes
from faasmoe.proto.errors import Backpressure, FunctionNotFound, InvalidRequest, NodeFull, NodeInternalError

log = logging.getLogger(__name__)
MIB = 1024 * 1024
RSS_SLACK_BYTES = 16 * MIB                  # allocator noise around a load
RSS_FIRST_LOAD_SLACK_BYTES = 48 * MIB       # the first load also initialises ONNX Runtime


class Runtime:
    """Deployed functions, their sessions and the calls running on them (one per node, one event loop)."""

    def __init__(self, config: NodeConfig, store: ContentStore, run_executor: Executor | None = None):
        self.config, self.store, self.node_id = config, store, config.node_id
        self.counters = NodeCounters()
        self.listeners = Listeners()      # callables(event dict), on the loop, per load / evict
        self.run_slots = max(1, default_threads() // config.threads)
        self.deployed: dict[str, Function] = {}         # read-only outside
        self._draining: dict[str, Function] = {}       # undeployed, still running calls
        self._pending_deploy_bytes = 0
        self.queue_depth = 0                             # calls waiting for a load or a run slot
        self._slots = FairSlots(self.run_slots)        # a fair queue per caller when all slots are busy
        self._own_pool = run_executor is None
        self._run_pool = run_executor or ThreadPoolExecutor(self.run_slots, "faasmoe-run")
        self._load_pool = ThreadPoolExecutor(1, "faasmoe-load")
        self._load_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._background: set[asyncio.Task] = set()
        self._proc = psutil.Process()

    # ---- lifecycle
    async def start(self) -> None:
        if math.isfinite(self.config.keep_alive_s):
            self._spawn(self._reap_loop())

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for fn in [*self.deployed.values(), *self._draining.values()]:
            self._release(fn, "shutdown")
        await asyncio.to_thread(self._load_pool.shutdown)
        if self._own_pool:
            await asyncio.to_thread(self._run_pool.shutdown)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ---- accounting
    @property
    def deployed_bytes(self) -> int:
        """Memory the deployed functions would hold if all were loaded (what capacity limits)."""
        return sum(fn.info.footprint_bytes for fn in self.deployed.values()) + self._pending_deploy_bytes

    @property
    def loaded_bytes(self) -> int:
        return sum(fn.resident_bytes for fn in self._all())

    def function(self, function_id: str) -> Function:
        fn = self.deployed.get(function_id)
        if fn is None:
            raise FunctionNotFound(f"function {function_id} is not deployed on node {self.node_id}; deploy it "
                                   "there first or send its rows to a node that has it", node=self.node_id)
        return fn

    def _all(self) -> list[Function]:
        return [*self.deployed.values(), *self._draining.values()]

    def _loaded_view(self) -> list[eviction.LoadedFunction]:
        return [eviction.LoadedFunction(fn.info.function_id, fn.resident_bytes, fn.stats.in_flight,
                                        fn.stats.last_used_s) for fn in self._all() if fn.session is not None]

    def _notify(self) -> None:                    # wakes loads waiting for memory
        self._changed.set()
        self._changed = asyncio.Event()

    # ---- deploy
    def check_capacity(self, function_id: str, need: int) -> None:
        """NodeFull unless a function holding ``need`` bytes when loaded fits."""
        budget = self.config.memory_budget_bytes
        if need > budget:
            raise NodeFull(f"function {function_id} needs ~{need / MIB:.1f} MiB when loaded, more than the whole "
                           f"memory budget of node {self.node_id} ({budget / MIB:.1f} MiB); use smaller functions "
                           "(fewer experts per function) or a node with more memory", node=self.node_id)
        used, cap = self.deployed_bytes, self.config.capacity_bytes
        if used + need > cap:
            raise NodeFull(f"node {self.node_id}: deploying {function_id} (~{need / MIB:.1f} MiB loaded) would exceed "
                           f"its capacity: {used / MIB:.1f} of {cap / MIB:.1f} MiB used (memory budget "
                           f"{budget / MIB:.1f} MiB x overcommit {self.config.overcommit:g}); undeploy functions, "
                           "raise --memory-budget-mb or --overcommit, or place it on another node", node=self.node_id)

    async def deploy(self, header: pb.FunctionHeader, chunks: AsyncIterator[bytes]) -> bool:
        """Register a function for ``header.owner``, receiving its file unless the store has it. A function
        already deployed gains a lease and is not received again. Returns ``already_present``."""
        fid, size = header.function_id, header.size_bytes
        check_function_id(fid)
        if not 0 < size <= MAX_FUNCTION_BYTES:
            raise InvalidRequest(f"function {fid}: size_bytes must be in 1..{MAX_FUNCTION_BYTES}, got {size}")
        if fid in self.deployed:
            if self.deployed[fid].info.size_bytes != size:
                raise InvalidRequest(f"function {fid}: announced {size} bytes but its content is "
                                     f"{self.deployed[fid].info.size_bytes} bytes")
            self.deployed[fid].owners.add(header.owner)
            return True
        present = self.store.has(fid)
        if present and self.store.size_bytes(fid) != size:
            raise InvalidRequest(f"function {fid}: announced {size} bytes but its content is "
                                 f"{self.store.size_bytes(fid)} bytes")
        if not 0 <= header.footprint_bytes <= 4 * MAX_FUNCTION_BYTES:
            raise InvalidRequest(f"function {fid}: footprint_bytes {header.footprint_bytes} is not a plausible "
                                 "memory estimate")
        announced = max(resident_estimate_bytes(size), header.footprint_bytes)
        self.check_capacity(fid, announced)            # before a byte of data is read
        if not present:
            self._pending_deploy_bytes += announced
            try:
                await self.store.receive(fid, size, chunks)
            finally:
                self._pending_deploy_bytes -= announced
                self._load_pool.submit(trim_malloc)     # upload buffers
        try:
            info = FunctionInfo.from_file(self.store.path(fid), fid, size)     # the function ABI, or refused
            if fid not in self.deployed and info.footprint_bytes > announced:  # its precision needs more
                self.check_capacity(fid, info.footprint_bytes)
        except (InvalidRequest, NodeFull):
            if fid not in self.deployed:
                self.store.remove(fid)
            raise
        if fid in self.deployed:                       # deployed by another owner while this one was receiving
            self.deployed[fid].owners.add(header.owner)
        else:
            fn = self._draining.pop(fid, None) or Function(info)
            fn.deployed, fn.owners = True, {header.owner}
            self.deployed[fid] = fn
            self.store.pin(fid)
            log.info("deployed %s (layer %d, experts %s, %s, %.1f MiB)%s", fid[:12], info.layer,
                     list(info.expert_ids), info.precision.label, size / MIB, " from the disk cache" if present else "")
        return present

    def undeploy(self, function_id: str, owner: str = "") -> tuple[bool, bool]:
        """Drop ``owner``'s lease; the function goes when no lease is left. Returns (the owner held a lease,
        the function was released)."""
        fn = self.deployed.get(function_id)
        if fn is None or owner not in fn.owners:
            return False, False
        fn.owners.discard(owner)
        if fn.owners:
            log.info("%s: lease of %r dropped, %d left", function_id[:12], owner, len(fn.owners))
            return True, False
        del self.deployed[function_id]
        fn.deployed = False
        self.store.unpin(function_id)
        if fn.stats.in_flight:
            self._draining[function_id] = fn          # released when its last call ends
        else:
            self._release(fn, "undeploy")
        log.info("undeployed %s", function_id[:12])
        return True, True

    # ---- loading and eviction
    async def _load_once(self, fn: Function, by_call: bool) -> float:
        """Single flight: every caller of a cold function awaits the same load. Returns its seconds."""
        if fn.loading is None:
            fn.loading = self._spawn(self._load(fn, by_call))
            fn.loading.add_done_callback(lambda fut: fut.cancelled() or fut.exception())
            if by_call:
                fn.stats.cold_starts += 1
                self.counters.cold_starts += 1
        return await asyncio.shield(fn.loading)

    async def _load(self, fn: Function, by_call: bool) -> float:
        try:
            if fn.broken:
                raise NodeFull(fn.broken, node=self.node_id)
            async with self._load_lock:
                need = fn.info.footprint_bytes
                while (victims := eviction.evict_for_load(self._loaded_view(), need,
                                                          self.config.memory_budget_bytes)) is None:
                    self.counters.memory_waits += 1
                    log.info("load of %s waits: %.1f MiB needed, every loaded function has calls in flight",
                             fn.info.function_id[:12], need / MIB)
                    await self._changed.wait()
                for fid in victims:
                    self._release(next(f for f in self._all() if f.info.function_id == fid), "memory", "pressure")
                fn.resident_bytes = need
                try:
                    session, load_s, delta = await asyncio.get_running_loop().run_in_executor(
                        self._load_pool, create_session, fn.info, self.config.threads, self._proc)
                except Exception as err:
                    fn.resident_bytes = 0
                    raise NodeInternalError(f"node {self.node_id} could not load function {fn.info.function_id}: "
                                            f"{err}", node=self.node_id) from err
                allowed = self.config.load_rss_factor * need + (RSS_FIRST_LOAD_SLACK_BYTES if not self.counters.loads
                                                                 else RSS_SLACK_BYTES)
                if delta > allowed:                     # it holds more than it declared: unload, refuse from now on
                    fn.resident_bytes = 0
                    del session
                    self._load_pool.submit(trim_malloc)
                    fn.breaches += 1
                    why = (f"function {fn.info.function_id} grew the node's RSS by {delta / MIB:.1f} MiB when loaded, "
                           f"over the {allowed / MIB:.1f} MiB its estimate allows ({need / MIB:.1f} MiB x "
                           f"--load-rss-factor {self.config.load_rss_factor:g}): unloaded")
                    if fn.breaches >= 2:                # once may be a concurrent allocation; twice is the function
                        fn.broken = why + " and refused from now on"
                    log.error("%s", fn.broken or why)
                    self._notify()
                    raise NodeFull(fn.broken or why, node=self.node_id)
                fn.session, st = session, fn.stats
                st.loads, st.load_s, st.rss_delta_bytes, st.last_used_s = st.loads + 1, load_s, delta, time.monotonic()
                self.counters.loads += 1
                self.listeners.emit("load", fn.info, fn.resident_bytes, load_s=load_s, cold_start=by_call)
                self.store.touch(fn.info.function_id)
                if not fn.deployed and not st.in_flight:
                    self._release(fn, "undeploy", "while loading")
                level = logging.WARNING if delta > need * 1.25 + 16 * MIB else logging.INFO   # 1st load: ORT init
                log.log(level, "loaded %s in %.3f s: %.1f MiB accounted, RSS +%.1f MiB", fn.info.function_id[:12],
                        load_s, need / MIB, delta / MIB)
                return load_s
        finally:
            fn.loading = None

    def _release(self, fn: Function, reason: str, detail: str = "") -> None:
        """Drop the session; ``reason``: keep_alive | memory | undeploy | shutdown (counted and emitted)."""
        session, fn.session = fn.session, None
        resident_bytes, fn.resident_bytes = fn.resident_bytes, 0
        if not fn.deployed:
            self._draining.pop(fn.info.function_id, None)
        if session is not None:
            del session
            with contextlib.suppress(RuntimeError):     # the pool is shut down when closing
                self._load_pool.submit(trim_malloc)
            self.counters.evictions_keep_alive += reason == "keep_alive"
            self.counters.evictions_memory += reason == "memory"
            log.info("released %s (%s%s)", fn.info.function_id[:12], reason, f", {detail}" if detail else "")
            self.listeners.emit("evict", fn.info, resident_bytes, reason=reason,
                                idle_s=round(time.monotonic() - fn.stats.last_used_s, 3))
            self._notify()

    def evict_idle(self, now_s: float | None = None) -> list[str]:
        """Release sessions idle for at least keep_alive_s (the keep-alive task calls this)."""
        now_s = time.monotonic() if now_s is None else now_s
        expired = eviction.past_keep_alive(self._loaded_view(), now_s, self.config.keep_alive_s)
        for fn in [f for f in self._all() if f.info.function_id in expired]:
            self._release(fn, "keep_alive", f"idle {now_s - fn.stats.last_used_s:.1f} s")
        return expired

    async def _reap_loop(self) -> None:
        while True:
            deadline = eviction.next_keep_alive_deadline_s(self._loaded_view(), self.config.keep_alive_s)
            idle_wait_s = min(max(self.config.keep_alive_s, 0.01), 1.0)   # lateness <= keep-alive (<= 1 s)
            await asyncio.sleep(idle_wait_s if deadline is None else
                                min(max(deadline - time.monotonic(), 0.005), idle_wait_s))
            self.evict_idle()

    async def load(self, function_ids: Sequence[str], wait: bool) -> tuple[list[str], list[str]]:
        """Prefetch. Returns (loaded now, not deployed); with ``wait=False`` loads continue in the background."""
        missing = [fid for fid in function_ids if fid not in self.deployed]
        cold = [self.deployed[fid] for fid in dict.fromkeys(function_ids) if fid in self.deployed]
        for fn in cold:
            if fn.session is None:
                if wait:
                    await self._load_once(fn, by_call=False)
                elif fn.loading is None:
                    self._spawn(self._load_once(fn, by_call=False))
        return [fid for fid in function_ids if fid in self.deployed and self.deployed[fid].session], missing

    # ---- calls
    async def invoke(self, calls: Sequence[Call], hidden: np.ndarray, caller: str = "",
                     layer: int | None = None) -> list[tuple[pb.CallResult, np.ndarray]]:
        """Run every call of one Invoke on ``hidden`` [N, H]; all calls are validated before any runs."""
        missing = sorted({call.function_id for call in calls if call.function_id not in self.deployed})
        if missing:
            raise FunctionNotFound(f"functions {', '.join(missing)} are not deployed on node {self.node_id}; deploy "
                                   "them there or send their rows to a node that has them", node=self.node_id,
                                   missing=tuple(missing))
        fns = [self._validate(call, hidden, layer) for call in calls]
        x = hidden if hidden.dtype == np.float32 else hidden.astype(np.float32)
        if len(calls) == 1 or self._all_inline(fns, calls):
            # nothing here waits (warm, tiny, a free slot): one after the other, without a task per call
            return [await self._call(fn, c, x, hidden.dtype, caller) for fn, c in zip(fns, calls)]
        return list(await asyncio.gather(*(self._call(fn, c, x, hidden.dtype, caller) for fn, c in zip(fns, calls))))

    def _all_inline(self, fns: Sequence[Function], calls: Sequence[Call]) -> bool:
        return (self._own_pool and not self._slots.locked()
                and all(fn.session is not None and is_tiny(c, fn.info) for fn, c in zip(fns, calls)))

    def _validate(self, call: Call, hidden: np.ndarray, layer: int | None = None) -> Function:
        fn = self.function(call.function_id)
        if layer is not None and layer != fn.info.layer:
            raise InvalidRequest(f"function {call.function_id} serves layer {fn.info.layer}, the request is for "
                                 f"layer {layer}")
        n_experts = len(fn.info.expert_ids)
        if len(call.expert_row_counts) != n_experts:
            raise InvalidRequest(f"function {call.function_id}: {len(call.expert_row_counts)} expert_row_counts "
                                 f"for its {n_experts} experts")
        if hidden.shape[1] != fn.info.hidden_size:
            raise InvalidRequest(f"function {call.function_id}: hidden width {hidden.shape[1]} != its hidden "
                                 f"size {fn.info.hidden_size}")
        return fn

    async def _call(self, fn: Function, call: Call, x: np.ndarray, out_dtype, caller: str = "") -> tuple[pb.CallResult,
                                                                                                  np.ndarray]:
        result = pb.CallResult(function_id=call.function_id)
        if not len(call.rows):
            return result, np.zeros((0, x.shape[1]), out_dtype)
        st = fn.stats
        st.in_flight += 1
        try:
            if fn.session is None or self._slots.locked():
                if self.queue_depth >= self.config.max_queue:
                    self.counters.backpressure += 1
                    raise Backpressure(f"node {self.node_id}: {self.queue_depth} calls already wait for a load or "
                                       f"a run slot (max queue {self.config.max_queue}); retry shortly",
                                       node=self.node_id)
                self.queue_depth += 1
                try:
                    if fn.session is None:
                        result.cold_start, result.load_s = True, await self._load_once(fn, by_call=True)
                    waited_from = time.perf_counter() if self._slots.locked() else None
                    if waited_from is not None:
                        st.waiting, st.waiting_since_sum_s = st.waiting + 1, st.waiting_since_sum_s + waited_from
                    try:
                        await self._slots.acquire(caller)
                    finally:
                        if waited_from is not None:
                            st.waiting, st.waiting_since_sum_s = st.waiting - 1, st.waiting_since_sum_s - waited_from
                            st.wait_s, st.waits = st.wait_s + time.perf_counter() - waited_from, st.waits + 1
                finally:
                    self.queue_depth -= 1
            else:
                await self._slots.acquire(caller)
            try:
                t0 = time.perf_counter()
                if self._own_pool and is_tiny(call, fn.info):
                    # a tiny run costs less than the hand-off to a worker thread: run it on the loop
                    out = run_session(fn.session, fn.info.rows_inputs, x, call.rows, call.expert_row_counts)
                else:
                    job = asyncio.get_running_loop().run_in_executor(
                        self._run_pool, run_session, fn.session, fn.info.rows_inputs, x, call.rows,
                        call.expert_row_counts)
                    try:
                        out = await asyncio.shield(job)
                    except asyncio.CancelledError:      # caller gone: keep slot and in-flight until ORT is done
                        await asyncio.wait([job])
                        raise
                result.compute_s = time.perf_counter() - t0
            finally:
                self._slots.release()
            st.invocations, st.rows = st.invocations + 1, st.rows + len(call.rows)
            st.rows_by_caller[caller] = st.rows_by_caller.get(caller, 0) + len(call.rows)
            st.compute_s += result.compute_s
            st.heat.add(call.expert_row_counts, time.monotonic())
        finally:
            st.in_flight -= 1
            st.last_used_s = time.monotonic()
            if st.in_flight == 0:
                if self.config.keep_alive_s == 0 or not fn.deployed:
                    self._release(fn, *(("keep_alive", "keep-alive 0") if fn.deployed else ("undeploy",)))
                self._notify()
        return result, (out if out.dtype == out_dtype else out.astype(out_dtype))
