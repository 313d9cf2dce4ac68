"""A router session for one store: which nodes are up, where the functions go, getting them there, and
the mesh + model that serve generation. Nodes are keyed by their ``host:port`` address everywhere.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from faasmoe.proto import faasmoe_pb2 as pb
from faasmoe.proto.function_abi import resident_estimate_bytes
from faasmoe.proto.errors import MeshError, NodeUnavailable, PlacementError
from faasmoe.router.control import placement as pl
from faasmoe.router.mesh.client import NodeClient
from faasmoe.router.mesh.grouping import LayerFunctions
from faasmoe.router.store.manifest import FunctionEntry, Manifest, load_manifest
from faasmoe.router.mesh.dispatch import ExpertMesh

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeView:
    """What the router knows of a node right now."""

    address: str
    status: pb.StatusReply
    capacity_bytes: int          # what this model may use there: node capacity minus other models' functions
    held: frozenset[str]         # this model's function ids deployed there


class RouterSession:
    def __init__(self, store: str | Path, *, tenant_id: str = "default", step_timeout_s: float = 30.0,
                 status_timeout_s: float = 5.0, placement_options: pl.PlacementOptions | None = None):
        self.store = Path(store)
        self.manifest: Manifest = load_manifest(self.store)
        self.tenant_id = tenant_id
        self.step_timeout_s = step_timeout_s
        self.status_timeout_s = status_timeout_s
        self.placement_options = placement_options or pl.PlacementOptions()
        self.clients: dict[str, NodeClient] = {}
        self.placement: dict[str, tuple[str, ...]] = {}
        self.budgets: dict[str, int] = {}          # address -> memory budget bytes, from the last survey
        self._by_id = {f.function_id: f for f in self.manifest.functions}
        self._lock = threading.RLock()
        self._place_lock = threading.Lock()
        self.mesh = ExpertMesh(
            {layer: LayerFunctions({f.function_id: f.expert_ids for f in self.manifest.layer_functions(layer)})
             for layer in self.manifest.moe_layers},
            {}, {}, tenant_id=tenant_id, step_timeout_s=step_timeout_s, on_node_failure=self.recover)
        self.dead: set[str] = set()
        self.unreachable: dict[str, str] = {}     # address -> why, from the last survey
        self.on_mark_down = None     # set by callers that keep a NodeDirectory

    # -- nodes -----------------------------------------------------------------------------------------
    def client(self, address: str) -> NodeClient:
        with self._lock:
            if address not in self.clients:
                self.clients[address] = NodeClient(address)
            return self.clients[address]

    def survey(self, addresses: Sequence[str]) -> list[NodeView]:
        """Status of every address, concurrently. Unreachable nodes are left out (and logged)."""
        def one(address):
            try:
                return address, self.client(address).status(self.status_timeout_s), None
            except MeshError as exc:
                return address, None, exc
        views = []
        self.unreachable = {}
        with ThreadPoolExecutor(max_workers=max(1, len(addresses))) as pool:
            for address, status, err in pool.map(one, addresses):
                if err is not None:
                    log.info("left out of placement: %s", err)
                    self.unreachable[address] = err.detail
                    continue
                held = frozenset(f.function_id for f in status.functions if f.function_id in self._by_id)
                foreign = sum(resident_estimate_bytes(f.size_bytes) for f in status.functions
                              if f.function_id not in self._by_id)
                views.append(NodeView(address, status, max(status.capacity_bytes - foreign, 0), held))
        return views

    # -- placement -------------------------------------------------------------------------------------
    def placement_functions(self) -> list[pl.FunctionSpec]:
        """The functions as placement sees them: sized by the memory they hold when loaded on a node."""
        return [pl.FunctionSpec(f.function_id, f.layer, resident_estimate_bytes(f.bytes), f.expected_load, f.name)
                for f in self.manifest.functions]

    def plan(self, views: Sequence[NodeView]) -> dict[str, tuple[str, ...]]:
        if not views:
            tried = "; ".join(f"{a}: {why.split(';')[0]}" for a, why in sorted(self.unreachable.items()))
            raise PlacementError("no reachable node" + (f" ({tried})" if tried else "")
                                 + ": start faasmoe-node on some devices or check --nodes")
        nodes = node_specs(views)
        current = {fid: [v.address for v in views if fid in v.held] for fid in self._by_id}
        return pl.place(self.placement_functions(), nodes, current, self.placement_options)

    def apply(self, plan: dict[str, tuple[str, ...]], views: Sequence[NodeView]) -> tuple[int, int]:
        """Take the mesh from what ``views`` hold to ``plan``: undeploy dropped replicas, deploy new copies
        (nodes in parallel), undeploy the old copies of moved functions; then route by ``plan``."""
        current = {fid: [v.address for v in views if fid in v.held] for fid in self._by_id}
        to_deploy, to_undeploy = pl.diff(current, plan)
        by_node: dict[str, list[FunctionEntry]] = {}
        for fid, address in to_deploy:
            by_node.setdefault(address, []).append(self._by_id[fid])

        def deploy_all(address):
            client = self.client(address)
            for entry in by_node[address]:
                client.deploy(self.store / entry.file, header_of(entry, self.manifest.model_id))

        def undeploy(pairs):
            for fid, address in pairs:
                try:
                    self.client(address).undeploy(fid)
                except MeshError as exc:
                    log.warning("undeploy %s: %s", fid[:12], exc)

        # A dropped replica (its function keeps a deployed copy) goes first: the new copies may need its room
        # (recovery onto full survivors). A moved copy goes only once its new copy exists.
        stays = {fid: set(current.get(fid, ())) & set(plan.get(fid, ())) for fid in self._by_id}
        undeploy([(fid, a) for fid, a in to_undeploy if stays.get(fid)])
        if by_node:
            with ThreadPoolExecutor(max_workers=len(by_node)) as pool:
                list(pool.map(deploy_all, sorted(by_node)))
        undeploy([(fid, a) for fid, a in to_undeploy if not stays.get(fid)])
        with self._lock:
            self.placement = dict(plan)
            self.budgets.update({v.address: v.status.memory_budget_bytes for v in views})
            self.mesh.update({a: self.client(a) for a in {n for ns in plan.values() for n in ns}}, plan)
        return len(to_deploy), len(to_undeploy)

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
                need = resident_estimate_bytes(entry.bytes)
                if used + need <= budgets.get(address, 0):
                    chosen.append(entry.function_id)
                    used += need
            return len(self.client(address).load(chosen, wait=True, timeout_s=timeout_s).loaded) if chosen else 0

        if not held:
            return 0
        with ThreadPoolExecutor(max_workers=len(held)) as pool:
            return sum(pool.map(one, sorted(held)))

    def place_and_deploy(self, addresses: Sequence[str]) -> tuple[dict, list[NodeView]]:
        """Survey ``addresses`` (minus nodes known dead), plan, deploy the difference. Serialised: the
        controller (mesh changes) and recovery (a failed call) may both ask at once."""
        with self._place_lock:
            views = self.survey([a for a in addresses if a not in self.dead])
            plan = self.plan(views)
            self.apply(plan, views)
            return plan, views

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
            survivors = sorted(set(self.clients) - self.dead)     # every node surveyed so far, minus the dead
        try:
            self.place_and_deploy(survivors)
        except PlacementError as exc:
            raise NodeUnavailable(f"died and the surviving nodes cannot hold its functions: {exc}",
                                  node=address) from None
        except MeshError as exc:
            raise NodeUnavailable(f"died and redeploying its functions failed: {exc}", node=address) from None

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def header_of(entry: FunctionEntry, model_id: str) -> pb.FunctionHeader:
    return pb.FunctionHeader(function_id=entry.function_id, size_bytes=entry.bytes, layer=entry.layer,
                             expert_ids=list(entry.expert_ids), model_id=model_id, dtype=entry.dtype)


def node_specs(views: Sequence[NodeView]) -> list[pl.NodeSpec]:
    """The nodes as placement sees them."""
    return [pl.NodeSpec(v.address, v.capacity_bytes, max(1, v.status.threads)) for v in views]
