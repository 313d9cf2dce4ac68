"""Functions are validated at deploy against the function ABI: external data, foreign operators, memory bombs
and anything the splitter does not emit are refused with INVALID_ARGUMENT and leave nothing behind."""

from __future__ import annotations

import hashlib

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from faasmoe.proto import faasmoe_pb2 as pb
from faasmoe.proto import function_abi as abi
from faasmoe.proto.errors import InvalidRequest
from faasmoe.proto.onnx_check import check_function
from node_fixtures import MIB, chunks_of, make_function, running_node

BASE = make_function(seed=3, n_experts=2, hidden=64, inter=128)


def mutate(change) -> bytes:
    model = onnx.load_from_string(BASE.data)
    change(model)
    return model.SerializeToString()


def external(model):
    t = model.graph.initializer[4]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=f"../{'ab' * 32}/function.onnx")


def bomb(model):
    """ConstantOfShape + Expand: a few bytes of graph that allocate gigabytes."""
    shape = numpy_helper.from_array(np.array([1 << 15, 1 << 15], np.int64), "bomb_shape")
    model.graph.initializer.append(shape)
    model.graph.node.insert(0, helper.make_node("ConstantOfShape", ["bomb_shape"], ["bomb"]))
    model.graph.node.insert(1, helper.make_node("Expand", ["bomb", "bomb_shape"], ["bomb2"]))


def wide(model):
    """Only ABI operators, but a gate_up 64 x wider than the metadata's intermediate size says."""
    name = abi.weight_names(BASE.expert_ids[0])[0]
    t = next(t for t in model.graph.initializer if t.name == name)
    t.CopyFrom(numpy_helper.from_array(np.zeros((64, 2 * 128 * 64), np.float32), name))


def local_function(model):
    model.functions.append(helper.make_function("evil", "f", ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])],
                                                [helper.make_opsetid("", 17)]))


def subgraph(model):
    branch = helper.make_graph([helper.make_node("Identity", ["hidden"], ["z"])], "g", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    model.graph.node[-1].attribute.append(helper.make_attribute("then_branch", branch))


def custom_domain(model):
    model.graph.node[0].domain = "com.microsoft"


def const_value(model):
    t = next(t for t in model.graph.initializer if t.name == "c_inter")
    t.CopyFrom(numpy_helper.from_array(np.array([1 << 40], np.int64), "c_inter"))


def value_info(model):
    model.graph.value_info.append(helper.make_tensor_value_info("e30_x", TensorProto.FLOAT, [None, 64]))


def huge_metadata(model):
    for p in model.metadata_props:
        if p.key == abi.META_HIDDEN:
            p.value = str(1 << 30)


def float_data(model):
    t = model.graph.initializer[4]
    arr = numpy_helper.to_array(t)
    t.ClearField("raw_data")
    t.float_data.extend(arr.ravel().tolist())


CASES = {
    "external data": (external, "external data"),
    "memory bomb (ConstantOfShape/Expand)": (bomb, "not part of the function ABI"),
    "shapes wider than declared": (wide, "initializers differ"),
    "local functions": (local_function, "field 25"),
    "subgraph attribute": (subgraph, "an attribute has field 6"),
    "custom operator domain": (custom_domain, "domain"),
    "slice constants": (const_value, "constant c_inter"),
    "value_info": (value_info, "field 13"),
    "hidden size out of range": (huge_metadata, "out of range"),
    "typed data instead of raw": (float_data, "field 4"),
    "not protobuf": (lambda m: None, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_checker_refuses(case, tmp_path):
    change, reason = CASES[case]
    data = mutate(change) if case != "not protobuf" else b"\xff" * 100 + BASE.data[:50]
    path = tmp_path / "f.onnx"
    path.write_bytes(data)
    with pytest.raises(InvalidRequest) as info:
        check_function(path)
    assert reason is None or reason in str(info.value), str(info.value)


def test_checker_accepts_what_the_splitter_emits(tmp_path):
    for g in (1, 2, 5):
        fn = make_function(seed=g, n_experts=g, hidden=32, inter=48)
        (tmp_path / "f.onnx").write_bytes(fn.data)
        spec = check_function(tmp_path / "f.onnx")
        assert (spec.expert_ids, spec.hidden_size, spec.intermediate_size) == (tuple(fn.expert_ids), 32, 48)


def header_for(data: bytes) -> pb.FunctionHeader:
    return pb.FunctionHeader(function_id=hashlib.sha256(data).hexdigest(), size_bytes=len(data), owner="t")


@pytest.mark.asyncio
async def test_deploy_refuses_and_keeps_nothing(tmp_path):
    async with running_node(tmp_path) as (node, stub):
        for case in ("external data", "memory bomb (ConstantOfShape/Expand)", "shapes wider than declared"):
            data = mutate(CASES[case][0])
            header = header_for(data)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.deploy(chunks_of(BASE, data=data, header=header))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "refused" in info.value.details()
            assert not node.store.has(header.function_id) and not (node.store.root / header.function_id).exists()
        status = await stub.status(pb.StatusRequest())
        assert status.deployed_bytes == 0 and status.disk_used_bytes == 0
        assert status.max_message_bytes == node.config.max_message_bytes and status.max_concurrent_rpcs > 0

        too_big = pb.FunctionHeader(function_id="ab" * 32, size_bytes=abi.MAX_FUNCTION_BYTES + 1, owner="t")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.deploy(iter([pb.DeployChunk(header=too_big, data=b"x")]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        reply = await stub.deploy(chunks_of(BASE))            # the real one still deploys
        assert reply.deployed_bytes > 0


def test_pinned_onnxruntime_refuses_external_data_outside_the_model_folder(tmp_path):
    """Defence in depth behind our own check: the pinned ONNX Runtime also refuses a path that escapes."""
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "weights.bin").write_bytes(np.zeros(64 * 256, np.float32).tobytes())
    (tmp_path / "model").mkdir()
    path = tmp_path / "model" / "function.onnx"
    path.write_bytes(mutate(lambda m: (external(m), m.graph.initializer[4].external_data[0].__setattr__(
        "value", "../secret/weights.bin"))))
    with pytest.raises(Exception, match="(?i)external data|escapes|outside"):
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.asyncio
async def test_a_load_that_breaks_its_estimate_is_unloaded_then_refused(tmp_path):
    big = make_function(seed=9, n_experts=2, hidden=512, inter=4096)           # ~50 MiB
    small = make_function(seed=8)
    async with running_node(tmp_path, memory_budget_bytes=512 * MIB, load_rss_factor=0.05) as (node, stub):
        await stub.deploy(chunks_of(small))     # the first load also initialises ORT and gets a wider slack:
        await stub.load(pb.LoadRequest(function_ids=[small.function_id], wait=True))   # spend it here
        await stub.deploy(chunks_of(big))
        for attempt in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.load(pb.LoadRequest(function_ids=[big.function_id], wait=True))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
            assert "grew the node's RSS" in info.value.details()
        assert "refused from now on" in info.value.details()
        status = await stub.status(pb.StatusRequest())
        assert 0 < status.loaded_bytes < len(big.data) / 4          # the small one only
