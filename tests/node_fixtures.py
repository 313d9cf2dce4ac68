"""Shared helpers for the node tests: real ONNX functions, real servers (in-process and subprocess)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from faasmoe.node.config import NodeConfig
from faasmoe.node.server import NodeServer
from faasmoe.proto import faasmoe_pb2 as pb
from faasmoe.proto import frames, methods
from faasmoe.proto.function_abi import FP32, Precision
from faasmoe.proto.ready import NODE_READY, parse_ready
from faasmoe.router.store.onnx_function import build_function

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]


def run_reference(gate_up: np.ndarray, down: np.ndarray, x: np.ndarray) -> np.ndarray:
    """One expert in numpy: down(silu(gate(x)) * up(x))."""
    inter = gate_up.shape[0] // 2
    gu = x @ gate_up.T
    g, u = gu[:, :inter], gu[:, inter:]
    return ((g / (1 + np.exp(-g))) * u) @ down.T


@dataclass
class Fn:
    data: bytes
    function_id: str
    layer: int
    expert_ids: list[int]
    gate_up: list[np.ndarray]
    down: list[np.ndarray]
    hidden_size: int

    def header(self, **overrides) -> pb.FunctionHeader:
        values = dict(function_id=self.function_id, size_bytes=len(self.data), layer=self.layer,
                      expert_ids=self.expert_ids, model_id="test", dtype="float32") | overrides
        return pb.FunctionHeader(**values)

    def call(self, rows, counts) -> frames.Call:
        return frames.Call(self.function_id, np.asarray(rows, np.int32), list(counts))

    def reference(self, hidden: np.ndarray, rows, counts) -> np.ndarray:
        rows, outs, start = np.asarray(rows), [], 0
        for j, n in enumerate(counts):
            outs.append(run_reference(self.gate_up[j], self.down[j], hidden[rows[start:start + n]].astype(np.float32)))
            start += n
        return np.concatenate(outs)


def make_function(seed: int = 0, layer: int = 0, n_experts: int = 2, hidden: int = 64, inter: int = 128,
                  precision: Precision = FP32) -> Fn:
    rng = np.random.default_rng(seed)
    gate_up = [rng.standard_normal((2 * inter, hidden), dtype=np.float32) * 0.05 for _ in range(n_experts)]
    down = [rng.standard_normal((hidden, inter), dtype=np.float32) * 0.05 for _ in range(n_experts)]
    experts = list(range(seed * 10, seed * 10 + n_experts))
    data = build_function(layer, experts, gate_up, down, model_id="test", precision=precision)
    return Fn(data, hashlib.sha256(data).hexdigest(), layer, experts, gate_up, down, hidden)


def chunks_of(fn: Fn, chunk_bytes: int = MIB, data: bytes | None = None, header: pb.FunctionHeader | None = None):
    data = fn.data if data is None else data
    yield pb.DeployChunk(header=header or fn.header(), data=data[:chunk_bytes])
    for offset in range(chunk_bytes, len(data), chunk_bytes):
        yield pb.DeployChunk(data=data[offset:offset + chunk_bytes])


class Stub:
    """Raw method callables on a channel (sync or aio): Invoke carries frames, the rest protobuf."""

    def __init__(self, channel):
        self.invoke = methods.stub(channel, methods.INVOKE)
        self.invoke_stream = methods.stub(channel, methods.INVOKE_STREAM)
        self.deploy = methods.stub(channel, methods.DEPLOY)
        self.undeploy = methods.stub(channel, methods.UNDEPLOY)
        self.load = methods.stub(channel, methods.LOAD)
        self.status = methods.stub(channel, methods.STATUS)


def frame(hidden: np.ndarray, calls, request_id: str = "r") -> bytes:
    return frames.encode_request(request_id, "tenant", 0, hidden, calls)


def fn_status(status: pb.StatusReply, function_id: str) -> pb.FunctionStatus:
    return next(f for f in status.functions if f.function_id == function_id)


async def wait_until(predicate, timeout_s: float = 10.0, what: str = "condition"):
    """Poll ``predicate`` (sync or async) until truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.005)


def config(tmp_path: Path, **overrides) -> NodeConfig:
    values = dict(store_dir=tmp_path / "store", memory_budget_bytes=256 * MIB, threads=1, mdns=False,
                  node_id="test-node") | overrides
    return NodeConfig(**values)


@contextlib.asynccontextmanager
async def running_node(tmp_path: Path, run_executor=None, **overrides):
    """An in-process node on 127.0.0.1 port 0 plus an aio channel to it: yields (node, stub)."""
    async with NodeServer(config(tmp_path, **overrides), run_executor=run_executor) as node:
        async with grpc.aio.insecure_channel(node.address) as channel:
            yield node, Stub(channel)


class GatedExecutor(ThreadPoolExecutor):
    """A real thread pool whose jobs wait for ``open()``: keeps calls in flight deterministically."""

    def __init__(self, workers: int = 1):
        super().__init__(workers)
        self.gate = threading.Event()
        self.entered = 0
        self._lock = threading.Lock()

    def open(self) -> None:
        self.gate.set()

    def submit(self, fn, /, *args, **kwargs):
        def gated():
            with self._lock:
                self.entered += 1
            self.gate.wait(30)
            return fn(*args, **kwargs)
        return super().submit(gated)


class NodeProcess:
    """``python -m faasmoe.node`` in a subprocess; waits for its READY line."""

    def __init__(self, *args: str, env: dict | None = None, timeout_s: float = 30.0):
        self.proc = subprocess.Popen([sys.executable, "-m", "faasmoe.node", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        self.stderr_lines: list[str] = []
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc.stdout, self._lines), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, None), daemon=True).start()
        self.ready = self._wait_ready(timeout_s)
        self.address, self.pid = self.ready["address"], self.ready["pid"]

    def _pump(self, stream, sink) -> None:
        for line in stream:
            (sink.put(line) if sink is not None else self.stderr_lines.append(line))
        if sink is not None:
            sink.put(None)

    def _wait_ready(self, timeout_s: float) -> dict:
        line = self._lines.get(timeout=timeout_s)
        info = parse_ready(line, NODE_READY) if line is not None else None
        if info is None:
            self.proc.kill()
            raise AssertionError(f"no READY line (got {line!r}); stderr: {''.join(self.stderr_lines)[-3000:]}")
        return info

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout_s)

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def node_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAASMOE_NODE_")}
    return env | extra


def cost(fn) -> int:
    """What a deployed function counts against a node's capacity."""
    from faasmoe.proto.function_abi import resident_estimate_bytes
    return resident_estimate_bytes(len(fn.data))
