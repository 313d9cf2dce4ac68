"""int8 / int4 expert functions: ONNX Runtime's own packing, the kernels' accuracy on this CPU, the ABI accepting
exactly the quantized graphs (and refusing the variants the split never writes), a split that names its precision
everywhere, and real nodes serving and describing them."""

from __future__ import annotations

import hashlib

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from faasmoe.proto import faasmoe_pb2 as pb
from faasmoe.proto import frames
from faasmoe.proto import function_abi as abi
from faasmoe.proto.errors import ConfigError, InvalidRequest
from faasmoe.proto.onnx_check import check_function
from faasmoe.router.store.manifest import load_manifest
from faasmoe.router.store.onnx_function import build_function
from faasmoe.router.store.quantize import dequantize_matrix, parse_precision, quantize_matrix
from faasmoe.router.store.split import split_checkpoint
from faasmoe.router.store.tiny_model import make_checkpoint
from node_fixtures import chunks_of, fn_status, frame, make_function, run_reference, running_node

INT8 = abi.Precision("int8", 128)
INT4_32 = abi.Precision("int4", 32)
INT4_128 = abi.Precision("int4", 128)
PRECISIONS = [INT8, INT4_32, INT4_128, abi.Precision("int8", 16), abi.Precision("int4", 64)]


