"""Attribution of a node's compute seconds and cold starts to the requests whose rows were in a frame."""

from types import SimpleNamespace as R

import numpy as np
import pytest

from faasmoe.router.tenancy.attribution import attribute

OWNERS = np.array([0, 0, 1, 2, 2, 2])          # step rows -> owner


@pytest.mark.parametrize("segments, results, offset, rows, compute, cold, by_function", [
    # one call, rows of owners 0 and 2: 1.0 s split 2:3
    ([(0, [0, 1, 3, 4, 5])], [R(compute_s=1.0, cold_start=False)], 0,
     {0: 2, 2: 3}, {0: 0.4, 2: 0.6}, {0: 0, 2: 0}, {("f", 0): 2, ("f", 2): 3}),
    # two segments (two experts) of one call count as one call; a second call is cold
    ([(0, [0, 2]), (0, [1]), (1, [5])], [R(compute_s=0.3, cold_start=False), R(compute_s=0.5, cold_start=True)], 0,
     {0: 2, 1: 1, 2: 1}, {0: 0.2, 1: 0.1, 2: 0.5}, {0: 0, 1: 0, 2: 1}, {("f", 0): 2, ("f", 1): 1, ("g", 2): 1}),
    # a frame whose rows start at step row 3 (a split step)
    ([(0, [0, 1])], [R(compute_s=2.0, cold_start=True)], 3, {2: 2}, {2: 2.0}, {2: 1}, {("f", 2): 2}),
])
def test_attribute(segments, results, offset, rows, compute, cold, by_function):
    shares, per_function = attribute(segments, results, OWNERS, offset, ["f", "g"])
    assert {o: s.rows for o, s in shares.items()} == rows
    assert {o: s.compute_s for o, s in shares.items()} == pytest.approx(compute)
    assert {o: s.cold_starts(results) for o, s in shares.items()} == cold
    assert per_function == by_function
    total = sum(r.compute_s for r in results)
    assert sum(s.compute_s for s in shares.values()) == pytest.approx(total)    # every second goes to someone


def test_a_tenants_requests_sharing_one_cold_call_count_it_once():
    owners = np.array([0, 1, 2, 3])                  # four requests
    results = [R(compute_s=1.0, cold_start=True), R(compute_s=1.0, cold_start=False)]
    shares, _ = attribute([(0, [0, 1, 2]), (1, [3])], results, owners, 0, ["f", "g"])
    tenant_of = {0: "a", 1: "a", 2: "a", 3: "b"}
    calls = {}
    for owner, share in shares.items():
        calls.setdefault(tenant_of[owner], set()).update(share.calls)
    assert {t: len(c) for t, c in calls.items()} == {"a": 1, "b": 1}                  # one call each, not three
    assert {t: sum(results[i].cold_start for i in c) for t, c in calls.items()} == {"a": 1, "b": 0}
    assert all(s.cold_starts(results) == 1 for o, s in shares.items() if tenant_of[o] == "a")   # each waited on it
