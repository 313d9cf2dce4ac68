"""Where each expert function is deployed: a pure function over plain data (no I/O, clock or randomness).

    place(functions, nodes, current, options) -> {function_id: (node_id, ...)}  |  raises PlacementError

Hard constraint: on every node the bytes of the functions deployed there (every copy counts) stay within
``capacity_bytes``, and every function is on at least one node. Soft goals, in priority order:

1. **Move little.** A function stays on every node of ``current`` that still exists and still has room
   (nodes that are gone are ignored). Only functions that lost their node, or that no longer fit because a
   node's capacity shrank, are placed anew. When nodes *join* (hold nothing in ``current`` while ``current``
   still has live assignments), existing copies move only *onto a joined node*, and only while that
   strictly evens out their layer: a copy of layer L moves from node A to joined node B only if A holds at
   least 2 more copies of L than B. This runs last, after new replicas (which undeploy nothing) had first
   pick of the joined node. So a leave never moves anything but the departed node's functions, and a join
   never shuffles functions between old nodes. ``rebalance_on_join=False`` turns the moves off.
2. **Spread each layer.** A new function goes to the node with the fewest functions of its layer, so one
   layer's fan-out runs on as many nodes in parallel as possible.
3. **Balance expected load.** Among those, the node with the least ``load / threads`` wins, where a node's
   load is the sum of its functions' layer-normalised expected load (divided by the copies when replicated).
   Newly placed functions of a layer are then swapped pairwise between nodes while that lowers the busier
   node's ``load / threads`` (a swap keeps every node's per-layer count, so spread is unchanged).
4. **Replicate hot functions.** With memory left over, extra copies go to other nodes (never two copies of one
   function on a node), largest marginal gain first: ``load / (k (k + 1))`` for a function with k copies, so
   the hottest function gets its second copy first. Replicas use at most ``1 - replica_headroom_fraction``
   of a node's capacity, so a departed node's functions can usually land without undeploying replicas, and
   at most ``replica_share`` of it for replica copies. ``replicate_only`` restricts extra copies to the
   functions it names (the ``auto`` replica policy: those whose calls were measured queueing at their node,
   :mod:`faasmoe.router.control.replicas`). Existing replicas are kept first, within capacity but ignoring
   the headroom (movement beats everything), as long as their function still has expected load > 0, is
   still eligible and the copy limit and share allow.

Expected load is a share of its layer's traffic: per layer, loads are normalised to sum 1; a layer whose
loads are all 0 (unknown) counts as uniform. If the preferred packing fails, best-fit-decreasing is tried,
first keeping the current assignments and then from scratch; only then is :class:`PlacementError` raised.
Ties are broken by ids, so the same input gives the same output.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from faasmoe.proto.errors import ConfigError, PlacementError

Placement = dict[str, tuple[str, ...]]   # function_id -> node ids (sorted), every function on >= 1 node
MIB = 1 << 20
_EPS = 1e-12


@dataclass(frozen=True)
class FunctionSpec:
    function_id: str
    layer: int
    bytes: int                     # deployed size in bytes (the ONNX file)
    expected_load: float = 0.0     # share of the layer's traffic, >= 0; 0 for the whole layer = uniform
    name: str = ""                 # human label for plans, e.g. L03.E08-11


class FunctionLike(Protocol):      # router.manifest.FunctionEntry qualifies as is
    function_id: str
    layer: int
    bytes: int
    expected_load: float
    name: str


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    capacity_bytes: int            # bytes of expert functions that may be deployed there
    threads: int = 1               # ORT intra-op threads; load is balanced per thread


@dataclass(frozen=True)
class PlacementOptions:
    max_replicas: int = 2                   # copies per function at most (1 = never replicate)
    replicate: bool = True                  # add copies of hot functions (False: drop existing extras)
    replica_headroom_fraction: float = 0.1  # share of each node's capacity replicas never use
    rebalance_on_join: bool = True          # may move functions onto joined nodes (rule 1 above)
    replicate_only: frozenset[str] | None = None   # only these functions may get extra copies (None: any)
    replica_share: float = 1.0              # share of each node's capacity extra copies may take at most


def mib(n_bytes: float) -> str:
    return f"{n_bytes / MIB:.1f} MiB"


def label(fn: FunctionLike) -> str:
    return getattr(fn, "name", "") or fn.function_id[:12]


def place(functions: Sequence[FunctionLike], nodes: Sequence[NodeSpec],
          current: Mapping[str, Iterable[str]] | None = None,
          options: PlacementOptions | None = None) -> Placement:
    """A placement of ``functions`` on ``nodes`` (see the module docstring for the rules)."""
    opts = options or PlacementOptions()
    _check_options(opts)
    funcs = sorted(functions, key=lambda f: f.function_id)
    nodes = sorted(nodes, key=lambda n: n.node_id)
    _check_inputs(funcs, nodes)
    if not funcs:
        return {}
    _check_totals(funcs, nodes)
    weights = layer_shares(funcs)
    current = current or {}
    failure = None
    for keep, packer in ((True, _pack_spread), (True, _pack_best_fit),
                         (False, _pack_spread), (False, _pack_best_fit)):
        st = _State(funcs, nodes, weights)
        prev_replicas, kept = st.keep(current) if keep else ([], set())
        new = [f for f in range(len(funcs)) if not st.holders[f]]
        failed = packer(st, new)
        if failed is None:
            break
        failure = (failed, st)          # report the last (from-scratch) attempt
    else:
        raise PlacementError(_pack_failure(*failure))
    _balance_swaps(st, new)
    replicate = opts.replicate and opts.max_replicas > 1
    if replicate:
        _keep_replicas(st, prev_replicas, opts)
        _replicate(st, opts)
    joined = [n for n in range(len(nodes)) if n not in kept]
    if kept and joined and opts.rebalance_on_join:
        _rebalance_onto(st, joined)
    return st.result()


def diff(old: Mapping[str, Iterable[str]], new: Mapping[str, Iterable[str]]
         ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(to_deploy, to_undeploy)``: sorted (function_id, node_id) pairs taking ``old`` to ``new``."""
    old_sets = {f: _node_set(ns) for f, ns in old.items()}
    new_sets = {f: _node_set(ns) for f, ns in new.items()}
    to_deploy = sorted((f, n) for f, ns in new_sets.items() for n in ns - old_sets.get(f, set()))
    to_undeploy = sorted((f, n) for f, ns in old_sets.items() for n in ns - new_sets.get(f, set()))
    return to_deploy, to_undeploy


