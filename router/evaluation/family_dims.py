"""Checkpoints at the real dimensions of each family's reference model, with random weights from a seed, cut to a
number of layers (for speed and memory benchmarks only: random weights say nothing about fidelity).

Written by transformers itself (``save_pretrained`` of the model built in bfloat16, each family's own checkpoint
names), weights drawn as the tests' tiny models' (:func:`~faasmoe.router.store.tiny_model.init_weights`).
"""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2)

DIMS: dict[str, dict] = {
    # Qwen3-30B-A3B: 48 layers, hidden 2048, 32 heads / 4 KV heads of 128, 128 experts of 768, top-8
    "qwen3_moe": dict(COMMON, vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                      num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=8192,
                      rms_norm_eps=1e-6),
    # Mixtral-8x7B: 32 layers, hidden 4096, 32 / 8 heads, 8 experts of 14336, top-2
    "mixtral": dict(COMMON, vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, sliding_window=None),
    # OLMoE-1B-7B: 16 layers, hidden 2048, 16 heads, 64 experts of 1024, top-8
    "olmoe": dict(COMMON, vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_attention_heads=16,
                  num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
                  max_position_embeddings=4096, rms_norm_eps=1e-5),
    # DeepSeek-V2-Lite: 27 layers (the first dense), hidden 2048, 16 heads, MLA (KV rank 512, no q compression),
    # 64 routed experts of 1408, top-6, 2 shared
    "deepseek_v2": dict(COMMON, vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                        moe_intermediate_size=1408, num_attention_heads=16, num_key_value_heads=16,
                        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
                        kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128,
                        v_head_dim=128, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
                        max_position_embeddings=4096, rms_norm_eps=1e-6),
}


def write_checkpoint(out: Path, model_type: str, layers: int, seed: int = 1234) -> Path:
    """``model_type``'s reference dimensions with ``layers`` layers, random weights, bfloat16 safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from faasmoe.router.store.tiny_model import init_weights
    out = Path(out)
    if (out / "config.json").exists():
        return out
    config = AutoConfig.for_model(model_type, num_hidden_layers=layers, **DIMS[model_type])
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    init_weights(model, seed)                 # every saved tensor (RoPE's buffers are not saved)
    model.config.dtype = "bfloat16"
    model.save_pretrained(str(out), max_shard_size="2GB")
    return out
