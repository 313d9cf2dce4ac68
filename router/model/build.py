"""The router's model: transformers' own ``Qwen2MoeForCausalLM`` with every MoE layer's routed experts
replaced by :class:`MeshExperts`, which sends the rows to the mesh. Only dense tensors are loaded, so the
router never holds routed-expert weights; attention, RoPE, KV cache, sampling and ``generate()`` stay
transformers' own and the output is exact.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig
from transformers.models.qwen2_moe import modeling_qwen2_moe as qm

from faasmoe.proto.errors import CheckpointError
from faasmoe.router.store.manifest import Manifest
from faasmoe.router.mesh.dispatch import ExpertMesh

log = logging.getLogger(__name__)


class MeshExperts(torch.nn.Module):
    """Drop-in for ``Qwen2MoeExperts``: same call, the experts run on the mesh.

    Combines exactly as transformers does: experts in ascending order, each expert's rows in
    (slot, token) order, output × routing weight, ``index_add_`` into zeros.
    """

    def __init__(self, layer: int, mesh: ExpertMesh):
        super().__init__()
        self.layer = layer
        self.mesh = mesh

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        x = hidden_states.detach()
        x = (x if x.dtype == torch.float32 else x.float()).contiguous().numpy()
        weights = top_k_weights.detach()
        weights = (weights if weights.dtype == torch.float32 else weights.float()).numpy()
        results = self.mesh.run_layer(self.layer, x, top_k_index.detach().cpu().numpy())
        final = np.zeros_like(x)
        for expert in sorted(results):
            items = results[expert]
            tokens = np.concatenate([r.tokens for r in items]) if len(items) > 1 else items[0].tokens
            slots = np.concatenate([r.slots for r in items]) if len(items) > 1 else items[0].slots
            out = np.concatenate([r.output for r in items]) if len(items) > 1 else items[0].output
            if len(items) > 1:
                order = np.lexsort((tokens, slots))      # (slot, token): transformers' order
                tokens, slots, out = tokens[order], slots[order], out[order]
            # a token meets an expert at most once, so this is transformers' index_add_, in numpy
            final[tokens] += out * weights[tokens, slots, None]
        return torch.from_numpy(final).to(hidden_states.dtype)


def load_dense(store: Path, manifest: Manifest, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    path = Path(store) / manifest.dense_file
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k).to(dtype) for k in fh.keys()}
    except Exception as exc:  # OSError, or safetensors' own error types
        raise CheckpointError(f"{path}: cannot read the dense weights ({exc})") from None


def build_mesh_model(store: str | Path, manifest: Manifest, mesh: ExpertMesh,
                     dtype: torch.dtype = torch.float32) -> qm.Qwen2MoeForCausalLM:
    store = Path(store)
    config = AutoConfig.from_pretrained(str(store))
    if config.model_type != "qwen2_moe":
        raise CheckpointError(f"{store / 'config.json'}: model_type {config.model_type!r} is not qwen2_moe")
    with torch.device("meta"):
        model = qm.Qwen2MoeForCausalLM(config)
    for i in manifest.moe_layers:        # the layers the split found experts in
        mlp = model.model.layers[i].mlp if i < len(model.model.layers) else None
        if not isinstance(mlp, qm.Qwen2MoeSparseMoeBlock):
            raise CheckpointError(f"{store / 'manifest.json'}: layer {i} has expert functions but no MoE block "
                                  "in config.json; the store does not match its config")
        mlp.experts = MeshExperts(i, mesh)
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
