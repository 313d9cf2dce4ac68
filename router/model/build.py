"""The router's model: transformers' own model class of the store's family (:mod:`faasmoe.router.families`:
``Qwen2MoeForCausalLM``, ``Qwen3MoeForCausalLM``, ``MixtralForCausalLM``, ...) with every MoE layer's routed
experts replaced by a weightless :class:`RemoteExperts`. Only dense tensors are loaded, so the router never holds
routed-expert weights; the engine's runner drives transformers' own modules (norms, attention projections,
RoPE, attention kernel, gate, shared expert, lm_head) and sends the routed experts' rows to the mesh.

The dense part is float32 (exact), or bfloat16 (``--dense-dtype bfloat16``, opt-in, not exact): the attention,
shared-expert and dense-layer MLP projections and the embedding table are stored in bfloat16 (:mod:`~faasmoe.router.model.bf16`)
while the residual stream, norms, the gate and ``lm_head`` stay float32. Measured on the trained model
(teacher-forced top-1 against float32): everything in bfloat16 98.85 %, float32 residual 99.02 %, and with a
float32 ``lm_head`` 99.66 %: bfloat16 logits cannot tell close candidates apart. Or int8 (``--dense-dtype int8``,
opt-in, not exact: :mod:`~faasmoe.router.model.int8`): the same projections and ``lm_head`` as asymmetric int8
blocks of 128 run by ONNX Runtime's ``MatMulNBits`` (the int8 experts' kernel), the embedding table bfloat16, for
CPUs where bfloat16 is no faster than float32.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from faasmoe.proto.errors import CheckpointError, ConfigError, FaasmoeError
from faasmoe.router.families import Family, family_of
from faasmoe.router.model.bf16 import store_in_bfloat16
from faasmoe.router.model.int8 import store_in_int8
from faasmoe.router.store.checkpoint import read_header, read_tensor
from faasmoe.router.store.manifest import Manifest

log = logging.getLogger(__name__)


class RemoteExperts(torch.nn.Module):
    """Stands where the block's experts module (``Qwen2MoeExperts``, ``MixtralExperts``, ...) stood: the layer's
    routed experts live on the mesh and hold no weights
    here. The engine's :class:`~faasmoe.router.model.runner.ModelRunner` sends their rows to the mesh itself
    (overlapped with the shared expert); calling this module is a programming error."""

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        raise FaasmoeError(f"the routed experts of layer {self.layer} run on the mesh: generate through "
                           "faasmoe.router.engine, not with the model's own forward")


def load_dense(model: torch.nn.Module, path: Path, family: Family | None = None) -> tuple[list[str], list[str]]:
    """Copy the store's dense tensors into ``model``'s parameters one at a time, each converted to its
    parameter's dtype (positioned reads, no whole-file copy); a module with ``load_weight`` (the int8 dense part)
    takes its weight itself. Checkpoint names become module names by the family's rule. Returns (missing,
    unexpected) names."""
    state, modules = model.state_dict(), dict(model.named_modules())
    family = family or family_of(model.config.model_type)
    takers = {f"{name}.weight": m for name, m in modules.items() if hasattr(m, "load_weight")}
    infos = read_header(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        with torch.inference_mode():
            for stored, info in infos.items():
                name = family.module_name(stored)
                taker = takers.get(name)
                want = (taker.out_features, taker.in_features) if taker is not None else (
                    tuple(state[name].shape) if name in state else None)
                if want is None:
                    continue
                if want != info.shape:
                    raise CheckpointError(f"{path}: {name} is {list(info.shape)}, the config makes it {list(want)}; "
                                          "the store does not match its config.json")
                if taker is not None:
                    taker.load_weight(read_tensor(fd, info))
                else:
                    state[name].copy_(read_tensor(fd, info))
    finally:
        os.close(fd)
    expected, found = set(state) | set(takers), {family.module_name(n) for n in infos}
    return sorted(expected - found), sorted(found - expected)


def build_mesh_model(store: str | Path, manifest: Manifest,
                     dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """transformers' model of ``store`` with only its dense weights: each MoE layer's routed experts are a
    weightless :class:`RemoteExperts` (they run on the mesh). ``dtype`` float32, bfloat16 or int8 (see above)."""
    store = Path(store)
    if dtype not in (torch.float32, torch.bfloat16, torch.int8):
        raise ConfigError(f"the dense part is float32, bfloat16 or int8, not {dtype}")
    # the runner relies on SDPA's semantics (no mask = causal prefill, boolean masks); transformers' default
    family = family_of(_model_type(store), str(store / "config.json"))
    config = AutoConfig.from_pretrained(str(store), attn_implementation="sdpa")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    for i in manifest.moe_layers:        # the layers the split found experts in
        mlp = model.model.layers[i].mlp if i < len(model.model.layers) else None
        if not hasattr(mlp, "experts"):
            raise CheckpointError(f"{store / 'manifest.json'}: layer {i} has expert functions but no MoE block "
                                  "in config.json; the store does not match its config")
        mlp.experts = RemoteExperts(i)
    if dtype == torch.bfloat16:
        store_in_bfloat16(model)
    elif dtype == torch.int8:
        store_in_int8(model)
    model.to_empty(device="cpu")
    path = store / manifest.dense_file
    try:
        missing, unexpected = load_dense(model, path, family)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the dense weights ({exc})") from None
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{store / manifest.dense_file}: dense weights do not match the config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    # to_empty leaves RoPE's non-persistent inv_freq buffers uninitialised: rebuild them.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.eval()
    return model


def _model_type(store: Path) -> object:
    """config.json's model_type, read before transformers sees it (so an unsupported one fails by name)."""
    import json
    try:
        return json.loads((store / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{store / 'config.json'}: unreadable ({exc})") from None


def dense_bytes(model: torch.nn.Module) -> int:
    """Bytes of the router's weights (tied tensors counted once; prepacked int8 weights by their size)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total + sum(m.weight_bytes for m in model.modules() if hasattr(m, "weight_bytes"))
