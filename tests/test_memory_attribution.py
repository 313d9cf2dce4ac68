"""Attributing loaded functions' memory-seconds to tenants (pure, table-driven)."""

import pytest

from faasmoe.router.tenancy.memory import Loaded, attribute_memory

MB = 1_000_000


@pytest.mark.parametrize("before, now, my_rows, interval, by_tenant, unattributed", [
    # one function, only this router used it: split between tenants by rows
    ({("n1", "f"): Loaded(10 * MB, 0, 0)}, {("n1", "f"): Loaded(10 * MB, 30, 30)}, {("f", "a"): 20, ("f", "b"): 10},
     2.0, {"a": 20 * MB * 2 / 3, "b": 20 * MB / 3}, 0.0),
    # loaded since the last poll: no baseline to compare the node's counters with, nothing attributed yet
    ({}, {("n1", "f"): Loaded(10 * MB, 30, 30)}, {("f", "a"): 20}, 2.0, {}, 0.0),
    # another router used half the rows: this router pays half
    ({("n1", "f"): Loaded(10 * MB, 100, 50)}, {("n1", "f"): Loaded(10 * MB, 140, 70)}, {("f", "a"): 20}, 1.0,
     {"a": 5 * MB}, 0.0),
    # loaded but nobody used it this interval: the keep-alive's cost
    ({("n1", "f"): Loaded(10 * MB, 100, 50)}, {("n1", "f"): Loaded(10 * MB, 100, 50)}, {}, 3.0, {}, 30 * MB),
    # used only by another router: this router's tenants pay nothing
    ({("n1", "f"): Loaded(10 * MB, 100, 50)}, {("n1", "f"): Loaded(10 * MB, 110, 50)}, {}, 1.0, {}, 0.0),
    # two nodes hold copies; rows per tenant are per function
    ({("n1", "f"): Loaded(4 * MB, 0, 0), ("n2", "f"): Loaded(4 * MB, 0, 0)},
     {("n1", "f"): Loaded(4 * MB, 10, 10), ("n2", "f"): Loaded(4 * MB, 10, 10)}, {("f", "a"): 20}, 1.0,
     {"a": 8 * MB}, 0.0),
])
def test_attribute_memory(before, now, my_rows, interval, by_tenant, unattributed):
    got, idle = attribute_memory(before, now, my_rows, interval)
    assert got == pytest.approx(by_tenant) and idle == pytest.approx(unattributed)
