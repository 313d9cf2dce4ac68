"""Counters of the mesh's layer steps (updated on the engine's loop only; read by metrics on the same loop)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MeshStats:
    """Where the layer steps' time goes, summed since start."""

    layer_calls: int = 0
    rpcs: int = 0                # frames sent (one per node and layer step, more when split or retried)
    function_calls: int = 0
    rows_sent: int = 0
    wall_s: float = 0.0          # submit to collected, per layer step
    encode_s: float = 0.0        # planning + framing on the router
    wait_s: float = 0.0          # waiting for replies in collect (after the caller's own overlap work)
    node_compute_s: float = 0.0  # slowest node's own time (frame in to reply out) per layer step, summed
    decode_s: float = 0.0        # reading replies
    cold_starts: int = 0
    retries: int = 0
    dropped_pairs: int = 0      # degraded mode: (token, expert) pairs dropped for want of a replica
    answered_pairs: int = 0     # (token, expert) pairs the nodes answered
    by_node: dict = field(default_factory=dict)   # node -> frames sent

    def count_frame(self, node: str, rows: int, calls: int) -> None:
        self.rpcs += 1
        self.rows_sent += rows
        self.function_calls += calls
        self.by_node[node] = self.by_node.get(node, 0) + 1

    def dispatch_s(self) -> float:
        """Time the mesh added beyond expert compute: serialization, RPC, waiting."""
        return max(self.wall_s - self.node_compute_s, 0.0)