def _session(data: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _weights(seed: int, n: int, hidden: int, inter: int):
    rng = np.random.default_rng(seed)
    return ([rng.standard_normal((2 * inter, hidden), dtype=np.float32) * 0.05 for _ in range(n)],
            [rng.standard_normal((hidden, inter), dtype=np.float32) * 0.05 for _ in range(n)])


def _feeds(x: np.ndarray, n_experts: int) -> dict:
    rows = np.arange(len(x), dtype=np.int64)
    return {abi.HIDDEN_INPUT: x, **{abi.rows_input(j): rows[j:] for j in range(n_experts)}}


@pytest.mark.parametrize("precision", [INT8, INT4_32, INT4_128, abi.Precision("int4", 16)], ids=lambda p: p.label)
def test_packing_is_onnxruntime_quantizers(precision):
    """The split's blocks and scales are byte for byte what ORT's MatMulNBitsQuantizer writes (K = 80 and 48 are
    not multiples of the block: its padding too), and both graphs compute bitwise the same."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    hidden, inter, experts = 80, 48, (5, 9)
    gate_up, down = _weights(1, 2, hidden, inter)
    ours = onnx.load_from_string(build_function(2, experts, gate_up, down, precision=precision))
    quantizer = MatMulNBitsQuantizer(onnx.load_from_string(build_function(2, experts, gate_up, down)),
                                     bits=precision.bits, block_size=precision.block_size,
                                     is_symmetric=precision.symmetric, accuracy_level=abi.ACCURACY_LEVEL)
    quantizer.process()
    theirs = {t.name: numpy_helper.to_array(t) for t in quantizer.model.model.graph.initializer}
    mine = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
    for expert in experts:
        for weight in abi.weight_names(expert):
            packed, scales, *zero_points = abi.quant_names(weight, precision)
            np.testing.assert_array_equal(mine[packed], theirs[f"{weight}_Q{precision.bits}"])
            np.testing.assert_array_equal(mine[scales], theirs[f"{weight}_scales"].reshape(mine[scales].shape))
            assert bool(zero_points) == (f"{weight}_zero_points" in theirs) == (precision.bits == 8)
            if zero_points:
                np.testing.assert_array_equal(mine[zero_points[0]], theirs[f"{weight}_zero_points"])
    nbits = [n for n in quantizer.model.model.graph.node if n.op_type == "MatMulNBits"]
    assert {(a.name, a.i) for a in nbits[0].attribute} == set(abi.graph_ops(experts, hidden, inter, precision)[1].attrs)
    x = np.random.default_rng(2).standard_normal((7, hidden)).astype(np.float32)
    np.testing.assert_array_equal(_session(ours.SerializeToString()).run(None, _feeds(x, 2))[0],
                                  _session(quantizer.model.model.SerializeToString()).run(None, _feeds(x, 2))[0])


@pytest.mark.parametrize("precision", PRECISIONS, ids=lambda p: p.label)
def test_kernels_compute_what_the_blocks_hold(precision):
    """Guard against a kernel that miscomputes on this CPU (an ORT issue reports ~46 % error for asymmetric int4 with
    int8 activations on AVX2-only CPUs): the function's output against numpy on the dequantized weights. What is
    left is the int8 quantization of the activations (accuracy level 4), about 1 %."""
    hidden, inter = 256, 160
    gate_up, down = _weights(3, 2, hidden, inter)
    data = build_function(0, (0, 1), gate_up, down, precision=precision)
    x = np.random.default_rng(4).standard_normal((33, hidden)).astype(np.float32)
    out = _session(data).run(None, _feeds(x, 2))[0]

    def dq(w):           # the weight as the blocks hold it, in the [out, in] orientation of the checkpoint
        packed, scales, *zero_points = quantize_matrix(w.T, precision)
        return dequantize_matrix(packed, scales, w.shape[1], precision, *zero_points).T

    ref = np.concatenate([run_reference(dq(gate_up[j]), dq(down[j]), x[j:]) for j in range(2)])
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.03
    exact = np.concatenate([run_reference(gate_up[j], down[j], x[j:]) for j in range(2)])
    weight_error = np.linalg.norm(ref - exact) / np.linalg.norm(exact)
    assert weight_error < (0.02 if precision.bits == 8 else 0.2)     # round-to-nearest of N(0, 0.05) weights


def test_dequantize_inverts_quantize_within_a_step():
    """Round to nearest (symmetric int4: except the block's largest magnitude of the sign the grid -8..7 lacks)."""
    w = np.random.default_rng(5).standard_normal((200, 24)).astype(np.float32)
    for precision in (INT8, INT4_32):
        packed, scales, *zero_points = quantize_matrix(w, precision)
        back = dequantize_matrix(packed, scales, 200, precision, *zero_points)
        step = np.repeat(np.abs(scales).T, precision.block_size, axis=0)[:200]
        assert back.shape == w.shape and np.all(np.abs(back - w) <= step + 1e-6)
        assert np.mean(np.abs(back - w) <= step / 2 + 1e-6) > 0.99


# ---- the ABI ---------------------------------------------------------------------------------------------------
def _quantized(precision=INT4_128, **kw):
    return make_function(seed=6, n_experts=2, hidden=64, inter=96, precision=precision, **kw)


def _mutate(data: bytes, change) -> bytes:
    model = onnx.load_from_string(data)
    change(model)
    return model.SerializeToString()


def _with_zero_points(model):          # asymmetric: the variant the split never writes
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    n_rows = next(a.i for a in node.attribute if a.name == "N")
    model.graph.initializer.append(numpy_helper.from_array(np.full((n_rows, 1), 0x88, np.uint8), "zp"))
    node.input.append("zp")


def _attribute(name, value):
    def change(model):
        node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
        next(a for a in node.attribute if a.name == name).i = value
    return change


def _metadata(key, value):
    def change(model):
        entry = next((p for p in model.metadata_props if p.key == key), None) or model.metadata_props.add(key=key)
        entry.value = value
    return change


def _drop_ms_opset(model):
    kept = [o for o in model.opset_import if o.domain != abi.MS_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def _fp32_matmul(model):
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    node.op_type, node.domain = "MatMul", ""


def _drop_zero_points(model):           # int8 without its zero points: the symmetric variant the split never writes
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            del node.input[3]
    kept = [t for t in model.graph.initializer if not t.name.endswith("_zero_points")]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


REFUSED = {
    "asymmetric int4 (zero points)": (_with_zero_points, "not the ABI's"),
    "accuracy level 1": (_attribute("accuracy_level", 1), "not the ABI's"),
    "8 bits under an int4 label": (_attribute("bits", 8), "not the ABI's"),
    "block size the blocks do not have": (_metadata(abi.META_BLOCK_SIZE, "64"), "not the ABI's for int4-b64"),
    "block size MatMulNBits does not take": (_metadata(abi.META_BLOCK_SIZE, "48"), "block size 48"),
    "unknown precision": (_metadata(abi.META_PRECISION, "int3"), "int3"),
    "fp32 named as a precision": (_metadata(abi.META_PRECISION, "fp32"), "fp32 functions have no block size"),
    "no com.microsoft import": (_drop_ms_opset, "opset imports"),
    "float MatMul over packed blocks": (_fp32_matmul, "domain"),
}


@pytest.mark.parametrize("change,reason", REFUSED.values(), ids=REFUSED.keys())
def test_checker_refuses_quantized_variants(tmp_path, change, reason):
    path = tmp_path / "f.onnx"
    path.write_bytes(_mutate(_quantized().data, change))
    with pytest.raises(InvalidRequest, match=reason):
        check_function(path)


def test_checker_refuses_symmetric_int8(tmp_path):
    path = tmp_path / "f.onnx"
    path.write_bytes(_mutate(_quantized(INT8).data, _drop_zero_points))
    with pytest.raises(InvalidRequest, match="not the ABI's"):
        check_function(path)


def test_fp32_file_with_quantization_metadata_is_refused(tmp_path):
    path = tmp_path / "f.onnx"
    path.write_bytes(_mutate(make_function(seed=6).data, _metadata(abi.META_PRECISION, "int8")))
    with pytest.raises(InvalidRequest):
        check_function(path)


@pytest.mark.parametrize("precision", [abi.FP32, INT8, INT4_32, INT4_128], ids=lambda p: p.label)
def test_checker_accepts_each_precision_and_reports_it(tmp_path, precision):
    fn = _quantized(precision)
    path = tmp_path / "f.onnx"
    path.write_bytes(fn.data)
    spec = check_function(path)
    assert spec.precision == precision and (spec.hidden_size, spec.intermediate_size) == (64, 96)


@pytest.mark.parametrize("args,message", [
    (("int3", None), "choose one of fp32, int8, int4"), (("int4", 48), "--block-size 48"),
    (("fp32", 32), "int8 or int4 only")])
def test_precision_flags_are_checked(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_precision(*args)


# ---- the split -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), num_layers=2, hidden_size=128, num_experts=8,
                           moe_intermediate_size=128, seed=7)


@pytest.mark.parametrize("precision", [INT8, INT4_32], ids=lambda p: p.label)
def test_split_names_its_precision_and_every_function_passes_validation(checkpoint, tmp_path, precision):
    fp32 = split_checkpoint(checkpoint, tmp_path / "fp32", group_size=4, progress=False)
    quant = split_checkpoint(checkpoint, tmp_path / "q", group_size=4, progress=False, precision=precision)
    manifest = load_manifest(tmp_path / "q")
    assert manifest == quant and manifest.precision == precision
    assert not {f.function_id for f in fp32.functions} & {f.function_id for f in quant.functions}
    assert quant.model_id != fp32.model_id
    for entry in quant.functions:
        spec = check_function(tmp_path / "q" / entry.file)
        assert spec.precision == precision and (entry.precision, entry.block_size) == (precision.name,
                                                                                        precision.block_size)
        assert entry.function_id == hashlib.sha256((tmp_path / "q" / entry.file).read_bytes()).hexdigest()
        assert entry.footprint_bytes == abi.function_resident_bytes(entry.bytes, len(entry.expert_ids), 128, 128,
                                                                   precision)
    assert quant.function_bytes < fp32.function_bytes / (3 if precision.bits == 8 else 4)


# ---- a real node ------------------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_node_serves_and_describes_a_quantized_function(tmp_path):
    fn = _quantized(INT4_128)
    async with running_node(tmp_path) as (node, stub):
        reply = await stub.deploy(chunks_of(fn, chunk_bytes=4096))
        assert not reply.already_present
        status = await stub.status(pb.StatusRequest())
        entry = fn_status(status, fn.function_id)
        assert (entry.precision, entry.block_size) == ("int4", 128)
        assert entry.footprint_bytes == node.runtime.deployed[fn.function_id].info.footprint_bytes > len(fn.data)
        assert status.deployed_bytes == entry.footprint_bytes
        hidden = np.random.default_rng(8).standard_normal((5, 64)).astype(np.float32)
        _, outputs = frames.decode_reply(await stub.invoke(frame(hidden, [fn.call([0, 1, 2, 3, 4], [3, 2])])))
        ref = fn.reference(hidden, [0, 1, 2, 3, 4], [3, 2])
        assert outputs[0].shape == ref.shape
        assert np.linalg.norm(outputs[0] - ref) / np.linalg.norm(ref) < 0.3     # int4 of random weights


@pytest.mark.asyncio
async def test_tampered_quantized_function_is_refused(tmp_path):
    fn = _quantized(INT8)
    flipped = bytearray(fn.data)
    flipped[len(flipped) // 2] ^= 0xFF                        # inside the packed blocks: sha256 no longer matches
    relabelled = _mutate(fn.data, _attribute("accuracy_level", 1))     # a valid sha256 of a graph the ABI refuses
    async with running_node(tmp_path) as (node, stub):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.deploy(chunks_of(fn, data=bytes(flipped)))
        assert err.value.code() == grpc.StatusCode.DATA_LOSS
        digest = hashlib.sha256(relabelled).hexdigest()
        header = fn.header(function_id=digest, size_bytes=len(relabelled))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.deploy(chunks_of(fn, data=relabelled, header=header))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not the ABI's" in err.value.details()
        assert not node.runtime.deployed and not node.store.has(digest)
