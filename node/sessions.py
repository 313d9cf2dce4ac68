"""ONNX Runtime sessions of expert functions: create (with warm-up) and run. Worker-thread safe."""

from __future__ import annotations

import ctypes
import time

import numpy as np
import onnxruntime as ort
import psutil

from faasmoe.node.store import FunctionInfo
from faasmoe.proto.frames import Call
from faasmoe.proto import function_abi as abi
from faasmoe.proto.errors import InvalidRequest
from faasmoe.proto.ort_session import session_options

INLINE_MAX_MACS = 1_000_000   # calls this small (rows x expert weights) run on the event loop, not a worker


def is_tiny(call: Call, info: FunctionInfo) -> bool:
    """A run this small costs less than the hand-off to a worker thread."""
    return len(call.rows) * info.params_per_expert <= INLINE_MAX_MACS


def create_session(info: FunctionInfo, threads: int, proc: psutil.Process):
    """Create and warm up a session (worker thread). Returns (session, seconds, RSS delta bytes)."""
    t0, rss0 = time.perf_counter(), proc.memory_info().rss
    session = ort.InferenceSession(str(info.path), session_options(threads), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    if names != {abi.HIDDEN_INPUT, *info.rows_inputs}:
        raise InvalidRequest(f"inputs {sorted(names)} do not follow the function ABI for {len(info.expert_ids)} "
                             "experts")
    feeds = {name: np.zeros(0, np.int64) for name in info.rows_inputs}
    feeds[info.rows_inputs[0]] = np.zeros(1, np.int64)
    session.run([abi.OUTPUT], {abi.HIDDEN_INPUT: np.zeros((1, info.hidden_size), np.float32), **feeds})
    # Parsing the file and prepacking leave about the file's size of freed heap behind (quantized blocks are
    # small allocations, below the mmap threshold): measured, an int8 session held 1.9-2.2 x its file in RSS
    # until trimmed, 1.07 x after. Hand it back now, so a loaded function costs what it holds.
    trim_malloc()
    return session, time.perf_counter() - t0, proc.memory_info().rss - rss0


def run_session(session: ort.InferenceSession, rows_inputs: tuple[str, ...], x: np.ndarray, rows, counts):
    rows_all, feeds, start = np.asarray(rows, dtype=np.int64), {abi.HIDDEN_INPUT: x}, 0
    for name, n in zip(rows_inputs, counts):
        feeds[name] = rows_all[start:start + n]
        start += n
    return session.run([abi.OUTPUT], feeds)[0]


def trim_malloc() -> None:
    """Hand freed heap pages back to the OS after a release (glibc; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
