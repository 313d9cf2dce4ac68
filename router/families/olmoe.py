"""OLMoE: softmax top-k, no shared expert, every layer MoE, q/k RMS norms over the whole projection."""

from faasmoe.router.families.base import Family, every_layer

FAMILY = Family("olmoe", "OlmoeForCausalLM", ("num_experts",), "intermediate_size", every_layer)
