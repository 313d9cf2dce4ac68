"""Serverless behaviour on a real in-process node: keep-alive, single flight, in-flight protection, memory
pressure and backpressure. Calls are held in flight with a gated thread pool, never with sleeps."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from faasmoe.proto import errors
from faasmoe.proto import faasmoe_pb2 as pb
from faasmoe.proto import frames
from node_fixtures import MIB, GatedExecutor, chunks_of, fn_status, frame, make_function, running_node, wait_until

pytestmark = pytest.mark.asyncio
X = np.random.default_rng(1).standard_normal((4, 64), dtype=np.float32)


async def call(stub, fn, rows=(0, 1, 2), counts=(2, 1)):
    head, (out,) = frames.decode_reply(await stub.invoke(frame(X, [fn.call(rows, counts)])))
    np.testing.assert_allclose(out, fn.reference(X, rows, counts), atol=1e-4)
    return head.results[0], out


async def loaded(stub, fn) -> bool:
    return fn_status(await stub.status(pb.StatusRequest()), fn.function_id).loaded


async def test_keep_alive_unloads_and_cold_starts_again(tmp_path):
    fn = make_function(seed=1)
    async with running_node(tmp_path, keep_alive_s=0.2) as (node, stub):
        await stub.deploy(chunks_of(fn))
        first, out1 = await call(stub, fn)
        assert first.cold_start and await loaded(stub, fn)
        await wait_until(lambda: _not(loaded(stub, fn)), 5, "keep-alive eviction")
        status = await stub.status(pb.StatusRequest())
        assert status.loaded_bytes == 0 and fn_status(status, fn.function_id).resident_bytes == 0
        again, out2 = await call(stub, fn)
        assert again.cold_start
        np.testing.assert_allclose(out1, out2, atol=1e-6)
        stats = node.runtime.function(fn.function_id).stats
        assert stats.cold_starts == 2 and stats.invocations == 2 and node.runtime.counters.evictions_keep_alive >= 1


async def _not(awaitable) -> bool:
    return not await awaitable


async def test_keep_alive_zero_releases_after_each_call(tmp_path):
    fn = make_function(seed=2)
    async with running_node(tmp_path, keep_alive_s=0.0) as (node, stub):
        await stub.deploy(chunks_of(fn))
        assert (await call(stub, fn))[0].cold_start
        assert not await loaded(stub, fn)
        assert (await call(stub, fn))[0].cold_start


async def test_concurrent_cold_calls_share_one_load(tmp_path):
    fn = make_function(seed=3, hidden=64, inter=512)
    async with running_node(tmp_path, keep_alive_s=float("inf")) as (node, stub):
        await stub.deploy(chunks_of(fn))
        # all 8 calls start in one event-loop turn, before the load (in a worker thread) can finish
        _, hidden, calls = frames.decode_request(frame(X, [fn.call([0, 1, 2], [2, 1])]))
        replies = await asyncio.gather(*(node.runtime.invoke(calls, hidden) for _ in range(8)))
        stats = node.runtime.function(fn.function_id).stats
        assert stats.cold_starts == 1 and stats.loads == 1 and stats.invocations == 8
        assert node.runtime.counters.loads == 1
        assert all(result.cold_start for ((result, _),) in replies)   # every caller waited for that one load
        for ((_, out),) in replies:
            np.testing.assert_allclose(out, fn.reference(X, [0, 1, 2], [2, 1]), atol=1e-4)
        await asyncio.gather(*(call(stub, fn) for _ in range(4)))      # over gRPC too, now warm
        assert stats.loads == 1 and stats.invocations == 12


async def test_in_flight_function_is_never_evicted(tmp_path):
    busy, idle = make_function(seed=4), make_function(seed=5)
    gate = GatedExecutor(8)
    async with running_node(tmp_path, run_executor=gate, keep_alive_s=0.05) as (node, stub):
        for fn in (busy, idle):
            await stub.deploy(chunks_of(fn))
            await stub.load(pb.LoadRequest(function_ids=[fn.function_id], wait=True))   # busy loads first
        pending = asyncio.ensure_future(call(stub, busy))
        await wait_until(lambda: gate.entered == 1, 5, "the call to reach ORT")
        await wait_until(lambda: _not(loaded(stub, idle)), 5, "the idle function's eviction")
        assert await loaded(stub, busy)                       # idle longer than keep-alive, but in flight
        assert busy.function_id not in node.runtime.evict_idle()
        assert fn_status(await stub.status(pb.StatusRequest()), busy.function_id).in_flight == 1
        gate.open()
        await pending
        await wait_until(lambda: _not(loaded(stub, busy)), 5, "eviction once the call finished")
    gate.shutdown()


async def test_memory_pressure_evicts_lru_idle_never_in_flight(tmp_path):
    fns = [make_function(seed=s, hidden=256, inter=512) for s in (6, 7, 8)]     # ~3 MiB files, ~4.2 MiB loaded
    a, b, c = fns
    gate = GatedExecutor(8)
    gate.open()
    async with running_node(tmp_path, run_executor=gate, memory_budget_bytes=10 * MIB, overcommit=2.0,
                            keep_alive_s=float("inf")) as (node, stub):
        x = np.ones((2, 256), np.float32)

        async def run(fn):
            return frames.decode_reply(await stub.invoke(frame(x, [fn.call([0, 1], [1, 1])])))[0].results[0]

        for fn in fns:
            await stub.deploy(chunks_of(fn))
        await run(a)
        await run(b)
        await run(c)                                  # a is least recently used: evicted
        assert [await loaded(stub, f) for f in fns] == [False, True, True]
        assert node.runtime.counters.evictions_memory == 1
        status = await stub.status(pb.StatusRequest())
        assert status.loaded_bytes <= status.memory_budget_bytes

        gate.gate.clear()                             # b (now the LRU) gets a call in flight
        entered = gate.entered
        busy = asyncio.ensure_future(run(b))
        await wait_until(lambda: gate.entered == entered + 1, 5, "b in flight")
        cold = asyncio.ensure_future(run(a))          # needs room: must evict c, not b
        await wait_until(lambda: gate.entered == entered + 2, 5, "a loaded and running")
        assert [await loaded(stub, f) for f in fns] == [True, True, False]

        blocked = asyncio.ensure_future(run(c))       # a and b in flight: the load has to wait
        await wait_until(lambda: node.runtime.counters.memory_waits >= 1, 5, "the load to wait for memory")
        assert not blocked.done() and (await stub.status(pb.StatusRequest())).queue_depth == 1
        gate.open()
        results = await asyncio.gather(busy, cold, blocked)
        assert [r.cold_start for r in results] == [False, True, True]
        assert (await stub.status(pb.StatusRequest())).loaded_bytes <= 10 * MIB
    gate.shutdown()


async def test_bounded_queue_answers_backpressure(tmp_path):
    fn = make_function(seed=9)
    gate = GatedExecutor(8)
    async with running_node(tmp_path, run_executor=gate, max_queue=1) as (node, stub):
        await stub.deploy(chunks_of(fn))
        await stub.load(pb.LoadRequest(function_ids=[fn.function_id], wait=True))
        slots = node.runtime.run_slots
        running = [asyncio.ensure_future(call(stub, fn)) for _ in range(slots)]
        await wait_until(lambda: gate.entered == slots, 5, "every run slot busy")
        queued = asyncio.ensure_future(call(stub, fn))
        await wait_until(lambda: node.runtime.queue_depth == 1, 5, "one queued call")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(stub, fn)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details().startswith(errors.BACKPRESSURE_PREFIX)
        assert isinstance(errors.from_grpc(info.value.code(), info.value.details(), "n"), errors.Backpressure)
        gate.open()
        await asyncio.gather(*running, queued)
        assert node.runtime.counters.backpressure == 1 and node.runtime.queue_depth == 0
    gate.shutdown()
