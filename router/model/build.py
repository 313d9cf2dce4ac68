"""The router's model: transformers' own ``Qwen2MoeForCausalLM`` with every MoE layer's routed experts
replaced by a weightless :class:`RemoteExperts`. Only dense tensors are loaded, so the router never holds
routed-expert weights; the engine's runner drives transformers' own modules (norms, attention projections,
RoPE, attention kernel, gate, shared expert, lm_head) and sends the routed experts' rows to the mesh.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig
from transformers.models.qwen2_moe import modeling_qwen2_moe as qm

from faasmoe.proto.errors import CheckpointError, FaasmoeError
from faasmoe.router.store.manifest import Manifest

log = logging.getLogger(__name__)


class RemoteExperts(torch.nn.Module):
    """Stands where ``Qwen2MoeExperts`` stood: the layer's routed experts live on the mesh and hold no weights
    here. The engine's :class:`~faasmoe.router.model.runner.ModelRunner` sends their rows to the mesh itself
    (overlapped with the shared expert); calling this module is a programming error."""

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        raise FaasmoeError(f"the routed experts of layer {self.layer} run on the mesh: generate through "
                           "faasmoe.router.engine, not with the model's own forward")


def load_dense(store: Path, manifest: Manifest, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    path = Path(store) / manifest.dense_file
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k).to(dtype) for k in fh.keys()}
    except Exception as exc:  # OSError, or safetensors' own error types
        raise CheckpointError(f"{path}: cannot read the dense weights ({exc})") from None


def build_mesh_model(store: str | Path, manifest: Manifest,
                     dtype: torch.dtype = torch.float32) -> qm.Qwen2MoeForCausalLM:
    """transformers' model of ``store`` with only its dense weights: each MoE layer's routed experts are a
    weightless :class:`RemoteExperts` (they run on the mesh)."""
    store = Path(store)
    # the runner relies on SDPA's semantics (no mask = causal prefill, boolean masks); transformers' default
    config = AutoConfig.from_pretrained(str(store), attn_implementation="sdpa")
    if config.model_type != "qwen2_moe":
        raise CheckpointError(f"{store / 'config.json'}: model_type {config.model_type!r} is not qwen2_moe")
    with torch.device("meta"):
        model = qm.Qwen2MoeForCausalLM(config)
    for i in manifest.moe_layers:        # the layers the split found experts in
        mlp = model.model.layers[i].mlp if i < len(model.model.layers) else None
        if not isinstance(mlp, qm.Qwen2MoeSparseMoeBlock):
            raise CheckpointError(f"{store / 'manifest.json'}: layer {i} has expert functions but no MoE block "
                                  "in config.json; the store does not match its config")
        mlp.experts = RemoteExperts(i)
    model.to_empty(device="cpu")
    model.to(dtype)
    dense = load_dense(store, manifest, dtype)
    missing, unexpected = model.load_state_dict(dense, strict=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{store / manifest.dense_file}: dense weights do not match the config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    # to_empty leaves RoPE's non-persistent inv_freq buffers uninitialised: rebuild them.
    model.model.rotary_emb = qm.Qwen2MoeRotaryEmbedding(config=config)
    model.eval()
    return model


def dense_bytes(model: torch.nn.Module) -> int:
    """Bytes of the router's weights (tied tensors counted once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total
