"""The contract of an expert function file (ONNX), shared by the splitter that writes it and the node
that runs it. A node needs nothing but this to run a function: no torch, no model config.

A function holds the routed experts ``expert_ids`` (G of them) of one MoE layer.

- input ``hidden``: float32 [N, hidden_size], the token rows sent to this node;
- inputs ``rows_0`` … ``rows_{G-1}``: int64 [n_j], which rows expert j runs on (may be empty);
- output ``out``: float32 [n_0 + … + n_{G-1}, hidden_size], expert 0's outputs first, unweighted
  (the router applies the routing weights, exactly as transformers does).

Expert j computes ``down_j(silu(gate_j(x)) * up_j(x))`` on its rows only, so a G-expert function costs
what G single-expert functions cost on the same rows. Metadata (ONNX ``metadata_props``) repeats layer,
expert ids and sizes so a node can describe what it holds.
"""

ABI_VERSION = "1"
HIDDEN_INPUT = "hidden"
OUTPUT = "out"
META_ABI = "faasmoe.abi"
META_LAYER = "faasmoe.layer"
META_EXPERTS = "faasmoe.expert_ids"
META_HIDDEN = "faasmoe.hidden_size"
META_INTERMEDIATE = "faasmoe.intermediate_size"
META_MODEL = "faasmoe.model_id"


def rows_input(j: int) -> str:
    return f"rows_{j}"


# What a function costs on a node: the memory its ONNX Runtime session holds when loaded. Measured with
# onnxruntime 1.32 / glibc (arena off): RSS grows by 1.00-1.01 x the file per session, plus per-session
# overhead. Nodes admit deployments and loads by this estimate and routers place by it, so every function
# deployed at overcommit 1 can be loaded at the same time.
RESIDENT_FACTOR = 1.02
RESIDENT_OVERHEAD_BYTES = 1 << 20


def resident_estimate_bytes(size_bytes: int) -> int:
    return int(size_bytes * RESIDENT_FACTOR) + RESIDENT_OVERHEAD_BYTES
