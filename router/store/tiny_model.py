"""Tiny random ``Qwen2MoeForCausalLM`` checkpoints on disk, reproducible from a seed (demo and tests).

``make_model(**kw)`` builds the torch model; ``make_checkpoint(dir, **kw)`` writes the same model (same kw →
same weights, bit for bit) as a Hugging Face directory in either expert layout, single file or sharded, with a
tiny byte-level tokenizer that ``AutoTokenizer.from_pretrained(dir)`` loads offline. Weights are drawn from
a seeded generator with fan-in scaling (not transformers' init), so activations are O(1) and comparisons
are meaningful.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

EOS = "<|endoftext|>"
UNK = "<unk>"


def make_config(*, num_layers: int = 2, hidden_size: int = 32, num_experts: int = 8, top_k: int = 2,
                moe_intermediate_size: int = 16, shared_expert_intermediate_size: int = 48,
                norm_topk_prob: bool = False, vocab_size: int = 128, mlp_only_layers: Sequence[int] = (),
                decoder_sparse_step: int = 1, num_attention_heads: int | None = None,
                num_key_value_heads: int | None = None, max_position_embeddings: int = 256, **_ignored):
    from transformers import Qwen2MoeConfig
    heads = num_attention_heads or (4 if hidden_size % 4 == 0 else 1)
    kv_heads = num_key_value_heads or max(1, heads // 2)
    return Qwen2MoeConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings, num_experts=num_experts, num_experts_per_tok=top_k,
        moe_intermediate_size=moe_intermediate_size, shared_expert_intermediate_size=shared_expert_intermediate_size,
        norm_topk_prob=norm_topk_prob, mlp_only_layers=list(mlp_only_layers), decoder_sparse_step=decoder_sparse_step,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        architectures=["Qwen2MoeForCausalLM"])


def make_model(*, seed: int = 0, dtype: str = "float32", **kw) -> "torch.nn.Module":
    """The model ``make_checkpoint(dir, seed=seed, dtype=dtype, **kw)`` writes, in eval mode."""
    from transformers import Qwen2MoeForCausalLM
    config = make_config(**kw)
    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(config).eval()
    init_weights(model, seed)
    return model.to(getattr(torch, dtype))


def init_weights(model: "torch.nn.Module", seed: int) -> None:
    """Seeded weights with fan-in scaling (norms near 1, biases small; DeepSeek-V3's routing bias too)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.02 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise * p.shape[-1] ** -0.5)
        for name, b in sorted(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def _per_expert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix, inter = name[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter].clone()
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:].clone()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[name] = t.contiguous()
    return out


def write_tensors(directory: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> None:
    """``model.safetensors``, or ``shards`` files plus ``model.safetensors.index.json`` (contiguous name chunks)."""
    from safetensors.torch import save_file
    names = sorted(tensors)
    if shards <= 1:
        save_file({n: tensors[n] for n in names}, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = names[i * per:(i + 1) * per]
        save_file({n: tensors[n] for n in chunk}, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level tokenizer without merges: specials, then single bytes (printable ASCII first) up to vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = {b: c for b, c in zip(range(256), _byte_chars())}
    order = list(range(32, 127)) + [10, 9] + [b for b in range(256) if b not in range(32, 127) and b not in (9, 10)]
    tokens = [EOS, UNK] + [alphabet[b] for b in order][: max(0, vocab_size - 2)]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS, UNK])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=UNK,
                                   model_max_length=256)
    fast.save_pretrained(str(directory))


def _byte_chars() -> list[str]:
    """GPT-2's byte → printable character table (what ByteLevel pre-tokenisation produces)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def make_checkpoint(dir: str | Path, *, num_layers: int = 2, hidden_size: int = 32, num_experts: int = 8,
                    top_k: int = 2, moe_intermediate_size: int = 16, shared_expert_intermediate_size: int = 48,
                    norm_topk_prob: bool = False, vocab_size: int = 128, layout: str = "per_expert", shards: int = 1,
                    mlp_only_layers: Sequence[int] = (), decoder_sparse_step: int = 1, seed: int = 0,
                    with_tokenizer: bool = True, dtype: str = "float32", **config_kw) -> Path:
    """Write ``make_model(...)`` (same keyword arguments) to ``dir`` and return ``dir`` as a Path.

    ``layout``: ``"per_expert"`` (``experts.{e}.{gate,up,down}_proj.weight``, as checkpoints on disk) or
    ``"fused"`` (transformers 5's ``experts.gate_up_proj`` / ``experts.down_proj``); ``shards`` > 1 writes
    an index. Also writes config.json, generation_config.json and (``with_tokenizer``) the tokenizer.
    """
    if layout not in ("per_expert", "fused"):
        raise ValueError(f"layout {layout!r} is not 'per_expert' or 'fused'")
    kw = dict(num_layers=num_layers, hidden_size=hidden_size, num_experts=num_experts, top_k=top_k,
              moe_intermediate_size=moe_intermediate_size, shared_expert_intermediate_size=shared_expert_intermediate_size,
              norm_topk_prob=norm_topk_prob, vocab_size=vocab_size, mlp_only_layers=tuple(mlp_only_layers),
              decoder_sparse_step=decoder_sparse_step, **config_kw)
    model = make_model(seed=seed, dtype=dtype, **kw)
    directory = Path(dir)
    directory.mkdir(parents=True, exist_ok=True)
    state = {n: t.detach().contiguous() for n, t in model.state_dict().items()}
    write_tensors(directory, _per_expert(state) if layout == "per_expert" else state, shards)
    model.config.dtype = dtype
    model.config.save_pretrained(str(directory))
    model.generation_config.save_pretrained(str(directory))
    if with_tokenizer:
        write_tokenizer(directory, vocab_size)
    return directory
