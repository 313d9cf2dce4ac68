"""Build one expert function (G routed experts of one layer) as an ONNX model.

Pure numpy + onnx (no torch): see :mod:`faasmoe.proto.function_abi` for the contract.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from faasmoe.proto import function_abi as abi
from faasmoe.proto.errors import CheckpointError
from faasmoe.router.store.quantize import quantize_matrix

PROTOBUF_LIMIT_BYTES = 2**31 - 1
OPSET = abi.OPSET


def build_function(layer: int, expert_ids: Sequence[int], gate_up: Sequence[np.ndarray],
                   down: Sequence[np.ndarray], model_id: str = "", precision: abi.Precision = abi.FP32) -> bytes:
    """Serialized ONNX for experts ``expert_ids`` of ``layer``.

    ``gate_up[j]``: [2I, H] (gate rows first, then up rows, as transformers' fused ``gate_up_proj``);
    ``down[j]``: [H, I]. fp32: weights stored transposed as float32, so each projection is one MatMul;
    int8 / int4: each transposed weight is quantized (:mod:`faasmoe.router.store.quantize`) for MatMulNBits.
    """
    if not (len(expert_ids) == len(gate_up) == len(down)) or not expert_ids:
        raise CheckpointError(f"layer {layer}: need one gate_up and one down matrix per expert")
    two_i, hidden = gate_up[0].shape
    inter = two_i // 2
    inits, inputs = [], [helper.make_tensor_value_info(abi.HIDDEN_INPUT, TensorProto.FLOAT, ["n", hidden])]
    inits += [numpy_helper.from_array(np.array([value], np.int64), name)
              for name, value in abi.constant_values(inter).items()]
    for j, expert in enumerate(expert_ids):
        if gate_up[j].shape != (two_i, hidden) or down[j].shape != (hidden, inter):
            raise CheckpointError(f"layer {layer} expert {expert}: shapes {gate_up[j].shape} / {down[j].shape} "
                                  f"do not match [{two_i}, {hidden}] / [{hidden}, {inter}]")
        inputs.append(helper.make_tensor_value_info(abi.rows_input(j), TensorProto.INT64, [f"n{j}"]))
        for name, weight in zip(abi.weight_names(expert), (gate_up[j], down[j])):
            inits += _weight_tensors(name, weight.T, precision)
    nodes = [helper.make_node(op.op_type, list(op.inputs), list(op.outputs), domain=op.domain or None,
                              **dict(op.attrs))
             for op in abi.graph_ops(expert_ids, hidden, inter, precision)]
    graph = helper.make_graph(nodes, f"faasmoe_L{layer}", inputs,
                              [helper.make_tensor_value_info(abi.OUTPUT, TensorProto.FLOAT, ["m", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in abi.opset_imports(precision)],
                              producer_name="faasmoe")
    model.ir_version = abi.IR_VERSION
    props = {abi.META_ABI: abi.ABI_VERSION, abi.META_LAYER: str(layer),
             abi.META_EXPERTS: ",".join(str(e) for e in expert_ids), abi.META_HIDDEN: str(hidden),
             abi.META_INTERMEDIATE: str(inter), abi.META_MODEL: model_id}
    if precision.quantized:
        props.update({abi.META_PRECISION: precision.name, abi.META_BLOCK_SIZE: str(precision.block_size)})
    helper.set_model_props(model, props)
    weight_bytes = sum(t.ByteSize() for t in inits)
    if weight_bytes >= PROTOBUF_LIMIT_BYTES:
        raise CheckpointError(f"layer {layer}: {len(expert_ids)} experts are {weight_bytes / 2**30:.2f} GiB, over "
                              "ONNX's 2 GiB file limit; use a smaller --group-size")
    return model.SerializeToString()


def _weight_tensors(name: str, b_kn: np.ndarray, precision: abi.Precision) -> list[TensorProto]:
    """The initializers of one projection's weight ``B`` [K, N]: itself (fp32), or its blocks and scales."""
    if not precision.quantized:
        return [numpy_helper.from_array(np.ascontiguousarray(b_kn, dtype=np.float32), name)]
    arrays = quantize_matrix(b_kn, precision)                 # packed, scales (and zero points for int8)
    return [numpy_helper.from_array(a, n) for a, n in zip(arrays, abi.quant_names(name, precision), strict=True)]


def matmul_model(arrays, k: int, n: int, precision: abi.Precision) -> bytes:
    """A one-node ONNX model ``y = x @ B`` over the quantized ``B`` [K, N] of :func:`quantize_matrix` (``arrays``:
    packed blocks, scales and, for int8, zero points), input ``x`` float32 [m, K], output ``y`` float32 [m, N]:
    the int8 dense part of the router runs its projections through these."""
    names = abi.quant_names("w", precision)
    attrs = dict(K=k, N=n, accuracy_level=abi.ACCURACY_LEVEL, bits=precision.bits, block_size=precision.block_size)
    node = helper.make_node("MatMulNBits", ["x", *names], ["y"], domain=abi.MS_DOMAIN, **attrs)
    graph = helper.make_graph([node], "faasmoe_dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
                              [numpy_helper.from_array(a, name) for a, name in zip(arrays, names, strict=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in abi.opset_imports(precision)],
                              producer_name="faasmoe")
    model.ir_version = abi.IR_VERSION
    return model.SerializeToString()
