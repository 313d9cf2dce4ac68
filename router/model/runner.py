"""One batched forward step over many sequences, each with its own KV cache (packed rows, no padding).

The step's tokens of every sequence are packed into one ``[T, H]`` tensor. Everything row-wise runs once for
all of them with transformers' own modules: embeddings, RoPE, norms, the q/k/v/o projections, the gate, the
shared expert, ``lm_head``. Only the attention kernel runs per sequence, on that sequence's cache, through
transformers' configured attention function (SDPA) exactly as transformers calls it for one unpadded
sequence: no mask for a first prefill chunk (causal) or a decode token, an explicit causal mask with the
cache offset for a later prefill chunk. The MoE block is overlapped: the routed experts' rows leave right
after the gate, the shared expert runs while they are away, then the outputs are combined — in
transformers' order of additions.

A step that fails half-way leaves no trace: every cache is rolled back to where it was.
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
from faasmoe.router.model.cache import SequenceCache
from faasmoe.router.model.experts import ExpertsBackend


@dataclass
class Segment:
    """One sequence's share of a step."""

    cache: SequenceCache
    token_ids: Sequence[int]      # fed this step; their positions start at cache.length
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

    def new_cache(self, max_len: int) -> SequenceCache:
        with torch.inference_mode():
            return SequenceCache(len(self.layers), self.kv_heads, self.head_dim, self.dtype, max_len)

    async def forward(self, segments: Sequence[Segment], ctx: StepContext | None) -> torch.Tensor:
        """Run one step; returns float32 logits ``[n, vocab]`` for the segments that want them, in order."""
        try:
            logits = await self._forward(segments, ctx)
        except BaseException:
            for seg in segments:
                seg.cache.rollback()
            raise
        for seg in segments:
            seg.cache.commit()
        return logits

    async def _forward(self, segments, ctx):
        bounds, start = [], 0
        for seg in segments:
            bounds.append((start, start + len(seg.token_ids), seg.cache.length))
            start += len(seg.token_ids)
        with torch.inference_mode():
            ids = torch.tensor([t for seg in segments for t in seg.token_ids], dtype=torch.long)
            positions = torch.cat([torch.arange(past, past + (hi - lo)) for lo, hi, past in bounds])
            x = self.embed(ids)
            cos, sin = self.rotary(x[None], positions[None])
        for i, layer in enumerate(self.layers):
            with torch.inference_mode():
                residual = x
                h = layer.input_layernorm(x)
                x = residual + self._attention(i, layer.self_attn, h, cos, sin, segments, bounds)
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

    def _attention(self, i, attn, h, cos, sin, segments, bounds):
        n_rows = h.shape[0]
        q = attn.q_proj(h).view(1, n_rows, -1, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(1, n_rows, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(1, n_rows, -1, self.head_dim).transpose(1, 2)
        q, k = qm.apply_rotary_pos_emb(q, k, cos, sin)
        outs = []
        for seg, (lo, hi, past) in zip(segments, bounds):
            keys, values = seg.cache.append(i, k[:, :, lo:hi], v[:, :, lo:hi])
            n = hi - lo
            mask = None
            if past and n > 1:                     # a later prefill chunk: causal, offset by the cache
                mask = (torch.arange(past + n)[None, :] <= torch.arange(past, past + n)[:, None])[None, None]
            out, _ = self.attention(attn, q[:, :, lo:hi], keys, values, mask, dropout=0.0, scaling=attn.scaling)
            outs.append(out.reshape(n, -1))
        return attn.o_proj(outs[0] if len(outs) == 1 else torch.cat(outs))
