"""One batched forward step over many sequences, each in its slot of the KV cache (packed rows, no padding).

The step's tokens of every sequence are packed into one ``[T, H]`` tensor. Everything row-wise runs once for
all of them with transformers' own modules: embeddings, RoPE, norms, the q/k/v/o projections, the gate, the
shared expert, ``lm_head``. Attention runs through transformers' configured attention function (SDPA):
- the one-token rows (decodes) of all sequences in one call per layer, over the slots' view masked by each
  sequence's length; a lone decode row is called without a mask, exactly as transformers calls it, so a
  single stream stays bit-identical (a masked batch differs from it by rounding: ~1e-7);
- a prompt chunk per sequence, exactly as transformers calls it for one unpadded sequence: no mask for a
  first chunk (causal), an explicit causal mask with the cache offset for a later one.
The MoE block is overlapped: the routed experts' rows leave right after the gate, the shared expert runs
while they are away, then the outputs are combined — in transformers' order of additions.

A step that fails half-way leaves no trace: the cache's lengths are rolled back to where they were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_moe import modeling_qwen2_moe as qm

from faasmoe.proto.errors import CheckpointError
from faasmoe.router.mesh.dispatch import StepContext
from faasmoe.router.model.experts import ExpertsBackend
from faasmoe.router.model.kv_cache import KVCache


@dataclass
class SeqChunk:
    """One sequence's share of a step."""

    slot: int                     # its KV cache slot
    token_ids: Sequence[int]      # fed this step; their positions start at the slot's length
    want_logits: bool             # return the logits of the last of them


