"""The survey role of a router session: one control client per node, and what each node holds for this model
right now (:class:`NodeView`). Unreachable nodes are left out of a survey, with the reason kept."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from faasmoe.proto import faasmoe_pb2 as pb
from faasmoe.proto.credentials import TlsMaterial
from faasmoe.proto.errors import MeshError
from faasmoe.proto.function_abi import resident_estimate_bytes
from faasmoe.router.control import placement as pl
from faasmoe.router.control.client import NodeClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeView:
    """What the router knows of a node right now."""

    address: str
    status: pb.StatusReply
    capacity_bytes: int          # what this model may use there: node capacity minus other models' functions
    held: frozenset[str]         # this model's function ids deployed there (by any router)
    leased: frozenset[str]       # ... of which this router holds a lease


class NodeSurvey:
    def __init__(self, function_ids: frozenset[str], router_id: str, tls: TlsMaterial | None,
                 status_timeout_s: float):
        self.function_ids, self.router_id, self.tls = function_ids, router_id, tls
        self.status_timeout_s = status_timeout_s
        self.clients: dict[str, NodeClient] = {}
        self.unreachable: dict[str, str] = {}        # address -> why, from the last survey
        self.max_message_bytes: dict[str, int] = {}  # each node's advertised message limit (its Status)
        self._lock = threading.Lock()

    def client(self, address: str) -> NodeClient:
        with self._lock:
            if address not in self.clients:
                self.clients[address] = NodeClient(address, tls=self.tls)
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
                if status.max_message_bytes:
                    self.max_message_bytes[address] = status.max_message_bytes
                mine = [f for f in status.functions if f.function_id in self.function_ids]
                foreign = sum(f.footprint_bytes or resident_estimate_bytes(f.size_bytes) for f in status.functions
                              if f.function_id not in self.function_ids)
                views.append(NodeView(address, status, max(status.capacity_bytes - foreign, 0),
                                      frozenset(f.function_id for f in mine),
                                      frozenset(f.function_id for f in mine if self.router_id in f.owners)))
        return views

    def answers(self, address: str, timeout_s: float = 1.0) -> bool:
        """Does the node answer a Status call now (a broken connection is not a dead node)?"""
        try:
            self.client(address).status(timeout_s)
            return True
        except MeshError:
            return False

    def close(self) -> None:
        for client in list(self.clients.values()):
            client.close()


def node_specs(views: Sequence[NodeView]) -> list[pl.NodeSpec]:
    """The nodes as placement sees them."""
    return [pl.NodeSpec(v.address, v.capacity_bytes, max(1, v.status.threads)) for v in views]
