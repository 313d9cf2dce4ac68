"""An int8 dense part (``--dense-dtype int8``): the big projections and ``lm_head`` run by ONNX Runtime's
``MatMulNBits`` over int8 blocks, the same kernel and packing as the int8 expert functions, float32 in and out.

Each weight is quantized as it is loaded (asymmetric int8 in blocks of 128 along the input dimension,
:func:`~faasmoe.router.store.quantize.quantize_matrix`) into a one-node ONNX Runtime session that prepacks it;
in a router process the sessions share one thread pool (:func:`use_global_pool`). On this machine's CPU, whose
bfloat16 matrix products are no faster
than float32 (no bfloat16 instructions: BENCHMARKS §7), it reads a bit over a quarter of the float32 bytes:
the 151936 x 2048 ``lm_head`` took ~22 ms against ~45 ms in float32. The embedding table is stored in bfloat16 (a
row lookup); the residual stream, norms, gate and KV cache stay float32. Not exact (int8 weights, and int8
activations per block inside the kernel); its fidelity is measured (§7.3).
"""

from __future__ import annotations

import ctypes
import logging
import os
import tempfile

import numpy as np
import torch

from faasmoe.proto import ort_session
from faasmoe.proto.errors import CheckpointError
from faasmoe.proto.function_abi import Precision
from faasmoe.router.model.bf16 import Bf16Embedding, swap_projections
from faasmoe.router.store.onnx_function import matmul_model
from faasmoe.router.store.quantize import quantize_matrix

log = logging.getLogger(__name__)
DENSE_INT8 = Precision("int8", 128)
_global_pool = False          # whether this process's ONNX Runtime sessions share one thread pool


def use_global_pool() -> bool:
    """Make this process's ONNX Runtime sessions share one thread pool of every core, and give torch one thread:
    torch's OpenMP workers and ORT's threads fight over the cores otherwise (measured at Qwen dims, 24 layers,
    router alone: 99.5 ms per token, against 170 ms with one ORT thread per session and 320 ms with both at two
    threads). Call it before the first session is made (the router's commands do, for ``--dense-dtype int8``);
    afterwards every session of the process must set ``use_per_session_threads = False`` (:func:`session_options`).
    Returns False when ONNX Runtime's environment exists already (then each session keeps one thread)."""
    global _global_pool
    try:
        from onnxruntime.capi._pybind_state import set_global_thread_pool_sizes
        set_global_thread_pool_sizes(len(os.sched_getaffinity(0)), 1)
    except (ImportError, RuntimeError) as err:
        log.info("ONNX Runtime sessions keep their own threads: %s", err)
        return False
    _global_pool = True
    torch.set_num_threads(1)
    return True


def uses_global_pool() -> bool:
    return _global_pool


def session_options():
    """Options for a session in this process: on the global pool once :func:`use_global_pool` set it up, else one
    thread of its own (what a library user, or a test process that also runs nodes, gets)."""
    return ort_session.session_options(1, global_pool=_global_pool)


class Int8Linear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = (None if linear.bias is None else
                     torch.nn.Parameter(linear.bias.detach().float(), requires_grad=False))
        self._session, self.weight_bytes = None, 0
        if linear.weight.device.type != "meta":          # a model with weights (benchmarks): quantize them now
            self.load_weight(linear.weight.detach())

    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` [out, in] and prepack it in its session (what the router calls while loading)."""
        import onnxruntime as ort
        arrays = quantize_matrix(np.ascontiguousarray(weight.float().numpy().T), DENSE_INT8)
        self.weight_bytes = sum(a.nbytes for a in arrays)
        # From a file, not bytes: ORT's Python session keeps the bytes it was made from (measured: 2.06 x the
        # int8 weights held from bytes, 1.06 x from a file)
        try:
            with tempfile.NamedTemporaryFile(suffix=".onnx", prefix="faasmoe-int8-") as fh:
                fh.write(matmul_model(arrays, self.in_features, self.out_features, DENSE_INT8))
                fh.flush()
                del arrays
                self._session = ort.InferenceSession(fh.name, session_options(), providers=["CPUExecutionProvider"])
        except (OSError, RuntimeError, *_ort_errors()) as exc:
            where = "" if not isinstance(exc, OSError) else f" in {tempfile.gettempdir()} (set TMPDIR)"
            raise CheckpointError(f"cannot prepare the int8 session of a {self.out_features}x{self.in_features} "
                                  f"dense weight{where}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
        _trim_malloc()                                  # the parsed model is freed: hand it back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._session is None:
            raise RuntimeError("Int8Linear used before its weight was loaded")
        shape = x.shape
        rows = np.ascontiguousarray(x.detach().float().reshape(-1, shape[-1]).numpy())
        out = torch.from_numpy(self._session.run(None, {"x": rows})[0])
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


def store_in_int8(model) -> None:
    """Swap a model's projections and ``lm_head`` for :class:`Int8Linear` and its embedding table
    for a bfloat16 one (meta device: weights come through ``load_weight``; with weights: quantized now)."""
    swap_projections(model, Int8Linear)
    if not model.config.tie_word_embeddings:            # a tied table stays float32 and so does lm_head
        model.model.embed_tokens = Bf16Embedding(model.model.embed_tokens)
        model.lm_head = Int8Linear(model.lm_head)


def _ort_errors() -> tuple[type, ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state
    return tuple(getattr(state, n) for n in ("Fail", "InvalidArgument", "InvalidGraph", "NoSuchFile",
                                             "RuntimeException") if hasattr(state, n))


def _trim_malloc() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
