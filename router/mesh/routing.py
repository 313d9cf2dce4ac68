"""Where each function can be called: an immutable routing table, swapped whole when placement changes.

Control (placement, recovery; any thread) publishes a new :class:`RoutingTable`; a step takes one snapshot
and uses it throughout, so every layer of a step sees one consistent placement (a failed call makes the step
take a fresh one). Tables are plain data: reading one needs no lock.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping, Sequence

_versions = itertools.count(1)


@dataclass(frozen=True)
class RoutingTable:
    replicas: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    version: int = 0

    @staticmethod
    def of(placement: Mapping[str, Sequence[str]]) -> RoutingTable:
        return RoutingTable(MappingProxyType({fid: tuple(nodes) for fid, nodes in placement.items()}),
                            next(_versions))

    def nodes_of(self, function_id: str, exclude: Iterable[tuple[str, str]] = ()) -> list[str]:
        """The nodes serving ``function_id``, minus excluded (function, node) pairs."""
        out = list(self.replicas.get(function_id, ()))
        if exclude:
            out = [n for n in out if (function_id, n) not in exclude]
        return out

    @property
    def nodes(self) -> frozenset[str]:
        return frozenset(n for nodes in self.replicas.values() for n in nodes)


class RoutingBoard:
    """Holds the current routing table: control publishes a new one (thread-safe), steps read it (lock-free)."""

    def __init__(self):
        self._table = RoutingTable()
        self._lock = threading.Lock()

    @property
    def table(self) -> RoutingTable:
        return self._table

    def publish(self, placement: Mapping[str, Sequence[str]]) -> RoutingTable:
        with self._lock:
            self._table = RoutingTable.of(placement)
            return self._table
