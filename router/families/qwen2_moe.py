"""Qwen2-MoE (Qwen1.5-MoE-A2.7B): softmax top-k (renormalised when ``norm_topk_prob``), one shared expert
scaled by a sigmoid gate, dense layers from ``mlp_only_layers`` / ``decoder_sparse_step``."""

import torch.nn.functional as F

from faasmoe.router.families.base import Family, sparse_step_layers


def _shared(mlp, hidden):
    return F.sigmoid(mlp.shared_expert_gate(hidden)) * mlp.shared_expert(hidden)


FAMILY = Family("qwen2_moe", "Qwen2MoeForCausalLM", ("num_experts",), "moe_intermediate_size", sparse_step_layers,
                shared=_shared, windowed=True)
