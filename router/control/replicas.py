"""The replica policy: how many copies of each expert function the mesh keeps (``--replicas 1|2|auto``).

- ``1``: one copy of each function. Least memory; a lost node's functions are re-placed on the survivors
  (make-before-break), so requests stay exact, at the cost of the re-deploy and cold starts.
- ``2``: a second copy of the hottest functions while memory is left (by expected load, placement's rule 4).
  On a shared edge device free memory is not free: in a memory x time evaluation those copies are pure cost.
- ``auto``: one copy, plus a second copy of a function only while its calls are measured queueing at their
  node (the nodes' per-function slot waits, not its rank in heat), and only within ``replica_share`` of each
  node's capacity.

Contention is the mean number of a function's calls waiting for a run slot over a survey interval: the growth of
its ``wait_s`` on each node holding it (``StatusReply.functions[].wait_s``: finished waits plus the calls still
waiting), summed over its copies and divided by the interval. Growth counts only for (node, function) pairs seen in
both surveys, so a node missing from one survey (busy, slow to answer) adds nothing when it comes back.
:func:`decide` is a pure function over those counters; the placement controller surveys the nodes every
``interval_s``, feeds it, and re-places when the set of contended functions changes. A second copy relieves the
queueing it was made for, so scores decay slowly (0.8 per interval: a burst keeps its copy for about a minute at
the default interval) and a function loses its copy only below half the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from faasmoe.proto.errors import ConfigError
from faasmoe.router.control.placement import PlacementOptions

MODES = ("1", "2", "auto")
DEFAULT_MODE = "1"             # measured (BENCHMARKS §7.6): 1 held the least memory with the best latency, and
                               # recovered from a lost node exactly; on one host a second copy adds no cores


@dataclass(frozen=True)
class ReplicaPolicy:
    mode: str = DEFAULT_MODE
    threshold: float = 0.05        # auto: mean calls waiting (call-seconds per second) that warrant a second copy
    replica_share: float = 0.25    # auto: share of each node's capacity second copies may take at most
    interval_s: float = 10.0       # auto: seconds between contention surveys

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"--replicas {self.mode!r}: choose one of {', '.join(MODES)}")
        if not self.threshold > 0 or not 0 <= self.replica_share <= 1 or not self.interval_s > 0:
            raise ConfigError("the replica policy needs a threshold > 0, a share in [0, 1] and an interval > 0")

    def options(self, contended: frozenset[str] = frozenset()) -> PlacementOptions:
        """Placement options of this policy, given the functions measured contended (``auto`` only)."""
        if self.mode == "1":
            return PlacementOptions(max_replicas=1, replicate=False)
        if self.mode == "2":
            return PlacementOptions(max_replicas=2)
        return PlacementOptions(max_replicas=2, replicate_only=contended, replica_share=self.replica_share)


@dataclass(frozen=True)
class Contention:
    """What the policy remembers between surveys."""
    wait_s: Mapping[tuple[str, str], float] = field(default_factory=dict)   # (node, function) -> cumulative waits
    score: Mapping[str, float] = field(default_factory=dict)                # smoothed calls waiting per function
    contended: frozenset[str] = frozenset()                                 # functions that hold a second copy


def decide(previous: Contention, wait_s: Mapping[tuple[str, str], float], interval_s: float, policy: ReplicaPolicy,
           decay: float = 0.8) -> Contention:
    """The next state from the cumulative slot waits of every (node, function) pair surveyed after ``interval_s``.

    A function's score is ``max(growth / interval, decay x previous score)``, its growth summed over the pairs
    seen in both surveys (a counter that went down, a restarted node, counts as none). It becomes contended at
    ``threshold`` and stays so down to half of it (hysteresis, so a function near the threshold does not flap)."""
    if interval_s <= 0:
        raise ConfigError("the survey interval must be > 0")
    growth: dict[str, float] = {}
    for (node, fid), now in wait_s.items():
        before = previous.wait_s.get((node, fid))
        growth[fid] = growth.get(fid, 0.0) + (max(0.0, now - before) if before is not None else 0.0)
    score = {fid: max(g / interval_s, decay * previous.score.get(fid, 0.0)) for fid, g in growth.items()}
    contended = frozenset(fid for fid, sc in score.items()
                          if sc >= policy.threshold or (fid in previous.contended and sc >= policy.threshold / 2))
    return Contention(dict(wait_s), score, contended)


def waits_of(views, function_ids) -> dict[tuple[str, str], float]:
    """Cumulative slot-wait seconds of every (node, function) pair of ``function_ids`` the surveyed nodes hold."""
    wanted = set(function_ids)
    return {(v.address, f.function_id): f.wait_s for v in views for f in v.status.functions
            if f.function_id in wanted}