def _node_set(node_ids: Iterable[str] | str) -> set[str]:
    return {node_ids} if isinstance(node_ids, str) else set(node_ids)


# ---------------------------------------------------------------------------------------------- checks

def _check_options(opts: PlacementOptions) -> None:
    if not isinstance(opts.max_replicas, int) or opts.max_replicas < 1:
        raise ConfigError(f"max_replicas must be an integer >= 1, got {opts.max_replicas!r}")
    if not 0.0 <= opts.replica_headroom_fraction < 1.0:
        raise ConfigError("replica_headroom_fraction must be in [0, 1), "
                          f"got {opts.replica_headroom_fraction!r}")
    if not 0.0 <= opts.replica_share <= 1.0:
        raise ConfigError(f"replica_share must be in [0, 1], got {opts.replica_share!r}")


def _check_inputs(funcs: list[FunctionLike], nodes: list[NodeSpec]) -> None:
    for prev, fn in zip(funcs, funcs[1:]):
        if prev.function_id == fn.function_id:
            raise PlacementError(f"function {fn.function_id} is listed twice")
    for fn in funcs:
        if fn.bytes < 0 or not math.isfinite(fn.expected_load) or fn.expected_load < 0:
            raise PlacementError(f"function {label(fn)}: bytes and expected_load must be >= 0 "
                                 f"(got {fn.bytes}, {fn.expected_load})")
    for prev, node in zip(nodes, nodes[1:]):
        if prev.node_id == node.node_id:
            raise PlacementError(f"node {node.node_id} is listed twice")
    for node in nodes:
        if node.capacity_bytes < 0 or node.threads < 1:
            raise PlacementError(f"node {node.node_id}: capacity_bytes must be >= 0 and threads >= 1 "
                                 f"(got {node.capacity_bytes}, {node.threads})")


