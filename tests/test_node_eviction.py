"""Table-driven tests of the pure eviction decisions."""

from __future__ import annotations

import math

import pytest

from faasmoe.node.eviction import (LoadedFunction, StoredFile, evict_for_load, files_to_drop,
                                   next_keep_alive_deadline_s, past_keep_alive)


def L(fid: str, size: int, in_flight: int = 0, used: float = 0.0) -> LoadedFunction:
    return LoadedFunction(fid, size, in_flight, used)


def F(fid: str, size: int, used: float = 0.0, pinned: bool = False) -> StoredFile:
    return StoredFile(fid, size, used, pinned)


@pytest.mark.parametrize(("loaded", "need", "budget", "reserved", "expected"), [
    ([], 10, 100, 0, []),                                            # empty node
    ([L("a", 50)], 50, 100, 0, []),                                  # fits exactly
    ([L("a", 50, used=2), L("b", 40, used=1)], 20, 100, 0, ["b"]),   # LRU first (b older)
    ([L("a", 50, used=1), L("b", 40, used=2)], 20, 100, 0, ["a"]),
    ([L("a", 30, used=1), L("b", 30, used=2), L("c", 30, used=3)], 60, 100, 0, ["a", "b"]),  # as many as needed
    ([L("a", 50, in_flight=1, used=1), L("b", 40, used=2)], 20, 100, 0, ["b"]),  # never one in flight
    ([L("a", 50, in_flight=1), L("b", 40, in_flight=2)], 20, 100, 0, None),     # all busy: impossible now
    ([L("a", 50, in_flight=1, used=1), L("b", 40, used=2)], 60, 100, 0, None),  # idle ones are not enough
    ([], 101, 100, 0, None),                                         # larger than the budget
    ([L("a", 20)], 50, 100, 40, ["a"]),                              # reserved bytes count as used
    ([L("b", 10, used=5), L("a", 10, used=5)], 85, 100, 0, ["a"]),   # ties broken by id
])
def test_evict_for_load(loaded, need, budget, reserved, expected):
    assert evict_for_load(loaded, need, budget, reserved) == expected


@pytest.mark.parametrize(("loaded", "now", "keep_alive", "expected"), [
    ([L("a", 1, used=0), L("b", 1, used=5)], 10, 5, ["a", "b"]),     # both past 5 s, oldest first
    ([L("a", 1, used=0), L("b", 1, used=6)], 10, 5, ["a"]),
    ([L("a", 1, in_flight=1, used=0)], 100, 5, []),                  # in flight: never
    ([L("a", 1, used=0)], 1e9, math.inf, []),                        # inf: never
    ([L("a", 1, used=10)], 10, 0, ["a"]),                            # 0: right after use
    ([], 10, 5, []),
])
def test_past_keep_alive(loaded, now, keep_alive, expected):
    assert past_keep_alive(loaded, now, keep_alive) == expected


@pytest.mark.parametrize(("loaded", "keep_alive", "expected"), [
    ([L("a", 1, used=3), L("b", 1, used=1)], 5, 6),
    ([L("a", 1, used=3, in_flight=1), L("b", 1, used=4)], 5, 9),
    ([L("a", 1, used=3, in_flight=1)], 5, None),
    ([L("a", 1, used=3)], math.inf, None),
])
def test_next_keep_alive_deadline(loaded, keep_alive, expected):
    assert next_keep_alive_deadline_s(loaded, keep_alive) == expected


@pytest.mark.parametrize(("files", "need", "budget", "reserved", "expected"), [
    ([F("a", 40)], 50, 100, 0, []),
    ([F("a", 40, used=2), F("b", 40, used=1)], 50, 100, 0, ["b"]),
    ([F("a", 40, used=1, pinned=True), F("b", 40, used=2)], 50, 100, 0, ["b"]),  # deployed: never
    ([F("a", 60, pinned=True), F("b", 30)], 50, 100, 0, None),                  # pinned leave no room
    ([F("a", 10, used=1), F("b", 10, used=2), F("c", 70, pinned=True)], 20, 100, 0, ["a"]),
    ([F("a", 10, used=1), F("b", 10, used=2), F("c", 70, pinned=True)], 30, 100, 0, ["a", "b"]),
    ([F("a", 10, used=1), F("b", 10, used=2)], 90, 100, 0, ["a"]),
    ([], 200, 100, 0, None),
    ([F("a", 30)], 50, 100, 30, ["a"]),                                         # uploads in progress count
])
def test_files_to_drop(files, need, budget, reserved, expected):
    assert files_to_drop(files, need, budget, reserved) == expected
