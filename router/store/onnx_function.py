"""Build one expert function (G routed experts of one layer) as an ONNX model.

Pure numpy + onnx (no torch): see :mod:`faasmoe.proto.function_abi` for the contract.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from faasmoe.proto import function_abi as abi
from faasmoe.proto.errors import CheckpointError

OPSET = 17
PROTOBUF_LIMIT_BYTES = 2**31 - 1


def build_function(layer: int, expert_ids: Sequence[int], gate_up: Sequence[np.ndarray],
                   down: Sequence[np.ndarray], model_id: str = "") -> bytes:
    """Serialized ONNX for experts ``expert_ids`` of ``layer``.

    ``gate_up[j]``: [2I, H] (gate rows first, then up rows, as transformers' fused ``gate_up_proj``);
    ``down[j]``: [H, I]. Weights are stored transposed as float32 so each projection is one MatMul.
    """
    if not (len(expert_ids) == len(gate_up) == len(down)) or not expert_ids:
        raise CheckpointError(f"layer {layer}: need one gate_up and one down matrix per expert")
    two_i, hidden = gate_up[0].shape
    inter = two_i // 2
    nodes, inits, inputs = [], [], [helper.make_tensor_value_info(abi.HIDDEN_INPUT, TensorProto.FLOAT, ["n", hidden])]
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "c_zero"))
    inits.append(numpy_helper.from_array(np.array([inter], np.int64), "c_inter"))
    inits.append(numpy_helper.from_array(np.array([two_i], np.int64), "c_two_inter"))
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "c_axis1"))
    outs = []
    for j, expert in enumerate(expert_ids):
        if gate_up[j].shape != (two_i, hidden) or down[j].shape != (hidden, inter):
            raise CheckpointError(f"layer {layer} expert {expert}: shapes {gate_up[j].shape} / {down[j].shape} "
                                  f"do not match [{two_i}, {hidden}] / [{hidden}, {inter}]")
        rows, p = abi.rows_input(j), f"e{expert}"
        inputs.append(helper.make_tensor_value_info(rows, TensorProto.INT64, [f"n{j}"]))
        inits.append(numpy_helper.from_array(np.ascontiguousarray(gate_up[j].T, dtype=np.float32), f"{p}_gate_up"))
        inits.append(numpy_helper.from_array(np.ascontiguousarray(down[j].T, dtype=np.float32), f"{p}_down"))
        nodes += [
            helper.make_node("Gather", [abi.HIDDEN_INPUT, rows], [f"{p}_x"], axis=0),
            helper.make_node("MatMul", [f"{p}_x", f"{p}_gate_up"], [f"{p}_gu"]),
            helper.make_node("Slice", [f"{p}_gu", "c_zero", "c_inter", "c_axis1"], [f"{p}_g"]),
            helper.make_node("Slice", [f"{p}_gu", "c_inter", "c_two_inter", "c_axis1"], [f"{p}_u"]),
            helper.make_node("Sigmoid", [f"{p}_g"], [f"{p}_sg"]),
            helper.make_node("Mul", [f"{p}_g", f"{p}_sg"], [f"{p}_act"]),
            helper.make_node("Mul", [f"{p}_act", f"{p}_u"], [f"{p}_h"]),
            helper.make_node("MatMul", [f"{p}_h", f"{p}_down"], [f"{p}_y"]),
        ]
        outs.append(f"{p}_y")
    if len(outs) == 1:
        nodes.append(helper.make_node("Identity", outs, [abi.OUTPUT]))
    else:
        nodes.append(helper.make_node("Concat", outs, [abi.OUTPUT], axis=0))
    graph = helper.make_graph(nodes, f"faasmoe_L{layer}", inputs,
                              [helper.make_tensor_value_info(abi.OUTPUT, TensorProto.FLOAT, ["m", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="faasmoe")
    model.ir_version = 8
    helper.set_model_props(model, {
        abi.META_ABI: abi.ABI_VERSION, abi.META_LAYER: str(layer),
        abi.META_EXPERTS: ",".join(str(e) for e in expert_ids), abi.META_HIDDEN: str(hidden),
        abi.META_INTERMEDIATE: str(inter), abi.META_MODEL: model_id,
    })
    weight_bytes = sum(g.size + d.size for g, d in zip(gate_up, down)) * 4
    if weight_bytes >= PROTOBUF_LIMIT_BYTES:
        raise CheckpointError(f"layer {layer}: {len(expert_ids)} experts are {weight_bytes / 2**30:.2f} GiB, over "
                              "ONNX's 2 GiB file limit; use a smaller --group-size")
    return model.SerializeToString()


def run_reference(gate_up: np.ndarray, down: np.ndarray, x: np.ndarray) -> np.ndarray:
    """One expert in numpy, for tests: down(silu(gate(x)) * up(x))."""
    inter = gate_up.shape[0] // 2
    gu = x @ gate_up.T
    g, u = gu[:, :inter], gu[:, inter:]
    return ((g / (1 + np.exp(-g))) * u) @ down.T