class ModelRunner:
    def __init__(self, model: qm.Qwen2MoeForCausalLM, experts: ExpertsBackend):
        config = model.config
        if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
            raise CheckpointError("sliding-window attention layers are not supported by the engine "
                                  "(use_sliding_window must be false)")
        if config._attn_implementation != "sdpa":
            raise CheckpointError(f"the engine runs attention with SDPA, not {config._attn_implementation!r}: "
                                  "load the model with attn_implementation='sdpa'")
        self.config, self.experts = config, experts
        self.embed = model.model.embed_tokens
        self.layers = list(model.model.layers)
        self.norm, self.rotary, self.lm_head = model.model.norm, model.model.rotary_emb, model.lm_head
        self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, qm.eager_attention_forward)
        attn = self.layers[0].self_attn
        self.head_dim, self.kv_heads = attn.head_dim, config.num_key_value_heads
        self.dtype = getattr(self.embed, "compute_dtype", self.embed.weight.dtype)   # activations and KV cache
        self.max_positions = config.max_position_embeddings
        self.kv_bytes_per_token = (len(self.layers) * 2 * self.kv_heads * self.head_dim
                                   * torch.tensor([], dtype=self.dtype).element_size())
        self.moe_layers = [i for i, layer in enumerate(self.layers) if isinstance(layer.mlp, qm.Qwen2MoeSparseMoeBlock)]

    def new_kv_cache(self, n_slots: int, slot_len: int) -> KVCache:
        return KVCache(len(self.layers), n_slots, self.kv_heads, min(slot_len, self.max_positions), self.head_dim,
                       self.dtype)

    async def forward(self, kv: KVCache, chunks: Sequence[SeqChunk], ctx: StepContext | None) -> torch.Tensor:
        """Run one step; returns float32 logits ``[n, vocab]`` for the chunks that want them, in order."""
        try:
            bounds, start = [], 0
            for chunk in chunks:
                n = len(chunk.token_ids)
                bounds.append((start, start + n, kv.manager.stage(chunk.slot, n)))
                start += n
            logits = await self._forward(kv, chunks, bounds, ctx)
        except BaseException:
            kv.manager.rollback()
            raise
        kv.manager.commit()
        return logits

    async def _forward(self, kv, segments, bounds, ctx):
        plan = _AttentionPlan(segments, bounds)
        with torch.inference_mode():
            ids = torch.tensor([t for seg in segments for t in seg.token_ids], dtype=torch.long)
            positions = torch.cat([torch.arange(past, past + (hi - lo)) for lo, hi, past in bounds])
            x = self.embed(ids)
            cos, sin = self.rotary(x[None], positions[None])
        for i, layer in enumerate(self.layers):
            with torch.inference_mode():
                residual = x
                h = layer.input_layernorm(x)
                x = residual + self._attention(kv, i, layer.self_attn, h, cos, sin, plan)
                residual = x
                h = layer.post_attention_layernorm(x)
                mlp = layer.mlp
                if not isinstance(mlp, qm.Qwen2MoeSparseMoeBlock):
                    x = residual + mlp(h)
                    continue
                _, weights, index = mlp.gate(h)
            handle = await self.experts.submit(i, h, index, weights, ctx)
            with torch.inference_mode():          # while the routed experts are away
                shared = mlp.shared_expert(h)
                shared = F.sigmoid(mlp.shared_expert_gate(h)) * shared
            routed = await self.experts.collect(handle)
            with torch.inference_mode():
                x = residual + (routed + shared)
        with torch.inference_mode():
            rows = [hi - 1 for (lo, hi, _), seg in zip(bounds, segments) if seg.want_logits]
            if not rows:
                return torch.empty((0, self.config.vocab_size), dtype=torch.float32)
            last = self.norm(x[rows])
            return self.lm_head(last).float()

    def _attention(self, kv: KVCache, i: int, attn, h, cos, sin, plan: _AttentionPlan):
        n_rows = h.shape[0]
        q = attn.q_proj(h).view(1, n_rows, -1, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(1, n_rows, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(1, n_rows, -1, self.head_dim).transpose(1, 2)
        q, k = qm.apply_rotary_pos_emb(q, k, cos, sin)
        keys, values = kv.keys[i], kv.values[i]
        out = torch.empty((n_rows, q.shape[1] * self.head_dim), dtype=q.dtype)
        if plan.decode_rows is not None:                  # one call for every one-token row
            rows, slots, at, index = plan.decode_rows, plan.decode_slots, plan.decode_at, plan.decode_index
            keys[slots, :, at] = k[0, :, rows].transpose(0, 1)
            values[slots, :, at] = v[0, :, rows].transpose(0, 1)
            lo, hi, longest = plan.slot_range
            qb = q[0, :, rows].transpose(0, 1)[:, :, None]          # [n, heads, 1, head_dim]
            if plan.mask is not None:
                padded = qb.new_zeros((hi - lo, *qb.shape[1:]))
                padded[index] = qb
                qb = padded
            o, _ = self.attention(attn, qb, keys[lo:hi, :, :longest], values[lo:hi, :, :longest], plan.mask,
                                  dropout=0.0, scaling=attn.scaling)
            out[rows] = (o[index] if plan.mask is not None else o).reshape(len(rows), -1)
        for slot, lo, hi, past in plan.chunks:            # prompt chunks: one call each, as transformers
            n = hi - lo
            keys[slot, :, past:past + n] = k[0, :, lo:hi]
            values[slot, :, past:past + n] = v[0, :, lo:hi]
            mask = None
            if past:                                      # a later prefill chunk: causal, offset by the cache
                mask = (torch.arange(past + n)[None, :] <= torch.arange(past, past + n)[:, None])[None, None]
            o, _ = self.attention(attn, q[:, :, lo:hi], keys[slot:slot + 1, :, :past + n],
                                  values[slot:slot + 1, :, :past + n], mask, dropout=0.0, scaling=attn.scaling)
            out[lo:hi] = o.reshape(n, -1)
        return attn.o_proj(out)


class _AttentionPlan:
    """Where each chunk's rows go in the cache, computed once per step (the same for every layer)."""

    def __init__(self, chunks: Sequence[SeqChunk], bounds):
        decode = [(chunk.slot, lo, past) for chunk, (lo, hi, past) in zip(chunks, bounds) if hi - lo == 1]
        self.chunks = [(chunk.slot, lo, hi, past) for chunk, (lo, hi, past) in zip(chunks, bounds) if hi - lo > 1]
        self.decode_rows = self.mask = None
        if not decode:
            return
        self.decode_slots = torch.tensor([s for s, _, _ in decode])
        self.decode_rows = torch.tensor([r for _, r, _ in decode])
        self.decode_at = torch.tensor([p for _, _, p in decode])
        lo, hi = min(s for s, _, _ in decode), max(s for s, _, _ in decode) + 1
        longest = max(p for _, _, p in decode) + 1
        self.slot_range = (lo, hi, longest)
        self.decode_index = self.decode_slots - lo          # each decode row's place in the slots' view
        if len(decode) == 1:                               # as transformers: no mask, exactly its length
            return
        lengths = torch.ones(hi - lo, dtype=torch.long)    # slots in the range without a decode row: ignored
        lengths[self.decode_index] = self.decode_at + 1
        self.mask = (torch.arange(longest)[None, :] < lengths[:, None])[:, None, None, :]
