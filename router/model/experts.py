"""Where a layer's routed experts run, behind one submit/collect interface used by the runner's MoE block:

- :class:`MeshExperts`: on the mesh (the router's normal case). ``submit`` sends the rows right after the gate;
  ``collect`` gathers the outputs and combines them.
- :class:`LocalExperts`: transformers' own experts modules (``Qwen2MoeExperts``, ...) of a full model, in this process (a
  full-model server on the same engine: the baselines of the benchmarks).

The mesh combine is transformers' experts ``forward`` (the same in every family) in numpy: experts in ascending order, each
expert's rows in (slot, token) order, output × routing weight, added into zeros (a token meets an expert at
most once, so this is its ``index_add_``).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from faasmoe.router.mesh.dispatch import ExpertMesh, StepContext


class ExpertsBackend(Protocol):
    async def submit(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor, ctx: StepContext | None) -> Any:
        """Start the layer's routed experts on ``hidden`` [T, H]."""

    async def collect(self, handle: Any) -> torch.Tensor:
        """Their weighted sum [T, H], in ``hidden``'s dtype."""


def combine(results: dict, weights: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Weighted sum of expert outputs in transformers' order (see the module docstring)."""
    final = np.zeros(shape, dtype=np.float32)
    for expert in sorted(results):
        items = results[expert]
        if len(items) == 1:
            tokens, slots, out = items[0].tokens, items[0].slots, items[0].output
        else:
            tokens = np.concatenate([r.tokens for r in items])
            slots = np.concatenate([r.slots for r in items])
            out = np.concatenate([r.output for r in items])
            order = np.lexsort((tokens, slots))      # (slot, token): transformers' order
            tokens, slots, out = tokens[order], slots[order], out[order]
        final[tokens] += out * weights[tokens, slots, None]
    return final


class MeshExperts:
    def __init__(self, mesh: ExpertMesh):
        self.mesh = mesh

    async def submit(self, layer, hidden, top_k_index, top_k_weights, ctx):
        with torch.inference_mode():
            x = (hidden if hidden.dtype == torch.float32 else hidden.float()).contiguous().numpy()
            w = top_k_weights if top_k_weights.dtype == torch.float32 else top_k_weights.float()
        pending = await self.mesh.submit(layer, x, top_k_index.numpy(), ctx)
        return pending, w.numpy(), hidden.dtype

    async def collect(self, handle):
        pending, weights, dtype = handle
        results = await self.mesh.collect(pending)
        final = combine(results, weights, pending.hidden.shape)
        with torch.inference_mode():
            return torch.from_numpy(final).to(dtype)


class LocalExperts:
    """The routed experts of a full transformers model, run in-process by transformers' own module."""

    def __init__(self, model):
        self.layers = model.model.layers

    async def submit(self, layer, hidden, top_k_index, top_k_weights, ctx):
        return layer, hidden, top_k_index, top_k_weights

    async def collect(self, handle):
        layer, hidden, top_k_index, top_k_weights = handle
        with torch.inference_mode():
            return self.layers[layer].mlp.experts(hidden, top_k_index, top_k_weights)
