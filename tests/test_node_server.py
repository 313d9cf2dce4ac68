"""The node's gRPC API on a real in-process grpc.aio server (127.0.0.1, port 0) with real ONNX Runtime."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from faasmoe.proto import faasmoe_pb2 as pb
from faasmoe.proto import frames
from node_fixtures import MIB, chunks_of, fn_status, frame, make_function, running_node, cost

pytestmark = pytest.mark.asyncio


async def expect_error(awaitable, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details(), info.value.details()
    return info.value.details()


async def test_deploy_invoke_matches_reference(tmp_path):
    f3, f1 = make_function(seed=1, n_experts=3, hidden=64, inter=96), make_function(seed=2, n_experts=1, hidden=64)
    rng = np.random.default_rng(0)
    async with running_node(tmp_path) as (node, stub):
        reply = await stub.deploy(chunks_of(f3, chunk_bytes=4096))
        assert not reply.already_present and reply.deployed_bytes == cost(f3)
        assert (await stub.deploy(chunks_of(f1))).deployed_bytes == cost(f3) + cost(f1)
        hidden = rng.standard_normal((10, 64), dtype=np.float32)
        calls = [f3.call([3, 1, 4, 1, 5, 9, 2], [2, 0, 5]), f1.call([0, 9], [2])]   # empty expert, repeated row
        head, outs = frames.decode_reply(await stub.invoke(frame(hidden, calls, "req-1")))
        assert head.request_id == "req-1" and head.node_id == "test-node" and head.node_s > 0
        assert [r.cold_start for r in head.results] == [True, True] and head.results[0].load_s > 0
        for call, out in zip(calls, outs):
            fn = f3 if call.function_id == f3.function_id else f1
            np.testing.assert_allclose(out, fn.reference(hidden, call.rows, call.expert_row_counts), atol=1e-4)
        head, outs2 = frames.decode_reply(await stub.invoke(frame(hidden, calls)))
        assert [r.cold_start for r in head.results] == [False, False]
        np.testing.assert_array_equal(outs[0], outs2[0])

        half = hidden.astype(np.float16)                # float16 on the wire: answered in float16
        head, (out,) = frames.decode_reply(await stub.invoke(frame(half, [f1.call([1, 2], [2])])))
        assert out.dtype == np.float16
        np.testing.assert_allclose(out, f1.reference(half, [1, 2], [2]), atol=2e-3)

        status = await stub.status(pb.StatusRequest())
        st = fn_status(status, f3.function_id)
        assert st.loaded and st.invocations == 2 and st.resident_bytes > len(f3.data) and st.in_flight == 0
        assert list(st.expert_ids) == f3.expert_ids and st.model_id == "test"
        assert status.deployed_bytes == cost(f3) + cost(f1) and status.loaded_bytes >= status.deployed_bytes
        assert status.capacity_bytes == 256 * MIB and status.keep_alive_s == 30 and status.rss_bytes > 0


async def test_already_present_is_not_read_again(tmp_path):
    fn = make_function(seed=4)
    async with running_node(tmp_path) as (node, stub):
        await stub.deploy(chunks_of(fn))
        assert (await stub.deploy(chunks_of(fn, data=b"garbage" * 10))).already_present   # deployed: data ignored
        assert (await stub.undeploy(pb.UndeployRequest(function_id=fn.function_id))).was_deployed
        assert (await stub.status(pb.StatusRequest())).deployed_bytes == 0
        # still in the disk cache: a header-only deploy is enough
        reply = await stub.deploy(iter([pb.DeployChunk(header=fn.header())]))
        assert reply.already_present and reply.deployed_bytes == cost(fn)


async def test_invalid_requests(tmp_path):
    fn = make_function(seed=5, n_experts=2, hidden=64)
    hidden = np.ones((4, 64), np.float32)
    async with running_node(tmp_path) as (node, stub):
        await stub.deploy(chunks_of(fn))
        unknown = "ab" * 32
        await expect_error(stub.invoke(frame(hidden, [frames.Call(unknown, np.array([0], np.int32), [1])])),
                           grpc.StatusCode.NOT_FOUND, unknown, "test-node")
        bad = {
            "dtype": frame(np.ones((4, 64), np.int64), [fn.call([0], [1, 0])]),
            "shape": frame(np.ones(64, np.float32), [fn.call([0], [1, 0])]),
            "width": frame(np.ones((4, 32), np.float32), [fn.call([0], [1, 0])]),
            "length": frame(hidden, [fn.call([0], [1, 0])])[:-4],
            "experts": frame(hidden, [fn.call([0, 1], [2])]),
            "counts": frame(hidden, [fn.call([0, 1], [1, 2])]),
            "row range": frame(hidden, [fn.call([0, 4], [1, 1])]),
            "garbage": b"\xff\xff\xff\xff",
            "rows dtype": _crafted(hidden, fn.function_id, np.array([0], np.int64), np.array([1, 0], np.int32)),
            "counts dtype": _crafted(hidden, fn.function_id, np.array([0], np.int32), np.array([1, 0], np.int64)),
            "row_count": _crafted(hidden, fn.function_id, np.array([0], np.int32), np.array([1, 0], np.int32),
                                  row_count=2),
            "expert_count": _crafted(hidden, fn.function_id, np.array([0], np.int32), np.array([1, 0], np.int32),
                                     expert_count=1),
            "negative count": _crafted(hidden, fn.function_id, np.array([0], np.int32), np.array([2, -1], np.int32)),
            "negative row": _crafted(hidden, fn.function_id, np.array([-1], np.int32), np.array([1, 0], np.int32)),
        }
        for what, data in bad.items():
            details = await expect_error(stub.invoke(data), grpc.StatusCode.INVALID_ARGUMENT)
            assert details, what
        await expect_error(stub.invoke(bad["experts"]), grpc.StatusCode.INVALID_ARGUMENT, "2 experts")
        await expect_error(stub.invoke(bad["width"]), grpc.StatusCode.INVALID_ARGUMENT, "hidden")
        # one bad call fails the whole request before anything runs
        mixed = frame(hidden, [fn.call([0], [1, 0]), frames.Call(unknown, np.array([0], np.int32), [1])])
        await expect_error(stub.invoke(mixed), grpc.StatusCode.NOT_FOUND)
        assert fn_status(await stub.status(pb.StatusRequest()), fn.function_id).invocations == 0


def _crafted(hidden, function_id, rows, counts, row_count=None, expert_count=None) -> bytes:
    """A frame whose header says what the test wants, whatever the payloads hold."""
    header = pb.InvokeRequest(request_id="x", layer=0, hidden=frames.spec_of(hidden),
                              rows=pb.TensorSpec(dtype=rows.dtype.name, shape=rows.shape),
                              counts=pb.TensorSpec(dtype=counts.dtype.name, shape=counts.shape))
    header.calls.add(function_id=function_id, row_count=len(rows) if row_count is None else row_count,
                     expert_count=len(counts) if expert_count is None else expert_count)
    return frames.encode(header, [hidden, rows, counts])


async def test_deploy_leases_per_owner(tmp_path):
    """Routers that share content never remove each other's copy: one copy, one lease per owner."""
    fn = make_function(seed=13, hidden=64)
    async with running_node(tmp_path) as (node, stub):
        assert not (await stub.deploy(chunks_of(fn, header=fn.header(owner="router-a")))).already_present
        assert (await stub.deploy(chunks_of(fn, header=fn.header(owner="router-b")))).already_present
        status = await stub.status(pb.StatusRequest())
        assert fn_status(status, fn.function_id).owners == ["router-a", "router-b"]
        assert status.deployed_bytes == cost(fn)                          # one copy
        reply = await stub.undeploy(pb.UndeployRequest(function_id=fn.function_id, owner="router-c"))
        assert not reply.was_deployed and not reply.released              # not a lease of router-c
        reply = await stub.undeploy(pb.UndeployRequest(function_id=fn.function_id, owner="router-a"))
        assert reply.was_deployed and not reply.released
        out = await stub.invoke(frame(np.ones((2, 64), np.float32), [fn.call([0, 1], [1, 1])]))
        assert not frames.decode_reply(out)[0].HasField("error")          # router-b's copy still serves
        assert fn_status(await stub.status(pb.StatusRequest()), fn.function_id).owners == ["router-b"]
        reply = await stub.undeploy(pb.UndeployRequest(function_id=fn.function_id, owner="router-b"))
        assert reply.was_deployed and reply.released and reply.deployed_bytes == 0
        await expect_error(stub.invoke(frame(np.ones((1, 64), np.float32), [fn.call([0], [1, 0])])),
                           grpc.StatusCode.NOT_FOUND)


