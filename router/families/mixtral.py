"""Mixtral: softmax top-k renormalised, no shared expert, every layer MoE, optional sliding-window attention.
Checkpoints name the block ``block_sparse_moe`` and the expert matrices ``w1`` (gate), ``w3`` (up), ``w2``
(down)."""

from faasmoe.router.families.base import Family, every_layer

FAMILY = Family("mixtral", "MixtralForCausalLM", ("num_local_experts",), "intermediate_size", every_layer,
                block="block_sparse_moe", expert_keys=("w1", "w3", "w2"), windowed=True)
