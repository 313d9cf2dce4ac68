"""The apply role of a router session: take the mesh from what the nodes hold to a plan, make-before-break
(:mod:`~faasmoe.router.control.transition`), publish the routing table the engine's steps read, release
leases, and warm placed functions."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

from faasmoe.proto import faasmoe_pb2 as pb
from faasmoe.proto.errors import MeshError
from faasmoe.router.control.survey import NodeSurvey, NodeView
from faasmoe.router.control.transition import Transition, transition
from faasmoe.router.mesh.routing import RoutingBoard
from faasmoe.router.store.manifest import FunctionEntry, Manifest

log = logging.getLogger(__name__)


class PlacementApplier:
    def __init__(self, store: Path, manifest: Manifest, router_id: str, nodes: NodeSurvey, lock: threading.RLock):
        self.store, self.manifest, self.router_id, self.nodes = store, manifest, router_id, nodes
        self._by_id = {f.function_id: f for f in manifest.functions}
        self._lock = lock                          # the session's: placement and its dead nodes change together
        self.placement: dict[str, tuple[str, ...]] = {}
        self.budgets: dict[str, int] = {}          # address -> memory budget bytes, from the last survey
        self.routing = RoutingBoard()              # the routing table the engine's steps read
        self.placed_once = threading.Event()       # every function has been routed at least once

    def transition_to(self, plan: dict[str, tuple[str, ...]], views: Sequence[NodeView]) -> Transition:
        live = {v.address for v in views}
        with self._lock:
            routed = {fid: [n for n in nodes if n in live] for fid, nodes in self.placement.items()}
        leased = {fid: [v.address for v in views if fid in v.leased] for fid in self._by_id}
        return transition(routed, leased, plan)

    def apply(self, plan: dict[str, tuple[str, ...]], views: Sequence[NodeView]) -> tuple[int, int]:
        """Take the mesh from what ``views`` hold to ``plan``. Returns (leases taken, leases released)."""
        t = self.transition_to(plan, views)
        if t.drop:
            self.route(t.routes_during)
            self.release_pairs(t.drop)
        by_node: dict[str, list[FunctionEntry]] = {}
        for fid, address in t.deploy:
            by_node.setdefault(address, []).append(self._by_id[fid])

        def deploy_all(address):
            client = self.nodes.client(address)
            for entry in by_node[address]:
                client.deploy(self.store / entry.file, header_of(entry, self.manifest.model_id, self.router_id))

        if by_node:
            with ThreadPoolExecutor(max_workers=len(by_node)) as pool:
                list(pool.map(deploy_all, sorted(by_node)))
        with self._lock:
            self.budgets.update({v.address: v.status.memory_budget_bytes for v in views})
        self.route(t.routes_after)
        self.release_pairs(t.release)
        if all(t.routes_after.get(fid) for fid in self._by_id):
            self.placed_once.set()
        return len(t.deploy), len(t.drop) + len(t.release)

    def route(self, routes: dict[str, tuple[str, ...]]) -> None:
        with self._lock:
            self.placement = dict(routes)
            for address in {n for nodes in routes.values() for n in nodes}:
                self.nodes.client(address)
            self.routing.publish(routes)

    def release_pairs(self, pairs: Iterable[tuple[str, str]]) -> None:
        for fid, address in pairs:
            try:
                self.nodes.client(address).undeploy(fid, owner=self.router_id)
            except MeshError as exc:
                log.warning("undeploy %s from %s: %s", fid[:12], address, exc)

    def warm(self, timeout_s: float = 600.0) -> int:
        """Load placed functions on their nodes now (prefetch), so first calls meet no cold start. Each node
        gets the hottest of its functions (manifest ``expected_load``) that fit its memory budget.
        Returns the number of function copies loaded."""
        with self._lock:
            held: dict[str, list[FunctionEntry]] = {}
            for fid, nodes in self.placement.items():
                for address in nodes:
                    held.setdefault(address, []).append(self._by_id[fid])
            budgets = dict(self.budgets)

        def one(address: str) -> int:
            chosen, used = [], 0
            for entry in sorted(held[address], key=lambda e: (-e.expected_load, e.layer, e.name)):
                need = entry.footprint_bytes
                if used + need <= budgets.get(address, 0):
                    chosen.append(entry.function_id)
                    used += need
            return len(self.nodes.client(address).load(chosen, wait=True, timeout_s=timeout_s).loaded) if chosen else 0

        if not held:
            return 0
        with ThreadPoolExecutor(max_workers=len(held)) as pool:
            return sum(pool.map(one, sorted(held)))


def header_of(entry: FunctionEntry, model_id: str, owner: str = "") -> pb.FunctionHeader:
    return pb.FunctionHeader(function_id=entry.function_id, size_bytes=entry.bytes, layer=entry.layer,
                             expert_ids=list(entry.expert_ids), model_id=model_id, dtype=entry.dtype, owner=owner,
                             footprint_bytes=entry.footprint_bytes)
