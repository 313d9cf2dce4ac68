"""The MoE model families the split, the router and the engine serve, registered by ``model_type``.

A family says what differs between MoE models around their routed experts, which are the same gated-SiLU MLP
in every one of them (the one expert-function graph, :mod:`faasmoe.proto.function_abi`):

- the config keys of the routed experts' count and width, and which layers have an MoE block;
- where the routed-expert tensors sit in a checkpoint and how they map to a function's gate, up and down;
- how the MoE block's shared experts, if any, add to the routed ones;
- what the attention layer caches per token (keys and values per KV head, or DeepSeek's compressed latent).

Routing (softmax or sigmoid, top-k, renormalising, group-limited, bias-corrected) is never re-implemented:
the runner calls transformers' own router module of the block (``mlp.gate``), which returns the top-k
indices and weights exactly as transformers computes them. Attention runs through each family's own
transformers module too (:mod:`faasmoe.router.model.attention`).

Adding a family is one module here with its :class:`~faasmoe.router.families.base.Family` and a line in
:data:`FAMILIES`.
"""

from __future__ import annotations

from faasmoe.proto.errors import CheckpointError
from faasmoe.router.families.base import Family
from faasmoe.router.families import deepseek, mixtral, olmoe, qwen2_moe, qwen3_moe

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    qwen2_moe.FAMILY, qwen3_moe.FAMILY, mixtral.FAMILY, olmoe.FAMILY, deepseek.V2, deepseek.V3)}


def supported() -> str:
    """``"qwen2_moe (Qwen2MoeForCausalLM), ..."``: for error messages and ``--help``."""
    return ", ".join(f"{f.model_type} ({f.architecture})" for f in FAMILIES.values())


def family_of(model_type: object, where: str = "config.json") -> Family:
    """The family of a checkpoint's ``model_type``; a CheckpointError listing the supported ones otherwise."""
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported; faasmoe serves {supported()}")
    return family
