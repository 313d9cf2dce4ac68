"""Pure decision: how to take the mesh from where functions are to a new placement, make-before-break.

    transition(routed, leased, plan) -> Transition

``routed``: where steps send each function now; ``leased``: where this router holds a deployment lease (on
live nodes); ``plan``: where the functions should be. The steps of a transition, in order:

1. stop routing to the copies in ``drop``, then release them: replicas whose function keeps another copy that
   stays (the new copies may need their room, e.g. recovery onto full survivors); meanwhile the staying copies
   are routed to, whether or not they were before;
2. take the leases in ``deploy`` (a node that already holds the content from another router only adds a lease);
3. route by the plan: the new copies serve before any old one goes;
4. release the leases in ``release``: old copies of functions that moved.

A call already sent to a released copy gets NOT_FOUND and is routed again on the new table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

Pair = tuple[str, str]          # (function id, node)


@dataclass(frozen=True)
class Transition:
    drop: tuple[Pair, ...]
    deploy: tuple[Pair, ...]
    release: tuple[Pair, ...]
    routes_during: dict[str, tuple[str, ...]]    # routing from step 1 until step 3
    routes_after: dict[str, tuple[str, ...]]     # the plan

    @property
    def changes(self) -> bool:
        return bool(self.drop or self.deploy or self.release)


def transition(routed: Mapping[str, Sequence[str]], leased: Mapping[str, Sequence[str]],
               plan: Mapping[str, Sequence[str]]) -> Transition:
    deploy, drop, release, staying = [], [], [], {}
    for fid in sorted(set(plan) | set(leased)):
        want, have = set(plan.get(fid, ())), set(leased.get(fid, ()))
        deploy += [(fid, n) for n in sorted(want - have)]
        gone = [(fid, n) for n in sorted(have - want)]
        (drop if want & have else release).extend(gone)
        staying[fid] = want & have
    dropped = set(drop)
    during = {}
    for fid in sorted(set(routed) | {f for f, nodes in staying.items() if nodes}):
        kept = [n for n in routed.get(fid, ()) if (fid, n) not in dropped]
        during[fid] = tuple(kept + sorted(set(staying.get(fid, ())) - set(kept)))
    return Transition(tuple(drop), tuple(deploy), tuple(release),
                      {fid: nodes for fid, nodes in during.items() if nodes},
                      {fid: tuple(sorted(nodes)) for fid, nodes in plan.items()})
