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

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


# -- the graph itself: what the splitter emits and the only thing a node accepts --------------------------------
OPSET = 17                      # the default ("ai.onnx") domain, the only opset imported
IR_VERSION = 8
FLOAT, INT64 = 1, 7             # ONNX TensorProto data types
CONSTANTS = ("c_zero", "c_inter", "c_two_inter", "c_axis1")      # int64 [1]: 0, I, 2I, 1
MAX_EXPERTS = 1024              # per function
MAX_HIDDEN = 1 << 16
MAX_INTERMEDIATE = 1 << 18
MAX_FUNCTION_BYTES = (1 << 31) - 1           # ONNX's protobuf limit


@dataclass(frozen=True)
class Op:
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: tuple[tuple[str, int], ...] = ()   # int attributes only


def weight_names(expert: int) -> tuple[str, str]:
    return f"e{expert}_gate_up", f"e{expert}_down"


def graph_ops(expert_ids: Sequence[int]) -> list[Op]:
    """Every node of a function's graph, in order: per expert j, gather its rows, the fused gate/up MatMul,
    SiLU(gate) * up, the down MatMul; then the outputs concatenated (Identity for one expert)."""
    ops, outs = [], []
    for j, expert in enumerate(expert_ids):
        p, rows = f"e{expert}", rows_input(j)
        gate_up, down = weight_names(expert)
        ops += [Op("Gather", (HIDDEN_INPUT, rows), (f"{p}_x",), (("axis", 0),)),
                Op("MatMul", (f"{p}_x", gate_up), (f"{p}_gu",)),
                Op("Slice", (f"{p}_gu", "c_zero", "c_inter", "c_axis1"), (f"{p}_g",)),
                Op("Slice", (f"{p}_gu", "c_inter", "c_two_inter", "c_axis1"), (f"{p}_u",)),
                Op("Sigmoid", (f"{p}_g",), (f"{p}_sg",)),
                Op("Mul", (f"{p}_g", f"{p}_sg"), (f"{p}_act",)),
                Op("Mul", (f"{p}_act", f"{p}_u"), (f"{p}_h",)),
                Op("MatMul", (f"{p}_h", down), (f"{p}_y",))]
        outs.append(f"{p}_y")
    ops.append(Op("Identity", tuple(outs), (OUTPUT,)) if len(outs) == 1
               else Op("Concat", tuple(outs), (OUTPUT,), (("axis", 0),)))
    return ops


def initializers(expert_ids: Sequence[int], hidden: int, inter: int) -> dict[str, tuple[int, tuple[int, ...]]]:
    """name -> (data type, dims) of every initializer: the four int64 constants, then per expert the
    transposed gate_up [H, 2I] and down [I, H] (float32)."""
    specs = {name: (INT64, (1,)) for name in CONSTANTS}
    for expert in expert_ids:
        gate_up, down = weight_names(expert)
        specs[gate_up] = (FLOAT, (hidden, 2 * inter))
        specs[down] = (FLOAT, (inter, hidden))
    return specs


def constant_values(inter: int) -> dict[str, int]:
    return {"c_zero": 0, "c_inter": inter, "c_two_inter": 2 * inter, "c_axis1": 1}
