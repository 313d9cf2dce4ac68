"""Pure decision: whose rows a node computed, and what of the node's time and cold starts that costs them.

A frame carries the rows of many requests (one step, every caller). The node reports, per function call, its
ONNX Runtime seconds and whether it had to load the function first. :func:`attribute` splits each call's
seconds between the requests whose rows were in it, pro rata by rows, and gives every one of them the call's
cold start (they all waited on it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class Share:
    rows: int = 0
    compute_s: float = 0.0
    calls: int = 0                 # function calls that computed some of the owner's rows
    cold_starts: int = 0           # of those, calls that waited on a load


def attribute(segments, results: Sequence, row_owner: np.ndarray, offset: int,
              function_of_call: Sequence[str]) -> tuple[dict[int, Share], dict[tuple[str, int], int]]:
    """``segments``: the frame's (call index, step rows) pieces; ``results``: the node's per-call results
    (``compute_s``, ``cold_start``); ``row_owner[row]``: the owner (an index) of each step row; ``offset``:
    where the frame's rows start among the step's. Returns the shares per owner and rows per (function, owner)."""
    rows_of_call: dict[int, dict[int, int]] = {}
    for call_index, tokens in segments:
        owners = row_owner[np.asarray(tokens) + offset]
        counts = rows_of_call.setdefault(call_index, {})
        for owner, n in zip(*np.unique(owners, return_counts=True)):
            counts[int(owner)] = counts.get(int(owner), 0) + int(n)
    shares: dict[int, Share] = {}
    by_function: dict[tuple[str, int], int] = {}
    for call_index, counts in rows_of_call.items():
        result = results[call_index]
        total = sum(counts.values())
        for owner, n in counts.items():
            share = shares.setdefault(owner, Share())
            share.rows += n
            share.compute_s += result.compute_s * n / total
            share.calls += 1
            share.cold_starts += bool(result.cold_start)
            key = (function_of_call[call_index], owner)
            by_function[key] = by_function.get(key, 0) + n
    return shares, by_function