async def test_deploy_errors(tmp_path):
    fn = make_function(seed=6, hidden=256, inter=512)     # ~3 MiB file
    other = make_function(seed=7, hidden=256, inter=512)
    async with running_node(tmp_path, memory_budget_bytes=5 * MIB) as (node, stub):
        corrupt = fn.data[:100] + bytes([fn.data[100] ^ 1]) + fn.data[101:]
        await expect_error(stub.deploy(chunks_of(fn, data=corrupt)), grpc.StatusCode.DATA_LOSS, "sha256")
        await expect_error(stub.deploy(chunks_of(fn, data=fn.data[:-1])), grpc.StatusCode.DATA_LOSS)
        await stub.deploy(chunks_of(fn))
        details = await expect_error(stub.deploy(chunks_of(other)), grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     "test-node", "would exceed its capacity", other.function_id, "--memory-budget-mb")
        assert not details.startswith("backpressure")
        await expect_error(stub.deploy(iter([pb.DeployChunk(data=b"x")])), grpc.StatusCode.INVALID_ARGUMENT, "header")
        await expect_error(stub.deploy(chunks_of(other, header=other.header(function_id="nothex"))),
                           grpc.StatusCode.INVALID_ARGUMENT)
        status = await stub.status(pb.StatusRequest())
        assert status.deployed_bytes == cost(fn) and status.disk_used_bytes == len(fn.data)
        assert not list((tmp_path / "store").glob("*.part"))
    async with running_node(tmp_path / "small", memory_budget_bytes=3 * MIB) as (node, stub):
        await expect_error(stub.deploy(chunks_of(fn)), grpc.StatusCode.RESOURCE_EXHAUSTED, "whole memory budget")
    async with running_node(tmp_path / "over", memory_budget_bytes=5 * MIB, overcommit=2.0) as (node, stub):
        await stub.deploy(chunks_of(fn))
        assert (await stub.deploy(chunks_of(other))).deployed_bytes == cost(fn) + cost(other)