def _check_totals(funcs: list[FunctionLike], nodes: list[NodeSpec]) -> None:
    need = sum(f.bytes for f in funcs)
    if not nodes:
        raise PlacementError(f"no nodes to place {len(funcs)} functions ({mib(need)}) on: start "
                             "faasmoe-node on an edge device or pass --nodes host:port,...")
    have = sum(n.capacity_bytes for n in nodes)
    if need > have:
        raise PlacementError(f"functions need {mib(need)} but the {len(nodes)} nodes can hold {mib(have)}: "
                             f"add nodes with >= {mib(need - have)} or raise --memory-budget-mb")
    biggest = max(nodes, key=lambda n: (n.capacity_bytes, n.node_id))
    fn = max(funcs, key=lambda f: (f.bytes, f.function_id))
    if fn.bytes > biggest.capacity_bytes:
        raise PlacementError(f"function {label(fn)} is {mib(fn.bytes)} but the largest node "
                             f"({biggest.node_id}) can hold {mib(biggest.capacity_bytes)}: raise its "
                             f"--memory-budget-mb to >= {mib(fn.bytes)}, add a bigger node, "
                             "or split with a smaller --group-size")


def _pack_failure(f: int, st: _State) -> str:
    fn = st.funcs[f]
    n = max(range(len(st.nodes)), key=lambda i: (st.free[i], -i))
    return (f"cannot pack function {label(fn)} ({mib(fn.bytes)}): the largest free space left is "
            f"{mib(st.free[n])} on {st.nodes[n].node_id} (total free {mib(sum(st.free))} is fragmented): "
            f"add a node with >= {mib(fn.bytes)} or raise --memory-budget-mb")


def layer_shares(funcs: Sequence[FunctionLike]) -> list[float]:
    """Each function's share of its layer's traffic (aligned with ``funcs``); all-zero layer = uniform."""
    by_layer: dict[int, list[int]] = {}
    for i, fn in enumerate(funcs):
        by_layer.setdefault(fn.layer, []).append(i)
    shares = [0.0] * len(funcs)
    for idxs in by_layer.values():
        total = sum(funcs[i].expected_load for i in idxs)
        for i in idxs:
            shares[i] = funcs[i].expected_load / total if total > 0 else 1.0 / len(idxs)
    return shares


# ---------------------------------------------------------------------------------------------- state

