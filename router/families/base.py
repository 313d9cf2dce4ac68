"""What a family declares (see :mod:`faasmoe.router.families`); the checks on config values live here too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

EXPERT_KEYS = ("gate_proj", "up_proj", "down_proj")


def positive_int(raw: dict, key: str, where: str) -> int:
    from faasmoe.proto.errors import CheckpointError
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def every_layer(raw: dict) -> tuple[int, ...]:
    return tuple(range(raw["num_hidden_layers"]))


def sparse_step_layers(raw: dict) -> tuple[int, ...]:
    """Qwen's rule: layers not in ``mlp_only_layers`` whose index + 1 is a multiple of ``decoder_sparse_step``."""
    from faasmoe.proto.errors import CheckpointError
    step, mlp_only = raw.get("decoder_sparse_step", 1), raw.get("mlp_only_layers") or []
    if not isinstance(step, int) or step <= 0 or not isinstance(mlp_only, list):
        raise CheckpointError(f"config.json: decoder_sparse_step {step!r} / mlp_only_layers {mlp_only!r} are malformed")
    return tuple(l for l in range(raw["num_hidden_layers"]) if l not in mlp_only and (l + 1) % step == 0)


def no_shared(mlp, hidden):
    return None


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    experts_keys: tuple[str, ...]         # config keys for the number of routed experts (the first present)
    expert_width_key: str                 # config key: a routed expert's intermediate size
    moe_layers: Callable[[dict], tuple[int, ...]]      # raw config -> the layers with an MoE block
    block: str = "mlp"                    # the MoE block's name in checkpoints (Mixtral: block_sparse_moe)
    expert_keys: tuple[str, str, str] = EXPERT_KEYS    # per-expert tensor names of gate, up, down
    # the shared experts' output for the block's input, or None: added to the routed output (routed + shared,
    # transformers' order of the addition)
    shared: Callable[[Any, Any], Any] = no_shared
    latent_kv: bool = False               # the attention caches a compressed latent (DeepSeek's MLA)
    windowed: bool = False                # its model masks attention by a sliding window when configured

    def num_experts(self, raw: dict, where: str) -> int:
        key = next((k for k in self.experts_keys if raw.get(k) is not None), self.experts_keys[0])
        return positive_int(raw, key, where)

    def expert_prefix(self, layer: int) -> str:
        """Checkpoint name prefix of a layer's routed experts (``model.layers.3.mlp.experts``)."""
        return f"model.layers.{layer}.{self.block}.experts"

    def module_name(self, checkpoint_name: str) -> str:
        """transformers' parameter name of a dense checkpoint tensor (the MoE block is ``mlp`` in its modules)."""
        if self.block != "mlp":
            return checkpoint_name.replace(f".{self.block}.", ".mlp.", 1)
        return checkpoint_name

    def cache_layout(self, config) -> tuple[int, int, int]:
        """What one token puts in one layer's cache: ``(heads, key width, value width)``."""
        if self.latent_kv:                 # MLA: the normalised latent and the rotated shared key, one "head"
            return 1, config.kv_lora_rank, config.qk_rope_head_dim
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return config.num_key_value_heads, head_dim, head_dim