async def test_load_undeploy_and_health(tmp_path):
    fn = make_function(seed=8)
    async with running_node(tmp_path) as (node, stub):
        await stub.deploy(chunks_of(fn))
        reply = await stub.load(pb.LoadRequest(function_ids=[fn.function_id, "cd" * 32], wait=True))
        assert list(reply.loaded) == [fn.function_id] and list(reply.missing) == ["cd" * 32]
        head, _ = frames.decode_reply(await stub.invoke(frame(np.ones((1, 64), np.float32), [fn.call([0], [1, 0])])))
        assert not head.results[0].cold_start
        assert node.runtime.function(fn.function_id).stats.cold_starts == 0
        async with grpc.aio.insecure_channel(node.address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            for service in ("", "faasmoe.v1.ExpertNode"):
                assert (await check(health_pb2.HealthCheckRequest(service=service))).status == \
                    health_pb2.HealthCheckResponse.SERVING
        assert (await stub.undeploy(pb.UndeployRequest(function_id=fn.function_id))).was_deployed
        assert not (await stub.undeploy(pb.UndeployRequest(function_id=fn.function_id))).was_deployed
        status = await stub.status(pb.StatusRequest())
        assert not status.functions and status.loaded_bytes == 0 and status.disk_used_bytes == len(fn.data)
        await expect_error(stub.invoke(frame(np.ones((1, 64), np.float32), [fn.call([0], [1, 0])])),
                           grpc.StatusCode.NOT_FOUND)


async def test_invoke_stream_answers_in_order_and_survives_failed_requests(tmp_path):
    """The router's hot path: one reply per frame, in order; a bad request gets an in-band error reply."""
    fn = make_function(seed=11, n_experts=2, hidden=64)
    rng = np.random.default_rng(3)
    hidden = rng.standard_normal((5, 64), dtype=np.float32)
    unknown = "cd" * 32
    async with running_node(tmp_path) as (node, stub):
        await stub.deploy(chunks_of(fn))
        call = stub.invoke_stream()
        good = fn.call([4, 0, 2], [1, 2])
        requests = [frame(hidden, [good], "a"),
                    frame(hidden, [frames.Call(unknown, np.array([0], np.int32), [1])], "b"),
                    frame(np.ones((5, 64), np.int64), [good], "c"),      # wrong dtype
                    b"\x01\x00",                                          # not a frame at all
                    frame(hidden, [good], "d")]
        replies = []
        for request in requests:
            await call.write(request)
            replies.append(frames.decode_reply(await call.read()))
        (a, (out_a,)), (b, _), (c, _), (junk, _), (d, (out_d,)) = replies
        assert [a.request_id, b.request_id, c.request_id, d.request_id] == ["a", "b", "c", "d"]
        assert not a.HasField("error") and not d.HasField("error")
        np.testing.assert_allclose(out_a, fn.reference(hidden, good.rows, good.expert_row_counts), atol=1e-4)
        np.testing.assert_array_equal(out_a, out_d)
        assert b.error.code == grpc.StatusCode.NOT_FOUND.value[0] and unknown in b.error.details
        assert c.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "dtype" in c.error.details
        assert junk.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and junk.request_id == ""
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF and await call.code() == grpc.StatusCode.OK


async def test_node_stop_ends_idle_invoke_streams_at_once(tmp_path):
    """A graceful stop does not wait out its grace period on a router's open, idle stream."""
    import time
    fn = make_function(seed=12, n_experts=1, hidden=64)
    async with running_node(tmp_path) as (node, stub):
        await stub.deploy(chunks_of(fn))
        call = stub.invoke_stream()
        await call.write(frame(np.ones((1, 64), np.float32), [fn.call([0], [1])]))
        assert not frames.decode_reply(await call.read())[0].HasField("error")
        t0 = time.monotonic()
        await node.stop(grace_s=10.0)
        assert time.monotonic() - t0 < 3.0
        assert await call.read() is grpc.aio.EOF and await call.code() == grpc.StatusCode.OK