class _State:
    """Mutable working copy: functions and nodes by index (both sorted by id)."""

    def __init__(self, funcs: list[FunctionLike], nodes: list[NodeSpec], weights: list[float]):
        self.funcs, self.nodes, self.w = funcs, nodes, weights
        self.free = [n.capacity_bytes for n in nodes]
        self.load = [0.0] * len(nodes)              # sum of weight / copies, per node
        self.thr = [n.threads for n in nodes]
        self.holders: list[list[int]] = [[] for _ in funcs]
        self.count = {fn.layer: [0] * len(nodes) for fn in funcs}   # functions of a layer per node
        self.members: dict[tuple[int, int], set[int]] = {}          # (node, layer) -> functions
        self.replica_bytes = [0] * len(nodes)       # bytes of extra copies added by the replica phases

    def share(self, f: int) -> float:
        """The load one copy of ``f`` carries."""
        return self.w[f] / len(self.holders[f])

    def norm(self, n: int, extra: float = 0.0) -> float:
        return round((self.load[n] + extra) / self.thr[n], 12)

    def add(self, f: int, n: int) -> None:
        k, w, hs = len(self.holders[f]), self.w[f], self.holders[f]
        for h in hs:
            self.load[h] -= w / k - w / (k + 1)
        self.load[n] += w / (k + 1)
        hs.append(n)
        hs.sort()
        self.free[n] -= self.funcs[f].bytes
        layer = self.funcs[f].layer
        self.count[layer][n] += 1
        self.members.setdefault((n, layer), set()).add(f)

    def remove(self, f: int, n: int) -> None:
        k, w, hs = len(self.holders[f]), self.w[f], self.holders[f]
        hs.remove(n)
        self.load[n] -= w / k
        for h in hs:
            self.load[h] += w / (k - 1) - w / k
        self.free[n] += self.funcs[f].bytes
        layer = self.funcs[f].layer
        self.count[layer][n] -= 1
        self.members[(n, layer)].discard(f)

    def keep(self, current: Mapping[str, Iterable[str]]) -> tuple[list[tuple[int, int]], set[int]]:
        """Re-place one copy of each function where it was; return (its other live copies, live nodes)."""
        f_index = {fn.function_id: i for i, fn in enumerate(self.funcs)}
        n_index = {node.node_id: i for i, node in enumerate(self.nodes)}
        extra: list[tuple[int, int]] = []
        kept: set[int] = set()
        for fid in sorted(current):
            f = f_index.get(fid)
            if f is None:
                continue
            for n in sorted(n_index[x] for x in _node_set(current[fid]) if x in n_index):
                kept.add(n)
                if not self.holders[f] and self.free[n] >= self.funcs[f].bytes:
                    self.add(f, n)
                elif self.holders[f]:
                    extra.append((f, n))
        return extra, kept

    def result(self) -> Placement:
        return {fn.function_id: tuple(self.nodes[n].node_id for n in self.holders[f])
                for f, fn in enumerate(self.funcs)}


# ---------------------------------------------------------------------------------------------- phases

def _pack_spread(st: _State, todo: list[int]) -> int | None:
    """Largest first; fewest functions of the layer, then least load per thread. Returns a misfit."""
    for f in sorted(todo, key=lambda f: (-st.funcs[f].bytes, -st.w[f], st.funcs[f].layer, f)):
        size, counts = st.funcs[f].bytes, st.count[st.funcs[f].layer]
        fits = [n for n in range(len(st.nodes)) if st.free[n] >= size]
        if not fits:
            return f
        st.add(f, min(fits, key=lambda n: (counts[n], st.norm(n, st.w[f]), -st.free[n], n)))
    return None


def _pack_best_fit(st: _State, todo: list[int]) -> int | None:
    """Best-fit decreasing: the tightest node that still fits. Returns a misfit."""
    for f in sorted(todo, key=lambda f: (-st.funcs[f].bytes, f)):
        size, counts = st.funcs[f].bytes, st.count[st.funcs[f].layer]
        fits = [n for n in range(len(st.nodes)) if st.free[n] >= size]
        if not fits:
            return f
        st.add(f, min(fits, key=lambda n: (st.free[n] - size, counts[n], n)))
    return None


def _balance_swaps(st: _State, new: list[int], max_passes: int = 8) -> None:
    """Swap newly placed functions of one layer between nodes while the busier node gets lighter."""
    by_layer: dict[int, list[int]] = {}
    for f in new:
        by_layer.setdefault(st.funcs[f].layer, []).append(f)
    layers = [sorted(fs, key=lambda f: (-st.w[f], f)) for _, fs in sorted(by_layer.items())
              if max(st.w[f] for f in fs) - min(st.w[f] for f in fs) > _EPS]
    load, thr, w, holders = st.load, st.thr, st.w, st.holders
    for _ in range(max_passes):
        improved = False
        for fs in layers:
            for i, f in enumerate(fs):
                a = holders[f][0]
                for g in fs[i + 1:]:
                    b, d = holders[g][0], w[f] - w[g]
                    if a == b or d <= _EPS or load[a] / thr[a] <= load[b] / thr[b] + _EPS:
                        continue
                    after = max((load[a] - d) / thr[a], (load[b] + d) / thr[b])
                    if after < load[a] / thr[a] - _EPS and _swap_fits(st, f, g, a, b):
                        st.remove(f, a), st.remove(g, b), st.add(f, b), st.add(g, a)
                        a, improved = b, True
        if not improved:
            return


