"""Attention for a packed step of many sequences, through each family's own transformers attention module.

The runner calls a layer's attention module (``self_attn``) on the step's packed rows ``[1, T, H]``, so the
module does everything a family does its own way: projections, q/k norms, rotary embeddings, MLA's latent
compression. Two hooks of transformers put the rows in the engine's slotted cache and attend over it:

- the module's cache is a :class:`StepAttention`: its ``update`` writes each row's keys and values (or MLA's
  latent and rotated key) into its sequence's slot of the :class:`~faasmoe.router.model.kv_cache.KVCache`;
- the attention function is :func:`slotted_attention`, registered with transformers' ``AttentionInterface``
  as :data:`SLOTTED`. With a step (the ``faasmoe_step`` keyword the runner passes through the module) it runs
  the step's attention calls over the slots with transformers' SDPA function; without one it *is* transformers'
  SDPA function (and SDPA's mask builder is registered for it), so the model still generates as before in
  transformers' own ``generate``.

The calls (:class:`AttentionPlan`, computed once per step):
- the one-token rows (decodes) of all sequences in one call, over the slots' view masked by each sequence's
  length; a lone decode row is called without a mask over exactly its sequence's keys, as transformers calls
  it, so a single stream's attention is transformers' own call (a masked batch differs from it by rounding:
  ~1e-7);
- a prompt chunk per sequence, as transformers calls it for one unpadded sequence: no mask for a first chunk
  (causal), an explicit causal mask with the cache offset for a later one.
A sliding window (Mixtral, Qwen's sliding layers) restricts each query to its last ``window`` keys: a lone
decode attends over exactly those (what transformers' sliding cache holds, with the all-true mask transformers
passes once that cache is full), the other calls mask the rest.
MLA's cache holds the latent; each call expands the keys and values it reads with the module's own
``expand_kv``, as transformers does after its cache update.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from faasmoe.router.model.kv_cache import KVCache

SLOTTED = "faasmoe_slotted"


def slotted_attention(module, query, key, value, attention_mask, *, faasmoe_step: StepAttention | None = None,
                      **kwargs):
    if faasmoe_step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    window = None
    if faasmoe_step.windowed:     # Mixtral and Qwen3-MoE pass their window; Qwen2-MoE's sliding layers set it
        window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    return faasmoe_step.attend(module, query, kwargs.get("scaling"), window if window and window > 0 else None), None


AttentionInterface.register(SLOTTED, slotted_attention)
AttentionMaskInterface.register(SLOTTED, sdpa_mask)     # transformers' own forward builds SDPA's masks for it


class AttentionPlan:
    """Where each chunk's rows go in the cache (the same for every layer of a step).

    ``chunks``: ``(slot, n_tokens, start)`` per sequence in row order, ``start`` = tokens already cached."""

    def __init__(self, chunks: Sequence[tuple[int, int, int]]):
        decode, self.prompts, row = [], [], 0
        self.spans = list(chunks)
        for slot, n, past in self.spans:
            (decode.append((slot, row, past)) if n == 1 else self.prompts.append((slot, row, row + n, past)))
            row += n
        self.n_rows = row
        self.decode_rows = None
        self._masks: dict[int | None, torch.Tensor] = {}
        if not decode:
            return
        self.decode_slots = torch.tensor([s for s, _, _ in decode])
        self.decode_rows = torch.tensor([r for _, r, _ in decode])
        self.decode_at = torch.tensor([p for _, _, p in decode])
        lo, hi = min(s for s, _, _ in decode), max(s for s, _, _ in decode) + 1
        self.longest = max(p for _, _, p in decode) + 1
        self.slot_range = (lo, hi)
        self.decode_index = self.decode_slots - lo          # each decode row's place in the slots' view
        self.lone = len(decode) == 1
        lengths = torch.ones(hi - lo, dtype=torch.long)    # slots in the range without a decode row: ignored
        lengths[self.decode_index] = self.decode_at + 1
        self.lengths = lengths

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """``[slots, 1, 1, longest]``: each decode row's keys (its length, its window); built once per step."""
        mask = self._masks.get(window)
        if mask is None:
            keys = torch.arange(self.longest)[None, :]
            mask = keys < self.lengths[:, None]
            if window is not None:
                mask &= keys >= self.lengths[:, None] - window
            mask = self._masks[window] = mask[:, None, None, :]
        return mask


