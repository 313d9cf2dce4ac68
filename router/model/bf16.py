"""A bfloat16 dense part that hands back float32: weights stored in bfloat16, activations kept in float32.

:func:`store_in_bfloat16` swaps, in a model still on the meta device, the attention projections and the shared
expert's (or a dense layer's MLP's) projections (``nn.Linear``) for :class:`Bf16Linear`, and the embedding table for
:class:`Bf16Embedding`. Each computes in bfloat16 (torch's bfloat16 kernels, so no weight is converted per call)
and returns float32, so the residual stream, the norms, the gate, the routed experts' rows and ``lm_head``
(float32, with a tied embedding too) see float32. Only the matrices that dominate the bytes are halved: at
Qwen1.5-MoE-A2.7B's dimensions the router holds 4.3 GB instead of 7.4 GB in float32 (3.7 GB all-bfloat16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BF16 = torch.bfloat16


class Bf16Linear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.nn.Parameter(linear.weight.detach().to(BF16), requires_grad=False)
        self.bias = (None if linear.bias is None else
                     torch.nn.Parameter(linear.bias.detach().to(BF16), requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(BF16), self.weight, self.bias).to(x.dtype if x.dtype != BF16 else torch.float32)


class Bf16Embedding(torch.nn.Module):
    compute_dtype = torch.float32          # what the runner's activations and KV cache are

    def __init__(self, embedding: torch.nn.Embedding):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.weight = torch.nn.Parameter(embedding.weight.detach().to(BF16), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx).float()


def swap_projections(model, make) -> None:
    """Replace every ``nn.Linear`` of each layer's attention module and of its shared experts (or of a dense
    layer's MLP) by ``make(linear)``: whatever a family names them (q/k/v/o, MLA's low-rank projections, ...).
    Routers and the shared expert's one-output gate stay as they are."""
    for layer in model.model.layers:
        parts = [layer.self_attn]
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            parts += [getattr(mlp, name) for name in ("shared_expert", "shared_experts") if hasattr(mlp, name)]
        else:
            parts.append(mlp)
        for part in parts:
            for name, child in list(part.named_modules()):
                if isinstance(child, torch.nn.Linear) and name:
                    parent_name, _, attr = name.rpartition(".")
                    setattr(part.get_submodule(parent_name) if parent_name else part, attr, make(child))


def store_in_bfloat16(model) -> None:
    """Swap the large dense matrices of a model of any family for bfloat16-stored modules (on the meta device
    before its weights are loaded, as the router does, or with weights, which are rounded to bfloat16)."""
    swap_projections(model, Bf16Linear)
    if not model.config.tie_word_embeddings:            # a tied table stays float32 with lm_head
        model.model.embed_tokens = Bf16Embedding(model.model.embed_tokens)
