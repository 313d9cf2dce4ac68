"""One sequence's KV cache: per attention layer, key and value buffers ``[1, kv_heads, capacity, head_dim]``
that grow by doubling up to the sequence's maximum length. A step appends its tokens layer by layer;
:meth:`SequenceCache.commit` makes them part of the sequence and :meth:`SequenceCache.rollback` forgets a step
that failed half-way (some layers appended, others not), so the step can be run again or the sequence failed
without a trace.
"""

from __future__ import annotations

import torch

MIN_CAPACITY = 32


class SequenceCache:
    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, max_len: int):
        self.kv_heads, self.head_dim, self.dtype, self.max_len = kv_heads, head_dim, dtype, max_len
        self.length = 0                               # committed tokens (every layer holds them)
        self._layer_len = [0] * n_layers
        self._keys: list[torch.Tensor | None] = [None] * n_layers
        self._values: list[torch.Tensor | None] = [None] * n_layers

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``[1, kv_heads, n, head_dim]`` keys and values to ``layer``; returns that layer's keys and values
        so far (views of the buffers)."""
        start, n = self._layer_len[layer], keys.shape[2]
        end = start + n
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > the sequence's maximum of {self.max_len}")
        buf_k, buf_v = self._keys[layer], self._values[layer]
        if buf_k is None or buf_k.shape[2] < end:
            capacity = min(self.max_len, max(MIN_CAPACITY, end, 2 * (0 if buf_k is None else buf_k.shape[2])))
            new_k = torch.empty((1, self.kv_heads, capacity, self.head_dim), dtype=self.dtype)
            new_v = torch.empty_like(new_k)
            if buf_k is not None:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = buf_v[:, :, :start]
            self._keys[layer], self._values[layer] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, start:end] = keys
        buf_v[:, :, start:end] = values
        self._layer_len[layer] = end
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def commit(self) -> None:
        """The step finished on every layer: its tokens are the sequence's."""
        self.length = self._layer_len[0]
        if any(n != self.length for n in self._layer_len):
            raise RuntimeError(f"KV cache layers out of step: {self._layer_len}")

    def rollback(self) -> None:
        """Forget what a failed step appended."""
        self._layer_len = [self.length] * len(self._layer_len)

    def release(self) -> None:
        self._keys = [None] * len(self._keys)
        self._values = [None] * len(self._values)
