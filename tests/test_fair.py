"""Weighted-fair scheduling (Virtual Token Counter): pure functions, table-driven."""

import pytest

from faasmoe.router.tenancy.fair import W_DECODE, W_PREFILL, charge, fair_order, on_arrival


@pytest.mark.parametrize("counters, tenant, weight, prefill, decode, expected", [
    ({}, "a", 1.0, 10, 0, 10 * W_PREFILL),
    ({"a": 5.0}, "a", 1.0, 0, 3, 5.0 + 3 * W_DECODE),
    ({"a": 0.0}, "a", 2.0, 10, 5, (10 * W_PREFILL + 5 * W_DECODE) / 2),     # weight 2: half the charge
])
def test_charge(counters, tenant, weight, prefill, decode, expected):
    assert charge(counters, tenant, weight, prefill, decode)[tenant] == pytest.approx(expected)


@pytest.mark.parametrize("counters, tenant, waiting, last, expected", [
    ({}, "a", [], None, 0.0),                                       # first ever
    ({"a": 3.0, "b": 50.0}, "a", ["b"], "b", 50.0),                 # came back after idling: no banked credit
    ({"a": 80.0, "b": 50.0}, "a", ["b"], "b", 80.0),                # never lowered
    ({"a": 3.0, "b": 50.0, "c": 20.0}, "a", ["b", "c"], "b", 20.0),  # to the lowest waiting counter
    ({"a": 3.0, "b": 50.0}, "a", ["a", "b"], "b", 3.0),             # already waiting: unchanged
    # nobody waits: to the counter of the tenant that joined last, not the stale one it had
    ({"a": 1000.0, "b": 10.0}, "b", [], "a", 1000.0),
    # a tenant with requests running but none waiting is no reference: c (100) does not pull b below a's 10000
    ({"a": 10000.0, "b": 0.0, "c": 100.0}, "b", ["a"], "a", 10000.0),
])
def test_on_arrival(counters, tenant, waiting, last, expected):
    assert on_arrival(counters, tenant, waiting, last)[tenant] == expected


@pytest.mark.parametrize("waiting, counters, weights, expected", [
    ([], {}, {}, []),
    ([(1, "a", 10), (2, "a", 10), (3, "b", 10)], {"a": 0, "b": 0}, {}, [1, 3, 2]),     # interleaved
    ([(1, "a", 10), (2, "a", 10), (3, "a", 10), (4, "b", 10)], {"a": 100, "b": 0}, {}, [4, 1, 2, 3]),
    # weight 2: a takes two joins for each of b's
    ([(1, "a", 10), (2, "a", 10), (3, "a", 10), (4, "b", 10), (5, "b", 10)], {"a": 0, "b": 0},
     {"a": 2.0, "b": 1.0}, [1, 4, 2, 3, 5]),
    ([(1, "a", 100), (2, "b", 1), (3, "b", 1)], {"a": 0, "b": 0}, {}, [1, 2, 3]),      # ties: first seen
    ([(2, "b", 5), (1, "a", 5)], {"a": 0, "b": 0}, {}, [2, 1]),                      # arrival order on ties
])
def test_fair_order(waiting, counters, weights, expected):
    assert fair_order(waiting, counters, weights) == expected
