"""Qwen1.5-MoE-A2.7B-dimension checkpoints with random weights, written tensor by tensor (never whole in memory),
optionally with gates that route like a trained model.

The model is ``Qwen2MoeForCausalLM`` at Qwen1.5-MoE-A2.7B's dimensions (hidden 2048, 16 heads, 60 routed experts
of 1408, top-4, a gated shared expert of 5632, vocabulary 151,936, q/k/v biases), in bfloat16, in shards with
``model.safetensors.index.json`` and the per-expert key layout of the released checkpoint. Every tensor comes
from its own generator (seeded by the seed and its name), so any subset of layers is the same weights; the scheme
is the tests' tiny models' (norms 1 + N(0, 0.1), biases N(0, 0.02), embeddings N(0, 1), matrices N(0, 1/fan_in)).

Random gates route almost uniformly, which keeps every expert busy. With ``popularity_from`` (a trained model),
each expert of the trained model's layers is counted on held-out Python source (the standard library), and each
gate row of the written model is scaled so that top-4 of random-hidden-state logits picks experts with those
frequencies (layer l takes the popularity of the trained model's layer ``l * L_trained // layers``). transformers
runs the same weights, so outputs stay comparable. ``bench/qwen_checkpoint.py`` is the command line.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch

DIMS = dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
            shared_expert_intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16, num_experts=60,
            num_experts_per_tok=4, norm_topk_prob=False, max_position_embeddings=8192, rope_theta=1000000.0,
            rms_norm_eps=1e-6, qkv_bias=True, tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[],
            use_sliding_window=False, hidden_act="silu", bos_token_id=151643, eos_token_id=151643)


def tensor_specs(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in file order."""
    h, v, i, s, e = (DIMS[k] for k in ("hidden_size", "vocab_size", "moe_intermediate_size",
                                       "shared_expert_intermediate_size", "num_experts"))
    specs = [("model.embed_tokens.weight", (v, h))]
    for layer in range(layers):
        p = f"model.layers.{layer}."
        specs += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        for proj in ("q", "k", "v"):
            specs += [(p + f"self_attn.{proj}_proj.weight", (h, h)), (p + f"self_attn.{proj}_proj.bias", (h,))]
        specs += [(p + "self_attn.o_proj.weight", (h, h)), (p + "mlp.gate.weight", (e, h)),
                  (p + "mlp.shared_expert_gate.weight", (1, h)), (p + "mlp.shared_expert.gate_proj.weight", (s, h)),
                  (p + "mlp.shared_expert.up_proj.weight", (s, h)), (p + "mlp.shared_expert.down_proj.weight", (h, s))]
        for x in range(e):
            specs += [(p + f"mlp.experts.{x}.gate_proj.weight", (i, h)), (p + f"mlp.experts.{x}.up_proj.weight", (i, h)),
                      (p + f"mlp.experts.{x}.down_proj.weight", (h, i))]
    return specs + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def make_tensor(name: str, shape: tuple[int, ...], seed: int, gate_scales: dict[int, np.ndarray]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed ^ int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "little"))
    if name.endswith("norm.weight"):
        return (1 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    if len(shape) == 1:
        return (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    scale = 1.0 if "embed_tokens" in name else shape[-1] ** -0.5
    for lo in range(0, shape[0], 8192):                  # bounded temporaries for the 151936-row matrices
        hi = min(shape[0], lo + 8192)
        out[lo:hi] = (scale * torch.randn((hi - lo, *shape[1:]), generator=gen)).to(torch.bfloat16)
    layer = int(name.split(".")[2]) if name.endswith("mlp.gate.weight") else None
    if layer is not None and layer in gate_scales:
        out = (out.float() * torch.from_numpy(gate_scales[layer]).float()[:, None]).to(torch.bfloat16)
    return out


def write_shards(out: Path, specs, seed: int, shard_bytes: int, gate_scales) -> int:
    """Safetensors shards written tensor by tensor: each header is computed from the shapes, then every tensor is
    generated, written and freed. Returns the number of parameters."""
    shards, current, size = [], [], 0
    for name, shape in specs:
        nbytes = 2 * math.prod(shape)
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            nbytes = 2 * math.prod(shape)
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(out / fname, "wb") as fh:
            fh.write(len(blob).to_bytes(8, "little"))
            fh.write(blob)
            for name, shape in shard:
                fh.write(make_tensor(name, shape, seed, gate_scales).view(torch.uint8).numpy().tobytes())
                total += math.prod(shape)
        print(f"  {fname}: {len(shard)} tensors, {offset / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def measure_popularity(model_dir: Path, tokens: int = 20000) -> np.ndarray:
    """[layers, experts]: how often each expert of a trained model is picked, on standard-library source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    ids = []
    for path in files[1::7]:
        ids += tok(path.read_text(errors="replace"))["input_ids"][:1024]
        if len(ids) >= tokens:
            break
    cfg = model.config
    counts = np.zeros((cfg.num_hidden_layers, cfg.num_experts))
    for i, layer in enumerate(model.model.layers):
        def hook(module, args, output, i=i):
            np.add.at(counts[i], output[2].reshape(-1).numpy(), 1)
        layer.mlp.gate.register_forward_hook(hook)
    with torch.inference_mode():
        for lo in range(0, len(ids), 512):
            model(torch.tensor([ids[lo:lo + 512]]))
    return counts / counts.sum(axis=1, keepdims=True)


def fit_scales(target: np.ndarray, top_k: int, rng: np.random.Generator, samples: int = 40000) -> np.ndarray:
    """Per-expert scales s such that top-k of independent N(0, s_e^2) logits picks expert e with frequency target_e."""
    target = np.maximum(target, 1e-4)
    target = target / target.sum()
    scales = np.ones(len(target))
    z = rng.standard_normal((samples, len(target)))
    for _ in range(300):
        picked = np.argpartition(-(z * scales), top_k, axis=1)[:, :top_k]
        freq = np.bincount(picked.ravel(), minlength=len(target)) / picked.size
        scales *= (target / np.maximum(freq, 1e-6)) ** 0.25
        scales /= np.exp(np.mean(np.log(scales)))
    return scales


def write_checkpoint(out: Path, layers: int, seed: int = 1234, popularity_from: Path | None = None,
                     shard_bytes: int = 2 << 30) -> dict:
    """Write the checkpoint into ``out`` (config, generation config, shards, index, and ``routing.json`` with
    ``popularity_from``); returns {"parameters": N, "routing": ... or None}."""
    out.mkdir(parents=True, exist_ok=True)
    gate_scales, routing = {}, None
    if popularity_from is not None:
        popularity = measure_popularity(popularity_from)
        rng = np.random.default_rng(seed)
        trained = popularity.shape[0]
        for layer in range(layers):
            gate_scales[layer] = fit_scales(popularity[layer * trained // layers], DIMS["num_experts_per_tok"], rng)
        routing = {"popularity_from": str(popularity_from), "popularity": popularity.round(5).tolist(),
                   "experts_for_80_percent": [experts_for(p, 0.8) for p in popularity]}
        (out / "routing.json").write_text(json.dumps(routing))
    total = write_shards(out, tensor_specs(layers), seed, shard_bytes, gate_scales)
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": DIMS["bos_token_id"],
                                                            "eos_token_id": DIMS["eos_token_id"], "do_sample": False}))
    config = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "num_hidden_layers": layers,
              "torch_dtype": "bfloat16", "layer_types": ["full_attention"] * layers, **DIMS}
    (out / "config.json").write_text(json.dumps(config, indent=1))     # last: its presence means "complete"
    return {"parameters": total, "routing": routing}


def experts_for(share: np.ndarray, fraction: float) -> int:
    """How many of the most popular experts take ``fraction`` of the picks."""
    return int(np.searchsorted(np.cumsum(np.sort(share)[::-1]), fraction)) + 1
