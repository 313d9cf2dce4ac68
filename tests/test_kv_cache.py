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


def test_a_slot_is_backed_as_written_and_handed_back_when_freed():
    import psutil
    import torch

    from faasmoe.router.model.kv_cache import KVCache

    proc = psutil.Process()
    kv = KVCache(2, 3, 8, 4096, 128, torch.float32)            # a slot: 16 MiB per tensor, 64 MiB in all
    slot_bytes = 4 * kv.keys[0][0].numel() * 4
    before = proc.memory_info().rss
    assert kv.reserved_bytes == 3 * slot_bytes
    a, b = kv.manager.allocate(), kv.manager.allocate()
    for slot, value in ((a, 1.5), (b, -2.0)):
        kv.manager.stage(slot, 4096)
        for t in (*kv.keys, *kv.values):
            t[slot].fill_(value)
    kv.manager.commit()
    written = proc.memory_info().rss - before
    assert written >= 1.9 * slot_bytes                           # only what was written is resident
    kv.free(a)
    dropped = before + written - proc.memory_info().rss
    assert dropped >= 0.95 * slot_bytes, (dropped, slot_bytes)
    assert all(torch.all(t[b] == -2.0) for t in (*kv.keys, *kv.values))          # the neighbour is untouched
    assert kv.manager.lengths[a] == 0 and kv.manager.allocate() == a
    assert torch.isfinite(kv.keys[0][a]).all()                 # what stays of the edges is old, finite data
