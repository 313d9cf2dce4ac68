"""The engine's queues apply the scheduler's plan: joiners leave the waiting queue in order and take KV slots
from the manager, the fairness order is applied first, urgent steps alternate, and sequences leave cleanly."""

from __future__ import annotations

import pytest

from faasmoe.router.engine.queues import BatchQueues
from faasmoe.router.engine.sampling import SamplingParams
from faasmoe.router.engine.scheduler import Limits
from faasmoe.router.engine.sequence import Request, Sequence
from faasmoe.router.model.kv_cache import KVManager


def seq(prompt: int, max_tokens: int = 4, tenant: str = "") -> Sequence:
    return Sequence(Request(tuple(range(1, prompt + 1)), max_tokens, SamplingParams(), tenant=tenant), None,
                    frozenset())


@pytest.mark.parametrize("limits,prompts,joined", [
    (Limits(max_running=2, max_step_tokens=64), [3, 3, 3], 2),                       # batch places
    (Limits(max_running=4, max_step_tokens=64, cache_tokens=14), [3, 3, 3], 2),      # KV room (7 each)
    (Limits(max_running=4, max_step_tokens=4, prefill_chunk=4), [3, 3, 3], 2),       # step budget (3 + 1)
])
def test_admit_applies_the_plan(limits, prompts, joined):
    queues, kv = BatchQueues(limits), KVManager(4, 64)
    seqs = [seq(p) for p in prompts]
    for s in seqs:
        queues.arrive(s)
    plan = queues.plan(None, set())
    by_id = queues.admit(plan, kv.allocate)
    assert queues.running == seqs[:joined] and queues.waiting == seqs[joined:]
    assert [s.slot for s in seqs[:joined]] == list(range(joined)) and kv.used == joined
    assert set(by_id) == {s.id for s in seqs[:joined]} and all(s.slot is None for s in seqs[joined:])


def test_order_urgency_and_leaving():
    queues, kv = BatchQueues(Limits(max_running=3, max_step_tokens=64, reserved_slots=1)), KVManager(3, 64)
    a1, a2, b1 = seq(3, tenant="a"), seq(3, tenant="a"), seq(3, tenant="b")
    for s in (a1, a2, b1):
        queues.arrive(s)
    plan = queues.plan(lambda waiting: sorted(waiting, key=lambda s: s.request.tenant != "b"), set())
    queues.admit(plan, kv.allocate)
    assert queues.running == [b1, a1] and queues.waiting == [a2]        # b first; the last place is reserved
    plan = queues.plan(None, {a2.id})                                   # urgent: a step of its own
    assert plan.urgent and plan.runs == ((a2.id, 3),)
    assert not queues.plan(None, {a2.id}).urgent                        # never two urgent steps in a row
    a1.cancelled = True
    assert queues.take_cancelled() == [a1] and queues.running == [b1]
    queues.leave([b1, a2])
    assert not queues and queues.take_all() == []