def prompt_mask(past: int, n: int, window: int | None) -> torch.Tensor | None:
    """A prompt chunk's mask over its sequence's ``past + n`` keys; None where transformers passes none (a first
    chunk shorter than the window: SDPA's causal flag)."""
    if not past and (window is None or n < window):
        return None
    keys, queries = torch.arange(past + n)[None, :], torch.arange(past, past + n)[:, None]
    mask = keys <= queries
    if window is not None:
        mask &= keys > queries - window
    return mask[None, None]


class StepAttention:
    """One step's attention over the slotted cache: the attention modules' cache and their attention function."""

    def __init__(self, kv: KVCache, plan: AttentionPlan, latent: bool, windowed: bool):
        self.kv, self.plan, self.latent, self.windowed = kv, plan, latent, windowed

    # -- the module's cache --------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the step's rows ``[1, heads, T, width]`` into their slots. What it returns goes to the module's
        own use (MLA expands it) and then to :func:`slotted_attention`, which reads the slots instead: no rows."""
        keys, values, p = self.kv.keys[layer_idx], self.kv.values[layer_idx], self.plan
        if p.decode_rows is not None:
            keys[p.decode_slots, :, p.decode_at] = key_states[0, :, p.decode_rows].transpose(0, 1)
            values[p.decode_slots, :, p.decode_at] = value_states[0, :, p.decode_rows].transpose(0, 1)
        for slot, lo, hi, past in p.prompts:
            keys[slot, :, past:past + hi - lo] = key_states[0, :, lo:hi]
            values[slot, :, past:past + hi - lo] = value_states[0, :, lo:hi]
        if self.latent:                   # the module expands them (a reshape that needs rows), then ignores them
            return key_states, value_states
        return key_states[:, :, :0], value_states[:, :, :0]

    # -- the attention function ----------------------------------------------------------------------------------
    def _read(self, module, slots: slice, lo: int, hi: int):
        keys, values = self.kv.keys[module.layer_idx][slots, :, lo:hi], self.kv.values[module.layer_idx][slots, :, lo:hi]
        return module.expand_kv(keys, values) if self.latent else (keys, values)

    def attend(self, module, query: torch.Tensor, scaling: float | None, window: int | None) -> torch.Tensor:
        """The step's attention output ``[1, T, heads, width]`` for ``query`` ``[1, heads, T, width]``."""
        p, out = self.plan, None
        if p.decode_rows is not None:                     # one call for every one-token row
            qb = query[0, :, p.decode_rows].transpose(0, 1)[:, :, None]          # [n, heads, 1, width]
            (lo, hi), mask = p.slot_range, None
            if p.lone:                                    # as transformers: exactly its keys, no mask
                length = int(p.decode_at[0]) + 1
                first = 0 if window is None else max(0, length - window)
                k, v = self._read(module, slice(lo, hi), first, length)
                if window is not None and length >= window:   # its sliding cache is full: it passes a mask
                    mask = torch.ones((1, 1, 1, length - first), dtype=torch.bool)
            else:
                k, v = self._read(module, slice(lo, hi), 0, p.longest)
                mask = p.decode_mask(window)
                padded = qb.new_zeros((hi - lo, *qb.shape[1:]))
                padded[p.decode_index] = qb
                qb = padded
            o, _ = sdpa_attention_forward(module, qb, k, v, mask, dropout=0.0, scaling=scaling)
            o = o if p.lone else o[p.decode_index]                                 # [n, 1, heads, width]
            out = o.new_empty((p.n_rows, *o.shape[2:]))
            out[p.decode_rows] = o[:, 0]
        for slot, lo, hi, past in p.prompts:             # prompt chunks: one call each, as transformers
            k, v = self._read(module, slice(slot, slot + 1), 0, past + hi - lo)
            o, _ = sdpa_attention_forward(module, query[:, :, lo:hi], k, v, prompt_mask(past, hi - lo, window),
                                          dropout=0.0, scaling=scaling)
            if out is None:
                out = o.new_empty((p.n_rows, *o.shape[2:]))
            out[lo:hi] = o[0]
        return out[None]
