"""Pure decision: which token rows go to which node, for one MoE layer and one step.

Given the gate's choice ``top_k_index[T, k]`` and where each function lives, build one request per node:
the distinct token rows that node needs (each sent once, even when several of its experts want it) and,
per function, each expert's rows. Rows of one expert are ordered (slot, token) — the order transformers'
``torch.where(expert_mask[e])`` yields — so the combine step can add them in transformers' order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from faasmoe.proto.errors import FunctionNotFound
from faasmoe.proto.frames import Call


@dataclass(frozen=True)
class Segment:
    """Where one expert's outputs sit in a node's reply and which (token, slot) pairs they belong to."""

    expert_id: int
    call_index: int        # index of the call in the node's request
    start: int             # first output row of this expert within that call's output
    tokens: np.ndarray     # int64 [n] token indices into the step's T rows
    slots: np.ndarray      # int64 [n] top-k slot of each pair


@dataclass(frozen=True)
class NodeBatch:
    node_id: str
    token_rows: np.ndarray          # int64 [N]: the step's rows this node receives, ascending
    calls: tuple[Call, ...]
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class LayerFunctions:
    """The functions of one layer: function id -> its expert ids (in the function's order)."""

    experts_of: Mapping[str, Sequence[int]]

    @functools.cached_property
    def where(self) -> dict[int, tuple[str, int]]:
        """expert id -> (function id, index of the expert in that function)."""
        return {e: (fid, j) for fid, experts in self.experts_of.items() for j, e in enumerate(experts)}


SMALL_STEP_PAIRS = 64     # steps with at most this many (token, slot) pairs are planned in plain Python


def plan_layer(top_k_index: np.ndarray, functions: LayerFunctions, node_of: Mapping[str, str],
               layer: int = -1, pair_mask: np.ndarray | None = None) -> list[NodeBatch]:
    """Group the (token, slot) pairs of ``top_k_index`` into one batch per node.

    ``node_of`` maps each function id to the node chosen for it in this step; ``pair_mask[T, k]`` (optional)
    keeps only some pairs (a retry of the pairs a failed node did not answer).
    """
    if top_k_index.size <= SMALL_STEP_PAIRS:
        return _plan_small(top_k_index, functions, node_of, layer, pair_mask)
    n_tokens, top_k = top_k_index.shape
    experts = top_k_index.reshape(-1).astype(np.int64)
    tokens = np.repeat(np.arange(n_tokens, dtype=np.int64), top_k)
    slots = np.tile(np.arange(top_k, dtype=np.int64), n_tokens)
    if pair_mask is not None:
        keep = pair_mask.reshape(-1)
        experts, tokens, slots = experts[keep], tokens[keep], slots[keep]
    order = np.lexsort((tokens, slots, experts))          # by expert, then slot, then token
    experts, tokens, slots = experts[order], tokens[order], slots[order]
    hit, starts = np.unique(experts, return_index=True)
    bounds = list(starts) + [len(experts)]
    where = functions.where

    per_node: dict[str, dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]] = {}
    for i, expert in enumerate(hit.tolist()):
        if expert not in where:
            raise FunctionNotFound(f"layer {layer}: no function holds expert {expert}")
        fid, _ = where[expert]
        node = node_of[fid]
        per_node.setdefault(node, {}).setdefault(fid, {})[expert] = (
            tokens[bounds[i]:bounds[i + 1]], slots[bounds[i]:bounds[i + 1]])

    batches = []
    for node in sorted(per_node):
        funcs = per_node[node]
        token_rows = np.unique(np.concatenate([t for f in funcs.values() for t, _ in f.values()]))
        calls, segments = [], []
        for ci, fid in enumerate(sorted(funcs)):
            rows, counts, start = [], [], 0
            for expert in functions.experts_of[fid]:
                toks, sl = funcs[fid].get(expert, (np.empty(0, np.int64), np.empty(0, np.int64)))
                counts.append(len(toks))
                if len(toks):
                    rows.append(np.searchsorted(token_rows, toks))
                    segments.append(Segment(expert, ci, start, toks, sl))
                    start += len(toks)
            calls.append(Call(fid, np.concatenate(rows).astype(np.int32), tuple(counts)))
        batches.append(NodeBatch(node, token_rows, tuple(calls), tuple(segments)))
    return batches


def _plan_small(top_k_index: np.ndarray, functions: LayerFunctions, node_of: Mapping[str, str], layer: int,
                pair_mask: np.ndarray | None) -> list[NodeBatch]:
    """:func:`plan_layer` for a decode-sized step: the same batches, without numpy's per-call overhead."""
    where = functions.where
    keep = pair_mask.tolist() if pair_mask is not None else None
    pairs = sorted((e, s, t) for t, row in enumerate(top_k_index.tolist()) for s, e in enumerate(row)
                   if keep is None or keep[t][s])                  # by expert, then slot, then token
    per_node: dict[str, dict[str, dict[int, tuple[list[int], list[int]]]]] = {}
    for e, s, t in pairs:
        if e not in where:
            raise FunctionNotFound(f"layer {layer}: no function holds expert {e}")
        fid = where[e][0]
        toks, sl = per_node.setdefault(node_of[fid], {}).setdefault(fid, {}).setdefault(e, ([], []))
        toks.append(t)
        sl.append(s)
    batches = []
    for node in sorted(per_node):
        funcs = per_node[node]
        token_rows = sorted({t for f in funcs.values() for toks, _ in f.values() for t in toks})
        position = {t: i for i, t in enumerate(token_rows)}
        calls, segments = [], []
        for ci, fid in enumerate(sorted(funcs)):
            rows, counts, start = [], [], 0
            for expert in functions.experts_of[fid]:
                toks, sl = funcs[fid].get(expert, ((), ()))
                counts.append(len(toks))
                if toks:
                    rows += [position[t] for t in toks]
                    segments.append(Segment(expert, ci, start, np.array(toks, np.int64), np.array(sl, np.int64)))
                    start += len(toks)
            calls.append(Call(fid, np.array(rows, np.int32), tuple(counts)))
        batches.append(NodeBatch(node, np.array(token_rows, np.int64), tuple(calls), tuple(segments)))
    return batches


def choose_replicas(needed: Sequence[str], replicas: Mapping[str, Sequence[str]], turn: int,
                    compact: bool) -> dict[str, str]:
    """Pick one node per needed function.

    ``compact``: as few distinct nodes as possible (greedy set cover; a small decode step is dominated by
    round trips, so one RPC to a node holding all four experts beats four parallel ones). Otherwise rotate
    over each function's replicas by ``turn`` so large batches spread their compute. Ties rotate by ``turn``
    too, so replicas share the load across steps. Functions with no replica are left out.
    """
    live = {fid: sorted(replicas[fid]) for fid in needed if replicas.get(fid)}
    if not compact:
        return {fid: nodes[turn % len(nodes)] for fid, nodes in live.items()}
    chosen: dict[str, str] = {}
    todo = set(live)
    all_nodes = sorted({n for nodes in live.values() for n in nodes})
    while todo:
        cover = {n: sum(1 for fid in todo if n in live[fid]) for n in all_nodes}
        best = max(cover.values())
        ties = [n for n in all_nodes if cover[n] == best]
        node = ties[turn % len(ties)]
        for fid in sorted(todo):
            if node in live[fid]:
                chosen[fid] = node
        todo -= set(chosen)
    return chosen
