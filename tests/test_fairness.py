"""Weighted-fair scheduling in the engine over real node processes: weights of 2:1 give 2:1 throughput under
saturation; a flooding tenant does not starve a light one; outputs do not depend on the tenant mix; the ledger
adds up to the nodes' own counters."""

from __future__ import annotations

import asyncio

import pytest

from faasmoe.router.control.local_mesh import LocalMesh
from faasmoe.router.engine.engine import EngineConfig
from faasmoe.router.engine.scheduler import Limits
from faasmoe.router.engine.sequence import Request
from faasmoe.router.engine.serving import local_serving
from faasmoe.router.tenancy.accounting import Accounting
from faasmoe.router.tenancy.ledger import Ledger
from node_fixtures import wait_until
from serving_fixtures import tiny_model


@pytest.fixture(scope="module")
def mesh_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("fair")
    tiny = tiny_model(root)
    with LocalMesh(3, root / "nodes", memory_budget_mb=256) as mesh:
        yield mesh, tiny


def ids(tiny, text):
    return tuple(tiny.tokenizer(text)["input_ids"])


def test_weights_two_to_one_give_two_to_one_throughput_under_saturation(mesh_and_model):
    mesh, tiny = mesh_and_model
    weights = {"a": 2.0, "b": 1.0}
    accounting = Accounting(Ledger(), weights.get)
    config = EngineConfig(limits=Limits(max_running=6, max_step_tokens=64, prefill_chunk=16))

    async def run():
        async with local_serving(tiny.store, mesh.addresses, config, accounting=accounting) as serving:
            engine = serving.engine
            seqs = {t: [engine.submit(Request(ids(tiny, f"{t} request {i:02d}"), 20, tenant=t, ignore_eos=True))
                        for i in range(40)] for t in weights}
            await wait_until(lambda: not all(any(s in engine.waiting for s in seqs[t]) for t in weights), 120,
                             "one tenant's backlog to drain")
            tokens = {t: sum(len(s.output_ids) for s in seqs[t]) for t in weights}
            for s in [*engine.running, *engine.waiting]:
                engine.cancel(s)
            return tokens

    tokens = asyncio.run(run())
    assert tokens["a"] / tokens["b"] == pytest.approx(2.0, rel=0.10), tokens


def test_a_flooding_tenant_does_not_starve_a_light_one(mesh_and_model):
    """Tenant A keeps 16 requests in flight, more than the batch holds (12), so A always has requests waiting;
    B sends one request at a time. With fairness B does not queue behind A's backlog: its time to first token
    stays within a generous bound of B alone, and well below what first-come-first-served gives it."""
    mesh, tiny = mesh_and_model
    limits = Limits(max_running=12, max_step_tokens=256, prefill_chunk=64, reserved_slots=1)

    async def light(engine, n=8):
        ttft = []
        for i in range(n):
            result = await engine.generate(Request(ids(tiny, f"light {i}: def f(x):"), 8, tenant="b", ignore_eos=True))
            ttft.append(result.ttft_s)
        return ttft

    async def run(accounting):
        async with local_serving(tiny.store, mesh.addresses, EngineConfig(limits=limits),
                                 accounting=accounting) as serving:
            engine = serving.engine
            await light(engine, 2)                                       # warm
            alone = await light(engine)
            stop = asyncio.Event()

            async def flood(k):
                i = 0
                while not stop.is_set():
                    await engine.generate(Request(ids(tiny, f"heavy {k} {i}"), 24, tenant="a", ignore_eos=True))
                    i += 1

            heavy = [asyncio.ensure_future(flood(k)) for k in range(16)]
            await wait_until(lambda: any(s.request.tenant == "a" for s in engine.waiting), 60,
                             "A's backlog")
            crowded = await light(engine)
            stop.set()
            await asyncio.gather(*heavy)
            return alone, crowded

    alone, fair = asyncio.run(run(Accounting(Ledger())))
    _, fifo = asyncio.run(run(None))
    assert max(fair) <= 6 * max(alone) + 0.05, (alone, fair)
    assert sorted(fair)[len(fair) // 2] < sorted(fifo)[len(fifo) // 2], (fair, fifo)      # fairness is what helps


def test_outputs_do_not_depend_on_the_tenant_mix(mesh_and_model):
    mesh, tiny = mesh_and_model
    prompts = [ids(tiny, f"mix {i}: " + "q" * i) for i in range(6)]
    mixes = [["a"] * 6, ["a", "b"] * 3, [f"t{i}" for i in range(6)]]
    weights = {"a": 3.0, "b": 0.5}

    async def run(mix):
        accounting = Accounting(Ledger(), lambda t: weights.get(t, 1.0))
        async with local_serving(tiny.store, mesh.addresses, accounting=accounting) as serving:
            results = await asyncio.gather(*(serving.engine.generate(Request(p, 12, tenant=t))
                                             for p, t in zip(prompts, mix)))
            return [r.token_ids for r in results]

    outputs = [asyncio.run(run(mix)) for mix in mixes]
    assert outputs[0] == outputs[1] == outputs[2] == [r.token_ids for r in tiny.greedy(prompts, 12)]


def test_the_ledger_adds_up_to_the_nodes_own_counters(mesh_and_model):
    mesh, tiny = mesh_and_model
    ledger = Ledger()
    accounting = Accounting(ledger)

    async def run():
        async with local_serving(tiny.store, mesh.addresses, accounting=accounting, router_id="ledger-test") as serving:
            before = _node_counters(serving.session, "ledger-test")
            await asyncio.gather(*(serving.engine.generate(Request(ids(tiny, f"bill {i} " * (1 + i % 4)), 16,
                                                                   tenant="ab"[i % 2]))
                                   for i in range(12)))
            after = _node_counters(serving.session, "ledger-test")
            return before, after

    before, after = asyncio.run(run())
    totals = ledger.totals()
    rows = sum(u.expert_rows for u in totals.values())
    compute_s = sum(u.expert_compute_s for u in totals.values())
    assert set(totals) == {"a", "b"} and all(u.requests == 6 for u in totals.values())
    assert rows == pytest.approx(after[0] - before[0], rel=0.01)
    assert compute_s == pytest.approx(after[1] - before[1], rel=0.01)


def _node_counters(session, caller: str) -> tuple[int, float]:
    rows, compute_s = 0, 0.0
    for address in sorted({n for nodes in session.placement.values() for n in nodes}):
        for f in session.client(address).status().functions:
            rows += f.rows_by_caller.get(caller, 0)
            compute_s += f.compute_s
    return rows, compute_s
