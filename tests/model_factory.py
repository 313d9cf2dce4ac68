"""Test helpers around :mod:`faasmoe.router.store.tiny_model` (which builds the tiny checkpoints)."""

from __future__ import annotations

import torch

from faasmoe.router.store.tiny_model import (EOS, make_checkpoint, make_config, make_model,  # noqa: F401
                                       write_tensors, write_tokenizer)


def expert_params(model, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate_up_proj [E, 2I, H], down_proj [E, H, I])`` of ``layer``, as transformers holds them."""
    experts = model.model.layers[layer].mlp.experts
    return experts.gate_up_proj.detach(), experts.down_proj.detach()


def torch_expert(model, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
    """One routed expert computed the way transformers' ``Qwen2MoeExperts.forward`` does (unweighted)."""
    experts = model.model.layers[layer].mlp.experts
    gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
    return torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[expert])
