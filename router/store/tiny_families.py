"""Tiny random checkpoints of every supported family (:mod:`faasmoe.router.families`), reproducible from a seed,
written as transformers writes them (``save_pretrained``: each family's own checkpoint names, e.g. Mixtral's
``block_sparse_moe.experts.{e}.w1``) with the byte-level tokenizer of :mod:`~faasmoe.router.store.tiny_model`.

Each config exercises what sets its family apart: Qwen3-MoE's per-head q/k norms and renormalised top-k,
Mixtral's ``w1/w2/w3`` names (and a sliding window on request), OLMoE's whole-projection q/k norms, DeepSeek's
dense first layer, shared experts and latent attention (V2: greedy softmax top-k, no q compression; V3: sigmoid
scores with a bias correction, group-limited top-k, q compression, renormalised and scaled weights).
"""

from __future__ import annotations

from pathlib import Path

import torch

from faasmoe.router.store.tiny_model import init_weights, make_checkpoint, make_model, write_tokenizer

_COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_experts_per_tok=2,
               max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
               pad_token_id=0)
_DEEPSEEK = dict(_COMMON, num_hidden_layers=3, num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=16,
                 n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                 qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)

CONFIGS: dict[str, dict] = {
    "qwen3_moe": dict(_COMMON, num_key_value_heads=2, head_dim=8, intermediate_size=64, moe_intermediate_size=16,
                      num_experts=8, norm_topk_prob=True),
    "mixtral": dict(_COMMON, num_key_value_heads=2, intermediate_size=16, num_local_experts=8, sliding_window=None),
    "olmoe": dict(_COMMON, num_key_value_heads=4, intermediate_size=16, num_experts=8, norm_topk_prob=False),
    "deepseek_v2": dict(_DEEPSEEK, q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1,
                        routed_scaling_factor=1.0),
    "deepseek_v3": dict(_DEEPSEEK, q_lora_rank=24, n_group=2, topk_group=1, norm_topk_prob=True,
                        routed_scaling_factor=2.5),
}
FAMILY_NAMES = ("qwen2_moe", *CONFIGS)


def make_family_config(model_type: str, **overrides):
    from transformers import AutoConfig
    kw = dict(CONFIGS[model_type], **overrides)
    return AutoConfig.for_model(model_type, **kw)


def make_family_model(model_type: str, *, seed: int = 0, **overrides) -> torch.nn.Module:
    """The float32 model :func:`make_family_checkpoint` writes, in eval mode (``qwen2_moe``: tiny_model's)."""
    if model_type == "qwen2_moe":
        return make_model(seed=seed, **overrides)
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_family_config(model_type, **overrides),
                                             attn_implementation="sdpa").eval()
    init_weights(model, seed)
    return model


def make_family_checkpoint(dir: str | Path, model_type: str, *, seed: int = 0, **overrides) -> Path:
    directory = Path(dir)
    if model_type == "qwen2_moe":
        return make_checkpoint(directory, seed=seed, **overrides)
    model = make_family_model(model_type, seed=seed, **overrides)
    model.config.dtype = "float32"
    model.save_pretrained(str(directory))
    write_tokenizer(directory, model.config.vocab_size)
    return directory