def _swap_fits(st: _State, f: int, g: int, a: int, b: int) -> bool:
    size_f, size_g = st.funcs[f].bytes, st.funcs[g].bytes
    return st.free[a] + size_f >= size_g and st.free[b] + size_g >= size_f


def _rebalance_onto(st: _State, joined: list[int]) -> None:
    """Round-robin over layers: move one copy per layer onto a joined node while that evens it out."""
    progress = True
    while progress:
        progress = False
        for layer in sorted(st.count):
            progress |= _move_one(st, layer, joined)


def _move_one(st: _State, layer: int, joined: list[int]) -> bool:
    counts = st.count[layer]
    pairs = sorted(((a, b) for b in joined for a in range(len(st.nodes))
                    if a != b and counts[a] - counts[b] >= 2),
                   key=lambda p: (counts[p[1]] - counts[p[0]], st.norm(p[1]) - st.norm(p[0]), p))
    for a, b in pairs:
        movable = [f for f in st.members[(a, layer)]
                   if st.funcs[f].bytes <= st.free[b] and b not in st.holders[f]]
        if movable:
            f = min(movable, key=lambda f: (max(st.norm(a, -st.share(f)), st.norm(b, st.share(f))), f))
            st.remove(f, a)
            st.add(f, b)
            return True
    return False


def _eligible(st: _State, f: int, opts: PlacementOptions) -> bool:
    return st.w[f] > 0 and (opts.replicate_only is None or st.funcs[f].function_id in opts.replicate_only)


def _within_share(st: _State, f: int, n: int, opts: PlacementOptions) -> bool:
    return st.replica_bytes[n] + st.funcs[f].bytes <= opts.replica_share * st.nodes[n].capacity_bytes


def _add_replica(st: _State, f: int, n: int) -> None:
    st.add(f, n)
    st.replica_bytes[n] += st.funcs[f].bytes


def _keep_replicas(st: _State, previous: list[tuple[int, int]], opts: PlacementOptions) -> None:
    """Existing extra copies stay (within capacity, headroom ignored) while their function is hot and eligible."""
    for f, n in sorted(previous, key=lambda p: (-st.w[p[0]], p)):
        if (_eligible(st, f, opts) and len(st.holders[f]) < opts.max_replicas and n not in st.holders[f]
                and st.free[n] >= st.funcs[f].bytes and _within_share(st, f, n, opts)):
            _add_replica(st, f, n)


def _replicate(st: _State, opts: PlacementOptions) -> None:
    """New copies, largest marginal gain first, within capacity minus the replica headroom and the share."""
    limit = [n.capacity_bytes * (1.0 - opts.replica_headroom_fraction) for n in st.nodes]

    def room(f: int, n: int) -> bool:
        used = st.nodes[n].capacity_bytes - st.free[n]
        return n not in st.holders[f] and used + st.funcs[f].bytes <= limit[n] and _within_share(st, f, n, opts)

    heap = [(-round(st.w[f] / (k * (k + 1)), 12), st.funcs[f].layer, f)
            for f in range(len(st.funcs)) if _eligible(st, f, opts) and (k := len(st.holders[f])) < opts.max_replicas]
    heapq.heapify(heap)
    while heap:
        _, layer, f = heapq.heappop(heap)
        k, counts = len(st.holders[f]), st.count[layer]
        fits = [n for n in range(len(st.nodes)) if room(f, n)]
        if not fits:
            continue                     # free space only shrinks from here on
        share = st.w[f] / (k + 1)
        _add_replica(st, f, min(fits, key=lambda n: (counts[n], st.norm(n, share), -st.free[n], n)))
        if k + 1 < opts.max_replicas:
            heapq.heappush(heap, (-round(st.w[f] / ((k + 1) * (k + 2)), 12), layer, f))
