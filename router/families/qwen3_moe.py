"""Qwen3-MoE (Qwen3-30B-A3B): softmax top-k, no shared expert, q/k RMS norms per head (in transformers'
attention module), dense layers as Qwen2-MoE."""

from faasmoe.router.families.base import Family, sparse_step_layers

FAMILY = Family("qwen3_moe", "Qwen3MoeForCausalLM", ("num_experts", "num_local_experts"), "moe_intermediate_size", sparse_step_layers,
                windowed=True)
