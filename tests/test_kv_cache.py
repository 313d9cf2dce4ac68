"""The KV manager's slots and lengths (table tests), and the slotted cache against transformers' own cache."""

from __future__ import annotations

import pytest

from faasmoe.proto.errors import Overloaded
from faasmoe.router.model.kv_cache import KVManager


def run(ops, n_slots=3, slot_len=8):
    """Apply ``ops`` to a fresh manager; returns (results, lengths, used)."""
    kv, out = KVManager(n_slots, slot_len), []
    for op, *args in ops:
        out.append(getattr(kv, op)(*args))
    return out, kv.lengths, kv.used


@pytest.mark.parametrize("ops, results, lengths, used", [
    # the lowest free slot first, so used slots stay dense
    ([("allocate",), ("allocate",), ("free", 0), ("allocate",)], [0, 1, None, 0], [0, 0, 0], 2),
    # a step stages, then commits: lengths grow
    ([("allocate",), ("stage", 0, 5), ("commit",), ("stage", 0, 1), ("commit",)], [0, 0, None, 5, None],
     [6, 0, 0], 1),
    # a failed step rolls back: lengths stay, the next step starts where the last committed one ended
    ([("allocate",), ("stage", 0, 5), ("commit",), ("stage", 0, 2), ("rollback",), ("stage", 0, 2), ("commit",)],
     [0, 0, None, 5, None, 5, None], [7, 0, 0], 1),
    # several slots in one step
    ([("allocate",), ("allocate",), ("stage", 0, 3), ("stage", 1, 1), ("commit",)], [0, 1, 0, 0, None],
     [3, 1, 0], 2),
    # a freed slot starts empty for its next sequence, even freed mid-step
    ([("allocate",), ("stage", 0, 4), ("commit",), ("stage", 0, 1), ("free", 0), ("commit",), ("allocate",)],
     [0, 0, None, 4, None, None, 0], [0, 0, 0], 1),
    # a slot fills exactly to its length
    ([("allocate",), ("stage", 0, 8), ("commit",)], [0, 0, None], [8, 0, 0], 1),
])
def test_allocation_commit_and_rollback(ops, results, lengths, used):
    assert run(ops) == (results, lengths, used)


@pytest.mark.parametrize("ops, error, match", [
    ([("allocate",)] * 4, Overloaded, "all 3 KV cache slots are taken"),       # exhaustion
    ([("allocate",), ("stage", 0, 9)], ValueError, "full: 9 tokens > 8"),        # past the slot's length
    ([("allocate",), ("stage", 0, 6), ("commit",), ("stage", 0, 3)], ValueError, "full: 9 tokens > 8"),
    ([("stage", 0, 1)], ValueError, "not allocated"),                           # a slot nobody holds
    ([("allocate",), ("free", 0), ("free", 0)], ValueError, "not allocated"),   # freed twice
    ([("free", 7)], ValueError, "not allocated"),
    ([("allocate",), ("stage", 0, 1), ("stage", 0, 1)], ValueError, "already staged"),
])
def test_refusals(ops, error, match):
    with pytest.raises(error, match=match):
        run(ops)


def test_exhaustion_is_a_retryable_overload():
    kv = KVManager(1, 4)
    kv.allocate()
    with pytest.raises(Overloaded) as full:
        kv.allocate()
    assert full.value.retry_after_s >= 1


@pytest.mark.parametrize("n_slots, slot_len", [(0, 8), (2, 0)])
def test_a_cache_needs_room(n_slots, slot_len):
    with pytest.raises(ValueError, match="at least one slot"):
        KVManager(n_slots, slot_len)
