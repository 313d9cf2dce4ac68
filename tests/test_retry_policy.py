"""The retry budget, the node ban and replica preference: pure decisions, driven by tables and a fake clock."""

from __future__ import annotations

import pytest

from faasmoe.proto.backoff import Backoff
from faasmoe.router.mesh.retry import NodeBans, RetryBudget, ban_s, prefer_unbanned, retry_allowed


@pytest.mark.parametrize("first_sends, retries, ratio, floor, allowed", [
    (0, 0, 0.2, 10, True),        # the floor lets a quiet router retry
    (0, 9, 0.2, 10, True),
    (0, 10, 0.2, 10, False),
    (100, 29, 0.2, 10, True),     # 10 + 20 % of 100
    (100, 30, 0.2, 10, False),
    (1000, 150, 0.1, 0, False),
    (1000, 99, 0.1, 0, True),
    (5, 0, 0.0, 0, False),        # no budget at all
])
def test_retry_allowed(first_sends, retries, ratio, floor, allowed):
    assert retry_allowed(first_sends, retries, ratio=ratio, floor=floor) is allowed


@pytest.mark.parametrize("failures, seconds", [(0, 0.0), (1, 0.0), (2, 1.0), (3, 2.0), (4, 4.0), (6, 16.0),
                                               (7, 30.0), (50, 30.0)])
def test_ban_grows_from_the_second_failure_and_is_capped(failures, seconds):
    assert ban_s(failures, Backoff(1.0, 30.0, factor=2.0)) == seconds


@pytest.mark.parametrize("replicas, banned, chosen", [
    (["a", "b"], {"a"}, ["b"]),
    (["a", "b"], set(), ["a", "b"]),
    (["a", "b"], {"a", "b"}, ["a", "b"]),     # all banned: a ban never makes a function unreachable
    (["a"], {"a"}, ["a"]),
    ([], {"a"}, []),
])
def test_prefer_unbanned(replicas, banned, chosen):
    assert prefer_unbanned(replicas, banned) == chosen


def test_budget_is_a_sliding_window():
    budget = RetryBudget(ratio=0.5, floor=1, window_s=10.0)
    budget.sent(0.0, 4)                        # 1 + 0.5 * 4 = 3 retries
    assert [budget.try_retry(1.0) for _ in range(4)] == [True, True, True, False]
    assert budget.spent == 3 and budget.refused == 1
    assert not budget.try_retry(9.9)
    assert budget.try_retry(11.5)              # the window moved past every send and retry: the floor again
    assert not budget.try_retry(11.6)
    budget.sent(12.0, 10)
    assert budget.try_retry(12.0)


@pytest.mark.parametrize("events, now_s, banned", [
    ([("fail", "a", 0.0)], 0.5, set()),                                    # one failure: no ban
    ([("fail", "a", 0.0), ("fail", "a", 0.1)], 0.5, {"a"}),                # two in a row: 1 s
    ([("fail", "a", 0.0), ("fail", "a", 0.1)], 1.2, set()),                # served
    ([("fail", "a", 0.0), ("fail", "a", 0.1), ("fail", "a", 0.2)], 2.0, {"a"}),   # third: 2 s
    ([("fail", "a", 0.0), ("fail", "a", 0.1), ("ok", "a", 0.2)], 0.5, set()),     # a success clears it
    ([("fail", "a", 0.0), ("fail", "b", 0.0), ("fail", "b", 0.1)], 0.5, {"b"}),
])
def test_node_bans(events, now_s, banned):
    bans = NodeBans(Backoff(1.0, 30.0, factor=2.0))
    for kind, node, at_s in events:
        if kind == "fail":
            bans.failed(node, at_s)
        else:
            bans.succeeded(node)
    assert bans.banned(now_s) == banned


def test_budget_takes_one_token_per_frame_resent():
    budget = RetryBudget(ratio=0.2, floor=2, window_s=10.0)
    budget.sent(0.0, 10)                       # 2 + 0.2 * 10 = 4 frames may be resent
    assert not budget.try_retry(0.5, 5)        # all or nothing
    assert budget.refused == 5 and budget.spent == 0
    assert budget.try_retry(0.5, 3) and budget.spent == 3
    assert budget.try_retry(0.5, 1) and not budget.try_retry(0.5, 1)
