"""The engine's KV cache: per attention layer one key and one value tensor ``[slots, kv_heads, slot_len,
head_dim]``, and a :class:`KVManager` that owns the slots and their lengths.

A sequence takes a slot when it joins the batch and gives it back when it leaves. A step *stages* the tokens
each of its sequences feeds (they are written at ``[length, length + n)`` of every layer), then either
*commits* them (the lengths grow) or *rolls them back* (the lengths stay; whatever the failed step wrote past
them is garbage that the next step overwrites). Decode rows of every sequence can so attend in one call per
layer over the view ``[first_slot:last_slot + 1, :, :longest]`` masked by length: no per-sequence buffers, no
appends that copy.

The tensors are anonymous memory maps, zeroed by the operating system (untouched pages read as zeros and are
backed, 4 KiB at a time, only once a step writes them), and a freed slot's pages are handed back
(``madvise(DONTNEED)``: a slot is one contiguous range of each tensor), so resident memory follows the tokens
cached. Zeros matter: a masked position is still multiplied, and garbage there could be NaN; handed-back pages
read as zeros again. Not numpy's ``zeros``: it asks for transparent huge pages on large arrays, so each first
touch backed and zeroed 2 MiB (measured: 0.5 ms per first touch against 6 µs, and a first prefill of 8
sequences took 0.9 s instead of 0.12 s). How many
tokens all running sequences may reserve together is the scheduler's ``cache_tokens`` (``--kv-cache-mb``);
the slot count is its ``max_running``.
"""

from __future__ import annotations

import heapq

import ctypes
import math
import mmap

import torch

from faasmoe.proto.errors import Overloaded


class KVManager:
    """Slots and lengths, no tensors (pure bookkeeping, table-tested)."""

    def __init__(self, n_slots: int, slot_len: int):
        if n_slots < 1 or slot_len < 1:
            raise ValueError(f"a KV cache needs at least one slot of one token, got {n_slots} × {slot_len}")
        self.n_slots, self.slot_len = n_slots, slot_len
        self.lengths = [0] * n_slots              # committed tokens per slot
        self._free = list(range(n_slots))         # a heap: the lowest free slot first, so used slots stay dense
        self._staged: dict[int, int] = {}         # slot -> tokens this step adds

    @property
    def used(self) -> int:
        return self.n_slots - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise Overloaded(f"all {self.n_slots} KV cache slots are taken; retry shortly", retry_after_s=1.0)
        slot = heapq.heappop(self._free)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.n_slots:
            raise ValueError(f"KV slot {slot} is not allocated")
        self._staged.pop(slot, None)
        self.lengths[slot] = 0
        heapq.heappush(self._free, slot)

    def stage(self, slot: int, n_tokens: int) -> int:
        """Reserve ``n_tokens`` after the slot's committed tokens for this step; returns where they start."""
        if slot in self._free:
            raise ValueError(f"KV slot {slot} is not allocated")
        if slot in self._staged:
            raise ValueError(f"KV slot {slot} is already staged in this step")
        start = self.lengths[slot]
        if start + n_tokens > self.slot_len:
            raise ValueError(f"KV slot {slot} full: {start + n_tokens} tokens > {self.slot_len}")
        self._staged[slot] = n_tokens
        return start

    def commit(self) -> None:
        """The step finished on every layer: its tokens belong to their sequences."""
        for slot, n in self._staged.items():
            self.lengths[slot] += n
        self._staged.clear()

    def rollback(self) -> None:
        """Forget what a failed step staged."""
        self._staged.clear()


class KVCache:
    """The tensors behind a :class:`KVManager`."""

    def __init__(self, n_layers: int, n_slots: int, kv_heads: int, slot_len: int, head_dim: int,
                 dtype: torch.dtype, value_dim: int | None = None):
        """``head_dim``: the keys' width; ``value_dim``: the values' (default the same; MLA caches a latent
        and a rotated key of different widths)."""
        value_dim = head_dim if value_dim is None else value_dim
        self.manager = KVManager(n_slots, slot_len)
        self._maps: list[mmap.mmap] = []          # the tensors' memory (kept alive with them)
        self.keys = [self._lazy_zeros((n_slots, kv_heads, slot_len, head_dim), dtype) for _ in range(n_layers)]
        self.values = [self._lazy_zeros((n_slots, kv_heads, slot_len, value_dim), dtype) for _ in range(n_layers)]
        self.bytes_per_token = (n_layers * kv_heads * (head_dim + value_dim)
                                * torch.tensor([], dtype=dtype).element_size())

    def free(self, slot: int) -> None:
        """The slot's sequence left: its slot is free again and its pages go back to the system (pages never
        written are not resident, so handing them back costs nothing)."""
        self.manager.free(slot)
        for tensor in (*self.keys, *self.values):
            _hand_back(tensor, slot)

    def _lazy_zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n_bytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        memory = mmap.mmap(-1, max(n_bytes, 1))
        self._maps.append(memory)
        return torch.frombuffer(memory, dtype=torch.uint8, count=n_bytes).view(dtype).view(shape)

    @property
    def reserved_bytes(self) -> int:
        """Address space reserved (not resident: see the module docstring)."""
        return self.manager.n_slots * self.manager.slot_len * self.bytes_per_token


_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE
try:
    _libc = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:               # not glibc: pages stay with the process (correct, only less frugal)
    _libc = None


def _hand_back(tensor: torch.Tensor, slot: int) -> None:
    """Drop the resident pages of ``tensor[slot]`` (whole pages inside it; they read as zeros afterwards)."""
    if _libc is None:
        return
    size = tensor.stride(0) * tensor.element_size()
    start = tensor.data_ptr() + slot * size
    first, last = -(-start // _PAGE) * _PAGE, (start + size) // _PAGE * _PAGE
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)
