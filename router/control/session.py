"""A router session for one store: which nodes are up, where the functions go, getting them there
(make-before-break), and the routing table the engine's steps read. Nodes are keyed by ``host:port``.

The session is the control plane's synchronous side (gRPC control calls from threads); the engine reaches it
through :class:`SessionControl`, which runs recoveries off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

from faasmoe.proto.credentials import TlsMaterial
from faasmoe.proto.errors import MeshError, NodeUnavailable, PlacementError
from faasmoe.router.control import placement as pl
from faasmoe.router.control.apply import PlacementApplier
from faasmoe.router.control.client import NodeClient
from faasmoe.router.control.replicas import Contention, ReplicaPolicy, decide, waits_of
from faasmoe.router.control.survey import NodeSurvey, NodeView, node_specs
from faasmoe.router.control.transition import Transition
from faasmoe.router.mesh.grouping import LayerFunctions
from faasmoe.router.store.manifest import Manifest, load_manifest

log = logging.getLogger(__name__)


class RouterSession:
    """One router's session for one store, by role: the survey (:class:`NodeSurvey`: clients, node views),
    the plan (here: placement over the surveyed nodes, the replica policy), the apply
    (:class:`PlacementApplier`: make-before-break, routing, leases, warm-up), and recovery (here: dead nodes,
    re-placement on the survivors)."""

    def __init__(self, store: str | Path, *, router_id: str | None = None, status_timeout_s: float = 5.0,
                 placement_options: pl.PlacementOptions | None = None, tls: TlsMaterial | None = None,
                 replica_policy: ReplicaPolicy | None = None):
        self.store = Path(store)
        self.tls = tls                             # cluster credentials: mutual TLS to every node (None: plaintext)
        self.manifest: Manifest = load_manifest(self.store)
        self.router_id = router_id or default_router_id(self.manifest)
        # explicit placement options win: no policy then (the controller does not survey contention)
        self.replica_policy = replica_policy or (ReplicaPolicy() if placement_options is None else None)
        self.placement_options = placement_options or self.replica_policy.options()
        self.contention = Contention()             # the auto replica policy's memory
        self._contention_at_s: float | None = None
        self.layers = {layer: LayerFunctions({f.function_id: f.expert_ids for f in self.manifest.layer_functions(layer)})
                       for layer in self.manifest.moe_layers}
        self._by_id = {f.function_id: f for f in self.manifest.functions}
        self._lock = threading.RLock()
        self._place_lock = threading.Lock()
        self.nodes = NodeSurvey(frozenset(self._by_id), self.router_id, tls, status_timeout_s)
        self.applier = PlacementApplier(self.store, self.manifest, self.router_id, self.nodes, self._lock)
        self.routing, self.placed_once = self.applier.routing, self.applier.placed_once
        self.dead: set[str] = set()
        self.on_mark_down: Callable[[str], None] | None = None     # set by callers that keep a NodeDirectory
        self.down_listeners: list[Callable[[str], None]] = []     # called (any thread) when a node goes down
        # with a node directory: the nodes it verified and sees up; recoveries place on these only, never on a
        # node discovery rejected (set by the placement controller)
        self.eligible: Callable[[], Iterable[str]] | None = None

    # -- survey (NodeSurvey) -----------------------------------------------------------------------------
    @property
    def clients(self) -> dict[str, NodeClient]:
        return self.nodes.clients

    @property
    def unreachable(self) -> dict[str, str]:
        return self.nodes.unreachable

    @property
    def max_message_bytes(self) -> dict[str, int]:
        return self.nodes.max_message_bytes

    def client(self, address: str) -> NodeClient:
        return self.nodes.client(address)

    def survey(self, addresses: Sequence[str]) -> list[NodeView]:
        return self.nodes.survey(addresses)

    def answers(self, address: str, timeout_s: float = 1.0) -> bool:
        return self.nodes.answers(address, timeout_s)

    # -- apply (PlacementApplier) ------------------------------------------------------------------------
    @property
    def placement(self) -> dict[str, tuple[str, ...]]:
        return self.applier.placement

    @property
    def budgets(self) -> dict[str, int]:
        return self.applier.budgets

    def apply(self, plan: dict[str, tuple[str, ...]], views: Sequence[NodeView]) -> tuple[int, int]:
        return self.applier.apply(plan, views)

    def transition_to(self, plan: dict[str, tuple[str, ...]], views: Sequence[NodeView]) -> Transition:
        return self.applier.transition_to(plan, views)

    def warm(self, timeout_s: float = 600.0) -> int:
        return self.applier.warm(timeout_s)

    # -- plan ----------------------------------------------------------------------------------------------
    def contention_round(self, addresses: Sequence[str]) -> bool:
        """``--replicas auto``: read the nodes' slot waits and update which functions hold a second copy.
        Returns True when that set changed (the caller re-places); a no-op for the other policies."""
        policy = self.replica_policy
        if policy is None or policy.mode != "auto":
            return False
        if not self._place_lock.acquire(blocking=False):      # a re-placement is under way: survey next time
            return False
        try:
            views = self.survey(addresses)
        finally:
            self._place_lock.release()
        now = time.monotonic()
        interval_s = now - self._contention_at_s if self._contention_at_s is not None else policy.interval_s
        self._contention_at_s = now
        new = decide(self.contention, waits_of(views, self._by_id), interval_s, policy)
        changed, self.contention = new.contended != self.contention.contended, new
        if changed:
            log.info("replicas auto: %d functions contended (%s)", len(new.contended),
                     ", ".join(sorted(self._by_id[f].name for f in new.contended)[:8]) or "none")
            self.placement_options = policy.options(new.contended)
        return changed

    def placement_functions(self) -> list[pl.FunctionSpec]:
        """The functions as placement sees them: sized by the memory they hold when loaded on a node."""
        return [pl.FunctionSpec(f.function_id, f.layer, f.footprint_bytes, f.expected_load, f.name)
                for f in self.manifest.functions]

    def plan(self, views: Sequence[NodeView]) -> dict[str, tuple[str, ...]]:
        if not views:
            tried = "; ".join(f"{a}: {why.split(';')[0]}" for a, why in sorted(self.unreachable.items()))
            raise PlacementError("no reachable node" + (f" ({tried})" if tried else "")
                                 + ": start faasmoe-node on some devices or check --nodes")
        current = {fid: [v.address for v in views if fid in v.held] for fid in self._by_id}
        return pl.place(self.placement_functions(), node_specs(views), current, self.placement_options)

    def move(self, function_id: str, source: str, target: str) -> None:
        """Move one copy of ``function_id`` from ``source`` to ``target``, make-before-break (an operator's
        move; the controller may move it back on its next re-placement)."""
        with self._place_lock:
            plan = {fid: tuple(nodes) for fid, nodes in self.placement.items()}
            nodes = set(plan.get(function_id, ()))
            if source not in nodes or target in nodes:
                raise PlacementError(f"cannot move {function_id[:12]} from {source} to {target}: it is on "
                                     f"{sorted(nodes) or 'no node'}")
            plan[function_id] = tuple(sorted((nodes - {source}) | {target}))
            self.apply(plan, self.survey(sorted({n for ns in plan.values() for n in ns} | {source})))

    def place_and_deploy(self, addresses: Sequence[str]) -> tuple[dict, list[NodeView]]:
        """Survey ``addresses`` (minus nodes known dead), plan, deploy the difference. Serialised: the
        controller (mesh changes) and recovery (a failed call) may both ask at once."""
        with self._place_lock:
            views = self.survey([a for a in addresses if a not in self.dead])
            plan = self.plan(views)
            self.apply(plan, views)
            return plan, views

    # -- recovery ------------------------------------------------------------------------------------------
    def placement_holds(self) -> bool:
        """Every function is routed to at least one node not known dead (what /health reports)."""
        with self._lock:
            return all(any(n not in self.dead for n in self.placement.get(fid, ())) for fid in self._by_id)

    def is_routed_around(self, address: str) -> bool:
        """``address`` is known dead and no function is routed to it any more."""
        with self._lock:
            return address in self.dead and all(address not in n for n in self.placement.values())

    def node_down(self, address: str) -> None:
        """Health checks say ``address`` is down: tell the listeners (the engine fails its in-flight calls, which
        then recover at once instead of waiting for the step deadline)."""
        for listener in list(self.down_listeners):
            try:
                listener(address)
            except Exception:  # noqa: BLE001 - a listener must not stop the others
                log.exception("node-down listener failed")

    def live_nodes(self) -> list[str]:
        eligible = None if self.eligible is None else set(self.eligible())
        with self._lock:
            live = set(self.clients) - self.dead
        return sorted(live if eligible is None else live & eligible)

    def revive(self, address: str) -> None:
        """``address`` answers health checks again: it may be placed on."""
        with self._lock:
            self.dead.discard(address)

    def recover(self, address: str, err: MeshError) -> None:
        """A node failed mid-request: drop it, re-place its functions on the survivors and deploy them."""
        log.warning("node %s failed (%s); re-placing its functions on the survivors", address, err.detail)
        with self._lock:
            self.dead.add(address)
            if self.on_mark_down is not None:
                self.on_mark_down(address)
        try:
            self.place_and_deploy(self.live_nodes())     # every node surveyed so far, minus the dead
        except PlacementError as exc:
            raise NodeUnavailable(f"died and the surviving nodes cannot hold its functions: {exc}",
                                  node=address) from None
        except MeshError as exc:
            raise NodeUnavailable(f"died and redeploying its functions failed: {exc}", node=address) from None

    def repair(self, pairs: set[tuple[str, str]]) -> None:
        """Nodes said NOT_FOUND for functions the routing table puts there (e.g. a node restarted and lost
        them): survey again and deploy what is missing."""
        log.warning("nodes lost %d function copies (%s); re-placing", len(pairs),
                    ", ".join(f"{fid[:12]}@{node}" for fid, node in sorted(pairs)[:4]))
        try:
            self.place_and_deploy(self.live_nodes())
        except (PlacementError, MeshError) as exc:
            raise NodeUnavailable(f"redeploying missing functions failed: {exc}") from None

    def release(self) -> int:
        """Let go of every lease this router holds (a clean stop): nodes drop the copies no other router
        holds. Returns the number of leases released."""
        with self._place_lock:
            with self._lock:
                pairs = [(fid, n) for fid, nodes in self.placement.items() for n in nodes if n not in self.dead]
            self.applier.route({})
            self.applier.release_pairs(pairs)
            return len(pairs)

    def close(self) -> None:
        self.nodes.close()


class SessionControl:
    """The engine's way into the session (:class:`~faasmoe.router.mesh.dispatch.MeshControl`): recoveries
    run in a worker thread, so the event loop keeps serving while nodes are re-placed. Concurrent requests for
    the same recovery share one (a step that gives up on its deadline leaves it running for the next)."""

    def __init__(self, session: RouterSession):
        self.session = session
        self._running: dict[tuple, asyncio.Future] = {}

    def _once(self, key: tuple, work, *args) -> asyncio.Future:
        future = self._running.get(key)
        if future is None or future.done():
            future = self._running[key] = asyncio.ensure_future(asyncio.to_thread(work, *args))
        return asyncio.shield(future)

    async def node_failed(self, node: str, error: MeshError) -> None:
        if self.session.is_routed_around(node):          # already re-placed without it
            return
        if await asyncio.to_thread(self.session.answers, node):   # broken link or slow call, not a dead node
            log.info("node %s: %s, but it answers Status: resending, nothing re-placed", node, error.detail)
            return
        await self._once(("dead", node), self.session.recover, node, error)

    async def functions_missing(self, pairs: set[tuple[str, str]]) -> None:
        await self._once(("missing",), self.session.repair, pairs)


def default_router_id(manifest: Manifest) -> str:
    """One owner per host and model: repeated runs of the router for a store take the same leases instead of
    piling up new ones. Routers that run at the same time on one host for one store need their own --router-id."""
    return f"{socket.gethostname()}/{manifest.model_id}"
