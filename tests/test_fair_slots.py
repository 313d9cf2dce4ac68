"""The node's run slots: a fair queue per caller (table-driven pick, and the asyncio plumbing)."""

from __future__ import annotations

import asyncio

import pytest

from faasmoe.node.fair_slots import FairSlots, pick_next
from node_fixtures import wait_until


@pytest.mark.parametrize("waiting, last, expected", [
    (["a"], None, "a"),
    (["a", "b"], None, "a"),
    (["a", "b"], "a", "b"),
    (["a", "b"], "b", "a"),                 # wraps around
    (["a", "b", "c"], "b", "c"),
    (["b", "c"], "a", "b"),                 # the last caller has nothing queued any more
    (["a"], "a", "a"),                      # alone: served again
])
def test_pick_next(waiting, last, expected):
    assert pick_next(waiting, last) == expected


def test_a_flooding_caller_waits_behind_its_own_calls():
    async def run():
        slots, order = FairSlots(1), []

        async def call(caller, i):
            await slots.acquire(caller)
            order.append(f"{caller}{i}")
            await asyncio.sleep(0)
            slots.release()

        await slots.acquire("x")                                     # the slot is busy
        flood = [asyncio.ensure_future(call("a", i)) for i in range(6)]
        await wait_until(lambda: slots.waiting == 6, 5, "a's six calls queued")
        light = [asyncio.ensure_future(call("b", i)) for i in range(2)]
        await wait_until(lambda: slots.waiting == 8, 5, "b's two calls queued behind them")
        slots.release()
        await asyncio.gather(*flood, *light)
        return order, slots.free

    order, free = asyncio.run(run())
    assert order[:4] == ["a0", "b0", "a1", "b1"]                    # b does not wait behind a's flood
    assert sorted(order) == sorted([f"a{i}" for i in range(6)] + ["b0", "b1"]) and free == 1


def test_a_cancelled_waiter_gives_up_its_turn():
    async def run():
        slots = FairSlots(1)
        await slots.acquire("x")
        waiter = asyncio.ensure_future(slots.acquire("a"))
        await wait_until(lambda: slots.waiting == 1, 5, "the waiter queued")
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        slots.release()
        assert slots.free == 1 and slots.waiting == 0
        await slots.acquire("b")
        return slots.free

    assert asyncio.run(run()) == 0
