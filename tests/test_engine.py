"""The engine over real node processes: a request's greedy tokens do not depend on who else is in the batch
(7 other requests of different lengths joining at different steps, long prompts prefilled in chunks);
a cancelled sequence leaves the batch within one step; a failed step fails only its requests and leaves no
trace in the caches."""

from __future__ import annotations

import asyncio

import pytest
import torch

from faasmoe.proto.errors import NodeUnavailable, StepFailed
from faasmoe.router.control.local_mesh import LocalMesh
from faasmoe.router.engine.engine import EngineConfig
from faasmoe.router.engine.sampling import SamplingParams
from faasmoe.router.engine.scheduler import Limits
from faasmoe.router.engine.sequence import FinishEvent, Request, TokenEvent
from faasmoe.router.engine.serving import local_serving
from faasmoe.router.model.experts import LocalExperts
from faasmoe.router.model.runner import ModelRunner, SeqChunk
from node_fixtures import wait_until
from serving_fixtures import tiny_model

CONFIG = EngineConfig(limits=Limits(max_running=16, max_step_tokens=64, prefill_chunk=6))


@pytest.fixture(scope="module")
def mesh_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    tiny = tiny_model(root)
    with LocalMesh(3, root / "nodes", memory_budget_mb=256) as mesh:
        yield mesh, tiny


def _ids(tiny, text):
    return tuple(tiny.tokenizer(text)["input_ids"])


async def _steps_pass(engine, n: int) -> None:
    target = engine.stats.steps + n
    await wait_until(lambda: engine.stats.steps >= target, 60, f"{n} engine steps")


def test_tokens_do_not_depend_on_the_batch(mesh_and_model):
    mesh, tiny = mesh_and_model
    probe = _ids(tiny, "def probe(x): return x * 2 + 1")        # 30 tokens: prefilled in 5 chunks
    others = [_ids(tiny, "y" * (3 + 5 * k)) for k in range(7)]
    max_new = 30

    async def run():
        async with local_serving(tiny.store, mesh.addresses, CONFIG) as serving:
            engine = serving.engine
            alone = await engine.generate(Request(probe, max_new, keep_logits=True))
            jobs = [asyncio.ensure_future(engine.generate(Request(others[0], 40)))]
            await _steps_pass(engine, 2)
            mine = asyncio.ensure_future(engine.generate(Request(probe, max_new, keep_logits=True)))
            for k, ids in enumerate(others[1:], 1):                # the others join while the probe runs
                await _steps_pass(engine, 1 + k % 3)
                jobs.append(asyncio.ensure_future(engine.generate(Request(ids, 10 + 5 * k))))
            together = await mine
            await asyncio.gather(*jobs)
            return alone, together, engine.stats

    alone, together, stats = asyncio.run(run())
    (ref,) = tiny.greedy([probe], max_new)
    assert alone.token_ids == together.token_ids == ref.token_ids
    assert (alone.logits - together.logits).abs().max().item() <= 1e-4
    assert (alone.logits - ref.logits).abs().max().item() <= 1e-4
    assert stats.decode_steps and stats.decode_step_rpcs <= 3 * 4 * stats.decode_steps     # <= nodes x layers


def test_a_cancelled_sequence_leaves_within_one_step(mesh_and_model):
    mesh, tiny = mesh_and_model

    async def run():
        async with local_serving(tiny.store, mesh.addresses, CONFIG) as serving:
            engine = serving.engine
            keep = asyncio.ensure_future(engine.generate(Request(_ids(tiny, "stay"), 60, SamplingParams(1.0, seed=1))))
            seq = engine.submit(Request(_ids(tiny, "leave"), 200, SamplingParams(1.0, seed=2)))
            events = engine.events(seq)
            while not isinstance(await events.__anext__(), TokenEvent):
                pass
            at_cancel = engine.stats.steps
            engine.cancel(seq)
            finish = None
            async for event in events:
                finish = event
            assert isinstance(finish, FinishEvent) and finish.reason == "cancelled"
            assert engine.stats.steps - at_cancel <= 1 and seq not in engine.running
            assert seq.slot is None and engine.kv.manager.used == len(engine.running)   # its slot is free
            await keep
            return finish

    assert asyncio.run(run()).completion_tokens < 200


def test_a_failed_step_fails_only_its_requests_and_the_engine_serves_on(mesh_and_model):
    mesh, tiny = mesh_and_model
    one_at_a_time = EngineConfig(limits=Limits(max_running=1, max_step_tokens=64, prefill_chunk=6))

    async def run():
        async with local_serving(tiny.store, mesh.addresses, one_at_a_time) as serving:
            engine, mesh_ = serving.engine, serving.mesh
            first = engine.submit(Request(_ids(tiny, "abc"), 20))
            events = engine.events(first)
            await events.__anext__()                               # it runs; the batch is full
            second = asyncio.ensure_future(engine.generate(Request(_ids(tiny, "xyz"), 5)))
            await wait_until(lambda: len(engine.waiting) == 1, 10, "the second request to queue")
            assert len(engine.waiting) == 1                        # waiting: not in the step that fails
            original, calls = mesh_.collect, {"n": 0}

            async def failing_collect(pending):
                calls["n"] += 1
                if calls["n"] == 3:                                # the third layer of the next step fails
                    raise NodeUnavailable("injected failure")
                return await original(pending)

            mesh_.collect = failing_collect
            async for event in events:
                if isinstance(event, FinishEvent):
                    assert event.reason == "error" and isinstance(event.error, StepFailed)
            assert engine.stats.failed_steps == 1
            mesh_.collect = original
            return (await second).token_ids

    (ref,) = tiny.greedy([_ids(tiny, "xyz")], 5)
    assert asyncio.run(run()) == ref.token_ids


class _FailOnce:
    """transformers' own experts, failing once at one layer (a step that breaks half-way)."""

    def __init__(self, model, layer: int):
        self.local, self.layer, self.armed = LocalExperts(model), layer, False

    async def submit(self, layer, hidden, index, weights, ctx):
        if layer == self.layer and self.armed:
            self.armed = False
            raise NodeUnavailable("injected failure")
        return await self.local.submit(layer, hidden, index, weights, ctx)

    async def collect(self, handle):
        return await self.local.collect(handle)


def test_a_step_that_fails_half_way_is_rolled_back_and_can_run_again(mesh_and_model):
    _, tiny = mesh_and_model
    ids = list(_ids(tiny, "rollback me"))

    async def run(backend):
        runner = ModelRunner(tiny.reference, backend)
        kv = runner.new_kv_cache(2, 64)
        slot = kv.manager.allocate()
        first = await runner.forward(kv, [SeqChunk(slot, ids[:5], False)], None)
        assert first.shape[0] == 0 and kv.manager.lengths[slot] == 5
        if isinstance(backend, _FailOnce):
            backend.armed = True
            with pytest.raises(NodeUnavailable):
                await runner.forward(kv, [SeqChunk(slot, ids[5:], True)], None)
            assert kv.manager.lengths[slot] == 5
        return await runner.forward(kv, [SeqChunk(slot, ids[5:], True)], None), kv.manager.lengths[slot]

    (clean, n_clean), (again, n_again) = asyncio.run(run(LocalExperts(tiny.reference))), \
        asyncio.run(run(_FailOnce(tiny.reference, layer=2)))
    assert n_clean == n_again == len(ids)
    assert torch.equal(clean, again)
