"""Fan-out of one MoE layer step to the nodes: one RPC per node, all concurrent, one absolute deadline.

The mesh knows where functions live (``placement``: function id -> node ids) and the clients of those
nodes. A node that fails with UNAVAILABLE is handed to ``on_node_failure`` (the router's recovery: re-place
and deploy its functions on the survivors, or raise saying why it cannot); the unanswered pairs are then
retried within the same deadline. Back-pressure (a node's full wait queue) is retried, not failed.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from faasmoe.proto import frames
from faasmoe.proto.errors import Backpressure, MeshError, NodeUnavailable, from_code_number
from faasmoe.router.mesh.client import NodeClient
from faasmoe.router.mesh.transport import invoke_all
from faasmoe.router.mesh.grouping import LayerFunctions, NodeBatch, choose_replicas, plan_layer

log = logging.getLogger(__name__)
BACKOFF_S = (0.005, 0.02, 0.05, 0.1, 0.2)
# The request a layer step belongs to (set around one generate() call): every Invoke of that request carries
# it, so nodes and, later, per-tenant accounting can tell requests apart.
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("faasmoe_request_id", default=None)


@dataclass
class MeshStats:
    """Where a step's time goes, summed over layer calls since the last reset."""

    layer_calls: int = 0
    rpcs: int = 0
    function_calls: int = 0
    rows_sent: int = 0
    wall_s: float = 0.0          # run_layer end to end
    encode_s: float = 0.0        # planning + framing on the router
    wait_s: float = 0.0          # from sending to the last reply (RPC + node time)
    node_compute_s: float = 0.0  # slowest node's own time (frame in to reply out) per layer call, summed
    decode_s: float = 0.0        # reading replies
    cold_starts: int = 0
    retries: int = 0
    by_node: dict = field(default_factory=dict)   # node -> rpc count

    def dispatch_s(self) -> float:
        """Time the mesh added beyond expert compute: serialization, RPC, waiting."""
        return max(self.wall_s - self.node_compute_s, 0.0)


@dataclass(frozen=True)
class ExpertResult:
    tokens: np.ndarray      # int64 [n]
    slots: np.ndarray       # int64 [n]
    output: np.ndarray      # float32 [n, H], unweighted expert output


