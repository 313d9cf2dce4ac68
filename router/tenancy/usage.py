"""One usage record: what a tenant (in the ledger) or a single request (on its sequence) used. Requests and
tokens, expert rows and calls (per layer too), expert compute seconds measured on the nodes, node
memory-seconds and the cold starts waited on; records add up."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    expert_rows: int = 0
    expert_calls: int = 0
    expert_compute_s: float = 0.0
    memory_byte_s: float = 0.0
    cold_starts: int = 0
    rows_by_layer: dict[int, int] = field(default_factory=dict)
    calls_by_layer: dict[int, int] = field(default_factory=dict)

    def add(self, other: Usage) -> None:
        for name in ("requests", "prompt_tokens", "completion_tokens", "expert_rows", "expert_calls",
                     "expert_compute_s", "memory_byte_s", "cold_starts"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.rows_by_layer, other.rows_by_layer), (self.calls_by_layer, other.calls_by_layer)):
            for layer, n in theirs.items():
                mine[layer] = mine.get(layer, 0) + n

    def as_dict(self) -> dict:
        out = asdict(self)
        out["memory_gb_s"] = round(out.pop("memory_byte_s") / 1e9, 6)
        out["expert_compute_s"] = round(out["expert_compute_s"], 6)
        out["rows_by_layer"] = {str(k): v for k, v in sorted(self.rows_by_layer.items())}
        out["calls_by_layer"] = {str(k): v for k, v in sorted(self.calls_by_layer.items())}
        return out

    def expert_record(self) -> dict:
        """The expert side of a request, as its usage-log line gives it."""
        return {"expert_rows": self.expert_rows, "expert_calls": self.expert_calls,
                "expert_compute_s": round(self.expert_compute_s, 6), "cold_starts": self.cold_starts}
