"""One batched forward step over many sequences, each in its slot of the KV cache (packed rows, no padding).

The step's tokens of every sequence are packed into one ``[T, H]`` tensor, and every module is transformers'
own module of the model's family (:mod:`faasmoe.router.families`), run once for all of them: embeddings,
rotary embeddings, norms, each layer's attention module (projections, q/k norms, MLA), the MoE block's router
(``mlp.gate``) and shared experts, a dense layer's MLP, ``lm_head``. Attention reads and writes the engine's
slotted cache through :mod:`~faasmoe.router.model.attention`. The MoE block is overlapped: the routed experts'
rows leave right after the router, the shared experts run while they are away, then the outputs are combined,
in transformers' order of additions (routed + shared).

A step that fails half-way leaves no trace: the cache's lengths are rolled back to where they were.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch

from faasmoe.proto.errors import CheckpointError
from faasmoe.router.families import family_of
from faasmoe.router.mesh.dispatch import StepContext
from faasmoe.router.model.attention import SLOTTED, AttentionPlan, StepAttention
from faasmoe.router.model.experts import ExpertsBackend
from faasmoe.router.model.kv_cache import KVCache


@dataclass
class SeqChunk:
    """One sequence's share of a step."""

    slot: int                     # its KV cache slot
    token_ids: Sequence[int]      # fed this step; their positions start at the slot's length
    want_logits: bool             # return the logits of the last of them


class ModelRunner:
    def __init__(self, model, experts: ExpertsBackend):
        config = model.config
        self.family = family_of(config.model_type)
        if config._attn_implementation not in ("sdpa", SLOTTED):
            raise CheckpointError(f"the engine runs attention with SDPA, not {config._attn_implementation!r}: "
                                  "load the model with attn_implementation='sdpa'")
        config._attn_implementation = SLOTTED      # SDPA itself when called without the engine's step
        self.config, self.experts = config, experts
        self.embed = model.model.embed_tokens
        self.layers = list(model.model.layers)
        self.norm, self.rotary, self.lm_head = model.model.norm, model.model.rotary_emb, model.lm_head
        attn = self.layers[0].self_attn
        self._cache_kw = "cache" if "cache" in inspect.signature(attn.forward).parameters else "past_key_values"
        self.kv_heads, self.key_width, self.value_width = self.family.cache_layout(config)
        self.dtype = getattr(self.embed, "compute_dtype", self.embed.weight.dtype)   # activations and KV cache
        self.max_positions = config.max_position_embeddings
        self.kv_bytes_per_token = (len(self.layers) * self.kv_heads * (self.key_width + self.value_width)
                                   * torch.tensor([], dtype=self.dtype).element_size())
        self.moe_layers = [i for i, layer in enumerate(self.layers) if hasattr(layer.mlp, "experts")]

    def new_kv_cache(self, n_slots: int, slot_len: int) -> KVCache:
        return KVCache(len(self.layers), n_slots, self.kv_heads, min(slot_len, self.max_positions), self.key_width,
                       self.dtype, self.value_width)

    async def forward(self, kv: KVCache, chunks: Sequence[SeqChunk], ctx: StepContext | None) -> torch.Tensor:
        """Run one step; returns float32 logits ``[n, vocab]`` for the chunks that want them, in order."""
        try:
            plan = AttentionPlan([(c.slot, len(c.token_ids), kv.manager.stage(c.slot, len(c.token_ids)))
                                  for c in chunks])
            logits = await self._forward(StepAttention(kv, plan, self.family.latent_kv, self.family.windowed), chunks, ctx)
        except BaseException:
            kv.manager.rollback()
            raise
        kv.manager.commit()
        return logits

    async def _forward(self, step: StepAttention, chunks, ctx):
        with torch.inference_mode():
            ids = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.long)
            positions = torch.cat([torch.arange(past, past + n) for _, n, past in step.plan.spans])
            x = self.embed(ids)
            rotary = self.rotary(x[None], positions[None])
        attend = {self._cache_kw: step, "faasmoe_step": step}
        for i, layer in enumerate(self.layers):
            with torch.inference_mode():
                residual = x
                h = layer.input_layernorm(x)
                x = residual + layer.self_attn(hidden_states=h[None], position_embeddings=rotary, attention_mask=None,
                                              **attend)[0][0]
                residual = x
                h = layer.post_attention_layernorm(x)
                mlp = layer.mlp
                if not hasattr(mlp, "experts"):             # a dense layer
                    x = residual + mlp(h)
                    continue
                _, weights, index = mlp.gate(h)
            handle = await self.experts.submit(i, h, index, weights, ctx)
            with torch.inference_mode():          # while the routed experts are away
                shared = self.family.shared(mlp, h)
            routed = await self.experts.collect(handle)
            with torch.inference_mode():
                x = residual + (routed if shared is None else routed + shared)
        with torch.inference_mode():
            rows, end = [], 0
            for chunk in chunks:
                end += len(chunk.token_ids)
                if chunk.want_logits:
                    rows.append(end - 1)
            if not rows:
                return torch.empty((0, self.config.vocab_size), dtype=torch.float32)
            last = self.norm(x[rows])
            return self.lm_head(last).float()