class ExpertMesh:
    def __init__(self, layers: Mapping[int, LayerFunctions], clients: Mapping[str, NodeClient],
                 placement: Mapping[str, Sequence[str]], *, tenant_id: str = "default",
                 step_timeout_s: float = 30.0, max_message_bytes: int = frames.DEFAULT_MAX_MESSAGE_BYTES,
                 on_node_failure: Callable[[str, MeshError], None] | None = None,
                 compact_max_rows: int = 16):
        self.layers = dict(layers)
        self.clients = dict(clients)
        self.placement = {fid: tuple(nodes) for fid, nodes in placement.items()}
        self.tenant_id = tenant_id
        self.step_timeout_s = step_timeout_s
        self.max_message_bytes = max_message_bytes
        self.on_node_failure = on_node_failure
        self.stats = MeshStats()
        self.compact_max_rows = compact_max_rows
        self.on_layer_done: Callable[[int, float], None] | None = None   # (layer, seconds): metrics hook
        self._where = {layer: {e: fid for e, (fid, _) in lf.where.items()}
                       for layer, lf in self.layers.items()}
        self._lock = threading.Lock()
        self._turn = itertools.count()

    def update(self, clients: Mapping[str, NodeClient], placement: Mapping[str, Sequence[str]]) -> None:
        with self._lock:
            self.clients = dict(clients)
            self.placement = {fid: tuple(nodes) for fid, nodes in placement.items()}

    def _route(self, layer: int, top_k_index: np.ndarray, pending: np.ndarray | None) -> dict[str, str]:
        """One replica per function this step needs (fewest nodes for small steps, rotation otherwise)."""
        where = self._where[layer]
        asked = top_k_index if pending is None else top_k_index[pending]
        needed = sorted({where[e] for e in set(asked.reshape(-1).tolist()) if e in where})
        with self._lock:
            replicas = {fid: [n for n in self.placement.get(fid, ()) if n in self.clients] for fid in needed}
        for fid, nodes in replicas.items():
            if not nodes:
                raise NodeUnavailable(f"layer {layer}: function {fid[:12]} is on no reachable node")
        compact = top_k_index.shape[0] <= self.compact_max_rows
        return choose_replicas(needed, replicas, next(self._turn), compact)

    def run_layer(self, layer: int, hidden: np.ndarray, top_k_index: np.ndarray,
                  request_id: str | None = None) -> dict[int, list[ExpertResult]]:
        """Expert outputs of ``layer`` for every (token, slot) pair, grouped by expert id."""
        start = time.perf_counter()
        deadline = start + self.step_timeout_s
        hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        max_rows = max(1, int(0.9 * self.max_message_bytes) // (hidden.shape[1] * 4 * top_k_index.shape[1]))
        request_id = request_id or current_request_id.get() or uuid.uuid4().hex
        if hidden.shape[0] <= max_rows:
            results = self._run_chunk(layer, hidden, top_k_index, deadline, request_id)
        else:
            results: dict[int, list[ExpertResult]] = {}
            for lo in range(0, hidden.shape[0], max_rows):
                part = self._run_chunk(layer, hidden[lo:lo + max_rows], top_k_index[lo:lo + max_rows], deadline,
                                       request_id)
                for expert, items in part.items():
                    results.setdefault(expert, []).extend(
                        ExpertResult(r.tokens + lo, r.slots, r.output) for r in items)
        wall_s = time.perf_counter() - start
        self.stats.layer_calls += 1
        self.stats.wall_s += wall_s
        if self.on_layer_done is not None:
            self.on_layer_done(layer, wall_s)
        return results

    def _run_chunk(self, layer, hidden, top_k_index, deadline, request_id):
        pending = np.ones(top_k_index.shape, dtype=bool)
        results: dict[int, list[ExpertResult]] = {}
        backoff = iter(BACKOFF_S)
        retry = False
        while not retry or pending.any():
            t0 = time.perf_counter()
            mask = pending if retry else None          # a retry sends only the pairs still unanswered
            batches = plan_layer(top_k_index, self.layers[layer], self._route(layer, top_k_index, mask), layer, mask)
            failures = self._fan_out(layer, hidden, batches, deadline, request_id, results, pending, t0)
            if not failures:
                break
            retry = True
            self.stats.retries += 1
            for node, err in failures:
                if isinstance(err, Backpressure):
                    continue
                if not isinstance(err, NodeUnavailable) or self.on_node_failure is None:
                    raise err
                self.on_node_failure(node, err)   # re-places, or raises why it cannot
            if all(isinstance(e, Backpressure) for _, e in failures):
                pause_s = next(backoff, BACKOFF_S[-1])
                if time.perf_counter() + pause_s >= deadline:
                    raise failures[0][1]
                time.sleep(pause_s)
            if time.perf_counter() >= deadline:
                raise NodeUnavailable(f"layer {layer}: step deadline passed while retrying", node=failures[0][0])
        return results

    def _fan_out(self, layer, hidden, batches: list[NodeBatch], deadline, request_id, results, pending, t0):
        calls = []
        for batch in batches:
            frame = frames.encode_request(request_id, self.tenant_id, layer, hidden[batch.token_rows], batch.calls)
            calls.append((self.clients[batch.node_id], frame))
            self.stats.rows_sent += len(batch.token_rows)
            self.stats.function_calls += len(batch.calls)
            self.stats.by_node[batch.node_id] = self.stats.by_node.get(batch.node_id, 0) + 1
        t1 = time.perf_counter()
        self.stats.encode_s += t1 - t0
        self.stats.rpcs += len(calls)
        replies = invoke_all(calls, deadline)
        t2 = time.perf_counter()
        self.stats.wait_s += t2 - t1
        failures, slowest = [], 0.0
        for batch, reply in zip(batches, replies):
            if isinstance(reply, MeshError):
                failures.append((batch.node_id, reply))
                continue
            header, outputs = frames.decode_reply(reply)
            if header.HasField("error"):
                failures.append((batch.node_id, from_code_number(header.error.code, header.error.details,
                                                                 batch.node_id)))
                continue
            if header.request_id != request_id:
                raise MeshError(f"replied to request {header.request_id!r} instead of {request_id!r}",
                                batch.node_id)
            if len(outputs) != len(batch.calls):
                raise MeshError(f"replied {len(outputs)} results for {len(batch.calls)} calls", batch.node_id)
            slowest = max(slowest, header.node_s)      # the node's wall time: loads, queueing, ONNX runs
            self.stats.cold_starts += sum(r.cold_start for r in header.results)
            for seg in batch.segments:
                out = outputs[seg.call_index][seg.start:seg.start + len(seg.tokens)]
                if out.shape != (len(seg.tokens), hidden.shape[1]):
                    raise MeshError(f"output of expert {seg.expert_id} has shape {list(out.shape)}", batch.node_id)
                results.setdefault(seg.expert_id, []).append(ExpertResult(seg.tokens, seg.slots, out))
                pending[seg.tokens, seg.slots] = False
        self.stats.node_compute_s += slowest
        self.stats.decode_s += time.perf_counter() - t2
        return failures
