"""One MoE layer step on the mesh, as submit/collect on the engine's event loop.

:meth:`ExpertMesh.submit` runs right after the gate: on the step's routing snapshot it picks one replica per
needed function, groups the rows into one frame per node (:mod:`~faasmoe.router.mesh.grouping`) and hands the
frames to the nodes' streams, whose writes start before ``submit`` returns. The caller computes the shared
expert meanwhile; :meth:`ExpertMesh.collect` then gathers the replies and retries what failed, within the
step's deadline and without marking a healthy node dead:

- back-pressure (a node's wait queue is full): back off, resend (flow control, bounded by the step deadline);
- NOT_FOUND (the function moved away): route around that copy on a fresh snapshot, or ask control to repair;
- a frame over a message limit: split the rows into smaller frames, resend;
- UNAVAILABLE (a node that is gone): control's recovery re-places its functions on the survivors, then resend;
- DEADLINE_EXCEEDED (no reply within ``frame_timeout_s``): resend to another replica; with none, recover as for
  UNAVAILABLE (which makes one);
- anything else is raised to the step.

Failed frames (UNAVAILABLE, DEADLINE_EXCEEDED) get at most :data:`~faasmoe.router.mesh.retry.MAX_ATTEMPTS`
attempts per step, with jittered backoff, each retry taken from the mesh's :class:`RetryBudget`; a node that
keeps failing is banned for a while and avoided where another replica exists. When a needed function has no
replica left the step fails with an explicit error, unless ``degraded`` is on: then the missing experts are
dropped from the step, and the step's context lists them (the response says so).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

import numpy as np

from faasmoe.proto import frames
from faasmoe.proto.backoff import Backoff
from faasmoe.proto.errors import (Backpressure, DeadlineExceeded, FrameTooLarge, FunctionNotFound, MeshError,
                                  NodeFull, NodeUnavailable, from_code_number)
from faasmoe.router.mesh.grouping import LayerFunctions, NodeBatch, choose_replicas, plan_layer
from faasmoe.router.mesh.retry import MAX_ATTEMPTS, RETRY_BACKOFF, NodeBans, RetryBudget, prefer_unbanned
from faasmoe.router.mesh.routing import RoutingBoard, RoutingTable
from faasmoe.router.mesh.stats import MeshStats
from faasmoe.router.mesh.transport import Transport

log = logging.getLogger(__name__)
BACKPRESSURE = Backoff(0.005, 0.2, factor=2.5, jitter=0.3)
MAX_REPAIRS = 2           # per layer step: re-surveys after NOT_FOUND with no other replica


class MeshControl(Protocol):
    """What the mesh asks of the control plane when a call fails (both may take a while: run off the loop)."""

    async def node_failed(self, node: str, error: MeshError) -> None:
        """``node`` is gone: re-place its functions on the survivors (raise NodeUnavailable if they cannot)."""

    async def functions_missing(self, pairs: set[tuple[str, str]]) -> None:
        """Nodes answered NOT_FOUND for these (function, node) pairs: survey and redeploy what is missing."""


@dataclass
class StepContext:
    """One engine step: its request id, deadline (``time.perf_counter`` clock) and routing snapshot."""

    request_id: str
    deadline_s: float
    routing: RoutingTable
    tenant_id: str = ""                  # set when the step carries one tenant's rows only
    # the engine's hook for every node reply of this step: (layer, node, batch, reply header, row offset);
    # the mesh knows nothing of whom the rows belong to
    on_reply: Callable[[int, str, NodeBatch, object, int], None] | None = None
    dropped: list[tuple[int, int, int]] = field(default_factory=list)   # degraded: (layer, expert, row)


@dataclass(frozen=True)
class ExpertResult:
    tokens: np.ndarray      # int64 [n]
    slots: np.ndarray       # int64 [n]
    output: np.ndarray      # float32 [n, H], unweighted expert output


@dataclass
class _Sent:
    node: str
    batch: NodeBatch
    offset: int                  # first row of the batch's chunk in the layer's rows
    reply: asyncio.Future
    deadline_s: float = float("inf")     # of this frame (perf_counter clock)


@dataclass
class PendingLayer:
    layer: int
    hidden: np.ndarray           # float32 [T, H]
    top_k_index: np.ndarray      # [T, k]
    ctx: StepContext
    started_s: float
    max_rows: int                # rows per frame (halved when a frame is too large)
    pending: np.ndarray | None = None                    # bool [T, k]: pairs not answered yet (after a failure)
    results: dict[int, list[ExpertResult]] = field(default_factory=dict)
    sent: list[_Sent] = field(default_factory=list)
    missing: set[tuple[str, str]] = field(default_factory=set)   # (function, node) answered NOT_FOUND
    no_replica: MeshError | None = None
    pauses: int = 0
    repairs: int = 0
    attempts: int = 1                    # sends of the failed frames (UNAVAILABLE / DEADLINE_EXCEEDED)
    avoid: set[str] = field(default_factory=set)      # nodes that timed out in this step


class ExpertMesh:
    def __init__(self, layers: Mapping[int, LayerFunctions], transport: Transport, routing: RoutingBoard | None = None, *,
                 control: MeshControl | None = None, step_timeout_s: float = 30.0, compact_max_rows: int = 16,
                 frame_timeout_s: float = 10.0, degraded: bool = False):
        self.layers = dict(layers)
        self.transport = transport
        self.routing = routing or RoutingBoard()
        self.control = control
        self.step_timeout_s = step_timeout_s
        self.frame_timeout_s = frame_timeout_s
        self.degraded = degraded          # opt-in: drop experts with no answering replica (labelled)
        self.budget = RetryBudget()
        self.bans = NodeBans()
        self.node_max_message_bytes: dict[str, int] = {}   # each node's advertised limit (Status, mDNS)
        self.compact_max_rows = compact_max_rows
        self.stats = MeshStats()          # updated on the loop only
        self.on_layer_done = None         # (layer, seconds) -> None: metrics hook
        self.caller = ""                  # this router's id on the nodes (their fair queues are per caller)
        self._where = {layer: {e: fid for e, (fid, _) in lf.where.items()} for layer, lf in self.layers.items()}
        self._turn = 0
        self.max_rows_learned = 1 << 30   # rows per frame that a node's message limit turned out to allow

    def context(self, request_id: str, tenant_id: str = "", timeout_s: float | None = None) -> StepContext:
        """A step's context: one routing snapshot, one deadline."""
        timeout_s = self.step_timeout_s if timeout_s is None else timeout_s
        return StepContext(request_id, time.perf_counter() + timeout_s, self.routing.table, tenant_id)

    # -- submit ----------------------------------------------------------------------------------------
    async def submit(self, layer: int, hidden: np.ndarray, top_k_index: np.ndarray, ctx: StepContext) -> PendingLayer:
        """Send the layer's frames; their writes are under way when this returns."""
        hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        # a reply carries up to top_k outputs per row sent: size frames by the larger direction
        per_row = hidden.shape[1] * 4 * max(1, top_k_index.shape[1]) + 64
        limit = min([self.transport.max_message_bytes, *self.node_max_message_bytes.values()])
        max_rows = min(self.max_rows_learned, max(1, int(0.9 * limit) // per_row))
        p = PendingLayer(layer, hidden, top_k_index, ctx, time.perf_counter(), max_rows)
        self._send(p)
        await asyncio.sleep(0)       # run the write tasks up to the hand-off to gRPC's core
        return p

    def _send(self, p: PendingLayer) -> None:
        """Send every pair still pending, on ``p.ctx.routing`` minus known-missing copies."""
        t0 = time.perf_counter()
        n_tokens = p.top_k_index.shape[0]
        self._turn += 1
        try:
            for lo in range(0, n_tokens, p.max_rows):
                hi = min(n_tokens, lo + p.max_rows)
                top_k = p.top_k_index[lo:hi]
                mask = None if p.pending is None else p.pending[lo:hi]
                if mask is not None and not mask.any():
                    continue
                node_of = self._route(p, top_k if mask is None else top_k[mask.any(axis=1)])
                for batch in plan_layer(top_k, self.layers[p.layer], node_of, p.layer, mask):
                    frame = frames.encode_request(p.ctx.request_id, p.ctx.tenant_id, p.layer,
                                                  p.hidden[lo + batch.token_rows], batch.calls, self.caller)
                    p.sent.append(_Sent(batch.node_id, batch, lo, self.transport.stream(batch.node_id).send(frame),
                                        min(p.ctx.deadline_s, t0 + self.frame_timeout_s)))
                    self.stats.count_frame(batch.node_id, len(batch.token_rows), len(batch.calls))
                    if p.pending is None:
                        self.budget.sent(t0)
        except NodeUnavailable as exc:        # a needed function has no reachable copy: collect() repairs
            p.no_replica = exc
        self.stats.encode_s += time.perf_counter() - t0

    def _route(self, p: PendingLayer, top_k: np.ndarray) -> dict[str, str]:
        where = self._where[p.layer]
        needed = sorted({where[e] for e in set(top_k.reshape(-1).tolist()) if e in where})
        banned = self.bans.banned(time.perf_counter()) | p.avoid
        replicas = {fid: prefer_unbanned(p.ctx.routing.nodes_of(fid, p.missing), banned) for fid in needed}
        for fid, nodes in replicas.items():
            if not nodes:
                raise NodeUnavailable(f"layer {p.layer}: function {fid[:12]} is on no reachable node")
            if p.avoid and all(n in p.avoid for n in nodes):
                raise NodeUnavailable(f"layer {p.layer}: function {fid[:12]} timed out on every replica")
        return choose_replicas(needed, replicas, self._turn, p.top_k_index.shape[0] <= self.compact_max_rows)

    # -- collect ---------------------------------------------------------------------------------------
    async def collect(self, p: PendingLayer) -> dict[int, list[ExpertResult]]:
        """Expert outputs for every (token, slot) pair of the layer, grouped by expert id."""
        while True:
            failures = await self._gather(p)
            if p.no_replica is not None:
                failures.append((None, p.no_replica, None))
                p.no_replica = None
            if not failures:
                if p.pending is not None and p.pending.any():
                    raise MeshError(f"layer {p.layer}: {int(p.pending.sum())} expert calls went unanswered")
                break
            try:
                await self._handle(p, failures)
            except NodeUnavailable as exc:
                if not self.degraded or p.pending is None:
                    raise
                self._drop(p, exc)
                break
            self.stats.retries += 1
            self._send(p)
        wall_s = time.perf_counter() - p.started_s
        self.stats.layer_calls += 1
        self.stats.wall_s += wall_s
        if self.on_layer_done is not None:
            self.on_layer_done(p.layer, wall_s)
        return p.results

    async def _gather(self, p: PendingLayer) -> list[tuple[str | None, MeshError, NodeBatch | None]]:
        sent, p.sent = p.sent, []
        if not sent:
            return []
        t0 = time.perf_counter()
        while waiting := [s for s in sent if not s.reply.done()]:
            left_s = min(s.deadline_s for s in waiting) - time.perf_counter()
            if left_s > 0:
                await asyncio.wait([s.reply for s in waiting], timeout=left_s)
            now = time.perf_counter()
            for s in waiting:
                if not s.reply.done() and now >= s.deadline_s:   # its stream's order is lost: end the stream
                    which = "the step's deadline" if s.deadline_s >= p.ctx.deadline_s else \
                        f"the frame deadline ({self.frame_timeout_s:g} s)"
                    self.transport.stream(s.node).fail(DeadlineExceeded(
                        f"layer {p.layer}: no reply within {which}", node=s.node))
                    if not s.reply.done():
                        s.reply.set_exception(DeadlineExceeded("no reply in time", node=s.node))
        t1 = time.perf_counter()
        self.stats.wait_s += t1 - t0
        if p.pending is None:
            p.pending = np.ones(p.top_k_index.shape, dtype=bool)
        failures, slowest_s = [], 0.0
        for s in sent:
            exc = s.reply.exception()
            if exc is not None:
                if not isinstance(exc, MeshError):
                    raise exc
                failures.append((s.node, exc, s.batch))
                continue
            header, outputs = frames.decode_reply(s.reply.result())
            if header.HasField("error"):
                err = from_code_number(header.error.code, header.error.details, s.node)
                if isinstance(err, FunctionNotFound):
                    err.missing = tuple(header.error.missing_functions)
                failures.append((s.node, err, s.batch))
                continue
            self._take(p, s, header, outputs)
            self.bans.succeeded(s.node)
            slowest_s = max(slowest_s, header.node_s)
        self.stats.node_compute_s += slowest_s
        self.stats.decode_s += time.perf_counter() - t1
        return failures

    def _take(self, p: PendingLayer, s: _Sent, header, outputs) -> None:
        if header.request_id != p.ctx.request_id:
            raise MeshError(f"replied to request {header.request_id!r} instead of {p.ctx.request_id!r}", s.node)
        if len(outputs) != len(s.batch.calls):
            raise MeshError(f"replied {len(outputs)} results for {len(s.batch.calls)} calls", s.node)
        self.stats.cold_starts += sum(r.cold_start for r in header.results)
        width = p.hidden.shape[1]
        for seg in s.batch.segments:
            out = outputs[seg.call_index][seg.start:seg.start + len(seg.tokens)]
            if out.shape != (len(seg.tokens), width):
                raise MeshError(f"output of expert {seg.expert_id} has shape {list(out.shape)}", s.node)
            tokens = seg.tokens + s.offset if s.offset else seg.tokens
            p.results.setdefault(seg.expert_id, []).append(ExpertResult(tokens, seg.slots, out))
            p.pending[tokens, seg.slots] = False
            self.stats.answered_pairs += len(seg.tokens)
        if p.ctx.on_reply is not None:
            p.ctx.on_reply(p.layer, s.node, s.batch, header, s.offset)

    async def _handle(self, p: PendingLayer, failures) -> None:
        """Decide how to retry the failed frames (see the module docstring)."""
        pause, dead, missing, need_repair, too_large, failed = False, {}, set(), None, [], None
        now = time.perf_counter()
        for node, err, batch in failures:
            if isinstance(err, NodeUnavailable) and node is not None:
                failed = failed or err
                if node not in dead and node not in p.avoid:
                    self.bans.failed(node, now)
            if isinstance(err, Backpressure):
                pause = True
            elif isinstance(err, FrameTooLarge):
                too_large.append((len(batch.token_rows), err))
            elif isinstance(err, FunctionNotFound):
                fids = err.missing or tuple(call.function_id for call in batch.calls)
                missing |= {(fid, node) for fid in fids}
                need_repair = need_repair or err
            elif isinstance(err, NodeUnavailable) and node is None:    # no copy left of a needed function
                need_repair = need_repair or err
            elif isinstance(err, DeadlineExceeded) and self._elsewhere(p, node, batch):
                p.avoid.add(node)                                     # another replica answers instead
            elif isinstance(err, NodeUnavailable):
                dead[node] = err
            elif isinstance(err, NodeFull):   # this copy cannot load (memory, or refused): as if it were missing
                missing |= {(call.function_id, node) for call in batch.calls}
                need_repair = need_repair or err
            else:
                raise err
        if too_large:                     # one oversized frame fails its whole stream: size by the largest
            rows, err = max(too_large, key=lambda r: r[0])
            if rows <= 1:
                raise err
            p.max_rows = min(p.max_rows, max(1, rows // 2))
            self.max_rows_learned = p.max_rows
        self._check_deadline(p)
        if failed is not None:
            await self._retry_pause(p, failed, sum(isinstance(e, NodeUnavailable) and n is not None
                                                   for n, e, _ in failures))
        for node, err in dead.items():
            if self.control is None:
                raise err
            await self._bounded(p, self.control.node_failed(node, err))
            await self.transport.forget(node)
        if dead:
            p.ctx.routing = self.routing.table
        if need_repair is not None:
            if self.routing.table.version != p.ctx.routing.version:   # placement moved on: use the new table
                p.ctx.routing, p.missing = self.routing.table, set()
            else:
                p.missing |= missing
            if not self._all_routable(p):
                if self.control is None or p.repairs >= MAX_REPAIRS:
                    raise need_repair
                p.repairs += 1
                await self._bounded(p, self.control.functions_missing(set(p.missing)))
                p.ctx.routing, p.missing = self.routing.table, set()
        if pause:
            delay_s = BACKPRESSURE.delay_s(p.pauses)
            p.pauses += 1
            if time.perf_counter() + delay_s >= p.ctx.deadline_s:
                raise next(e for _, e, _ in failures if isinstance(e, Backpressure))
            await asyncio.sleep(delay_s)
        self._check_deadline(p)

    def _elsewhere(self, p: PendingLayer, node: str, batch: NodeBatch) -> bool:
        """Has every function of ``batch`` a replica other than ``node`` and the nodes that timed out?"""
        skip = p.avoid | {node}
        return all(any(n not in skip for n in p.ctx.routing.nodes_of(call.function_id, p.missing))
                   for call in batch.calls)

    async def _retry_pause(self, p: PendingLayer, err: MeshError, frames: int) -> None:
        """``frames`` failed frames are about to be resent: within the attempt limit and the retry budget (one
        token per frame), after a jittered backoff, or not at all (``err`` is raised)."""
        if p.attempts >= MAX_ATTEMPTS:
            raise type(err)(f"{err.detail} (gave up after {p.attempts} attempts)", node=err.node)
        if not self.budget.try_retry(time.perf_counter(), frames):
            raise type(err)(f"{err.detail} (the router's retry budget is spent: no retry)", node=err.node)
        delay_s = RETRY_BACKOFF.delay_s(p.attempts - 1)
        p.attempts += 1
        if time.perf_counter() + delay_s < p.ctx.deadline_s:
            await asyncio.sleep(delay_s)

    def _drop(self, p: PendingLayer, err: MeshError) -> None:
        """Degraded mode: the pairs still unanswered are dropped from the step (and listed in its context)."""
        tokens, slots = np.nonzero(p.pending)
        experts = p.top_k_index[tokens, slots].tolist()
        p.ctx.dropped.extend((p.layer, int(e), int(t)) for e, t in zip(experts, tokens.tolist()))
        p.pending[:] = False
        self.stats.dropped_pairs += len(experts)
        log.warning("degraded: layer %d drops %d expert calls (%s)", p.layer, len(experts), err.detail)

    def _all_routable(self, p: PendingLayer) -> bool:
        where = self._where[p.layer]
        asked = p.top_k_index if p.pending is None else p.top_k_index[p.pending]
        return all(p.ctx.routing.nodes_of(where[e], p.missing) for e in set(asked.reshape(-1).tolist()) if e in where)

    async def _bounded(self, p: PendingLayer, work) -> None:
        left_s = p.ctx.deadline_s - time.perf_counter()
        try:
            await asyncio.wait_for(work, max(left_s, 0.001))
        except asyncio.TimeoutError:
            raise NodeUnavailable(f"layer {p.layer}: recovery did not finish within the step deadline") from None

    def _check_deadline(self, p: PendingLayer) -> None:
        if time.perf_counter() >= p.ctx.deadline_s:
            raise NodeUnavailable(f"layer {p.layer}: step deadline passed while retrying")
