"""DeepSeek-V2 (V2-Lite) and DeepSeek-V3 (and the models sharing its layout): the first
``first_k_dense_replace`` layers dense, ``n_shared_experts`` shared experts as one plain MLP added to the routed
output, multi-head latent attention. V2 routes with softmax (greedy or group-limited top-k), V3 with
sigmoid scores, a bias correction and group-limited top-k; both are transformers' own router modules. The
cache holds MLA's compressed latent and rotated key (what transformers caches), expanded per attention call."""

from faasmoe.router.families.base import Family


def _moe_layers(raw: dict) -> tuple[int, ...]:
    first = raw.get("first_k_dense_replace")
    if first is None:                      # transformers' default for the model type (V3: 3, V2: 0)
        from transformers import AutoConfig
        first = AutoConfig.for_model(raw["model_type"]).first_k_dense_replace
    return tuple(range(first, raw["num_hidden_layers"]))


def _shared(mlp, hidden):
    return mlp.shared_experts(hidden)


V2 = Family("deepseek_v2", "DeepseekV2ForCausalLM", ("n_routed_experts",), "moe_intermediate_size", _moe_layers,
            shared=_shared, latent_kv=True)
V3 = Family("deepseek_v3", "DeepseekV3ForCausalLM", ("n_routed_experts",), "moe_intermediate_size", _moe_layers,
            shared=_shared, latent_kv=True)
