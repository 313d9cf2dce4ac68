"""Pure decision: whose rows a node computed, and what of the node's time and cold starts that costs them.

A frame carries the rows of many requests (one step, every caller). The node reports, per function call, its
ONNX Runtime seconds and whether it had to load the function first. :func:`attribute` splits each call's
seconds between the requests whose rows were in it, pro rata by rows, and gives every one of them the call's
cold start (they all waited on it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class Share:
    rows: int = 0
    compute_s: float = 0.0
    calls: set[int] = field(default_factory=set)       # indices of the frame's calls that computed its rows

    def cold_starts(self, results) -> int:
        return sum(bool(results[c].cold_start) for c in self.calls)


def attribute(segments, results: Sequence, row_owner: np.ndarray, offset: int,
              function_of_call: Sequence[str]) -> tuple[dict[int, Share], dict[tuple[str, int], int]]:
    """``segments``: the frame's (call index, step rows) pieces; ``results``: the node's per-call results
    (``compute_s``, ``cold_start``); ``row_owner[row]``: the owner (an index) of each step row; ``offset``:
    where the frame's rows start among the step's. Returns the shares per owner and rows per (function, owner).
    Several owners that share a call (one tenant's requests, say) share its one cold start: count a group's
    distinct calls by the union of its owners' ``calls``."""
    if not segments:
        return {}, {}
    calls = np.concatenate([np.full(len(tokens), ci, dtype=np.int64) for ci, tokens in segments])
    owners = row_owner[np.concatenate([np.asarray(tokens, dtype=np.int64) for _, tokens in segments]) + offset]
    width = int(owners.max()) + 1
    pairs, counts = np.unique(calls * width + owners, return_counts=True)
    call_rows = np.bincount(calls, minlength=len(results))
    shares: dict[int, Share] = {}
    by_function: dict[tuple[str, int], int] = {}
    for key, n in zip(pairs.tolist(), counts.tolist()):
        call_index, owner = divmod(key, width)
        share = shares.setdefault(owner, Share())
        share.rows += n
        share.compute_s += results[call_index].compute_s * n / int(call_rows[call_index])
        share.calls.add(call_index)
        fn_key = (function_of_call[call_index], owner)
        by_function[fn_key] = by_function.get(fn_key, 0) + n
    return shares, by_function
