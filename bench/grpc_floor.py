"""The floor under a mesh layer step on this machine: a Python-gRPC round trip on loopback with nothing else
in it (unary call vs one frame on an open bidi stream, the server idle or doing some work per message), and
one ONNX Runtime run of an expert function (same session again and again vs cycling through a store's
functions, as a node does). No faasmoe code on the gRPC side: an echo server in a child process.

    python bench/grpc_floor.py [--store STORE] [--payload-bytes 1100] [--work-us 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import grpc

from report import print_flat, save

UNARY, STREAM = "/echo.Echo/Unary", "/echo.Echo/Stream"


def _serve(port_queue, work_s: float) -> None:
    def work():
        end = time.perf_counter() + work_s
        while time.perf_counter() < end:     # CPU work holding the GIL, like a node's ONNX call + framing
            pass

    async def unary(request, context):
        work()
        return request

    async def stream(requests, context):
        while (request := await context.read()) is not grpc.aio.EOF:
            work()
            await context.write(request)

    async def main():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo.Echo", {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_stream_rpc_method_handler(stream)}),))
        port_queue.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _round_trips_us(port: int, payload: bytes, n: int) -> dict:
    sync_channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    unary = sync_channel.unary_unary(UNARY)
    loop = asyncio.new_event_loop()

    async def open_stream():
        return grpc.aio.insecure_channel(f"127.0.0.1:{port}").stream_stream(STREAM)()

    call = loop.run_until_complete(open_stream())

    async def exchange():
        await call.write(payload)
        return await call.read()

    def timed(fn) -> float:
        for _ in range(n // 10):
            fn()
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return round(statistics.median(samples) * 1e6, 1)

    result = dict(unary_us=timed(lambda: unary(payload, timeout=10)),
                  stream_us=timed(lambda: loop.run_until_complete(exchange())))
    sync_channel.close()
    return result


def _ort_runs_us(store: Path, n_cycles: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    manifest = json.loads((store / "manifest.json").read_text())
    from faasmoe.proto.ort_session import session_options
    opts = session_options(1)
    sessions = [ort.InferenceSession(str(store / f["file"]), opts, providers=["CPUExecutionProvider"])
                for f in manifest["functions"]]
    hidden = np.ones((1, manifest["hidden_size"]), np.float32)

    def feeds(session):
        names = [i.name for i in session.get_inputs()][1:]
        return {"hidden": hidden, **{name: np.array([0] if j == 0 else [], np.int64) for j, name in enumerate(names)}}

    all_feeds = [feeds(s) for s in sessions]
    for s, f in zip(sessions, all_feeds):
        s.run(["out"], f)
    t0 = time.perf_counter()
    for _ in range(n_cycles):
        for s, f in zip(sessions, all_feeds):
            s.run(["out"], f)
    cycling = (time.perf_counter() - t0) / (n_cycles * len(sessions))
    t0 = time.perf_counter()
    for _ in range(n_cycles * len(sessions)):
        sessions[0].run(["out"], all_feeds[0])
    same = (time.perf_counter() - t0) / (n_cycles * len(sessions))
    return dict(functions=len(sessions), group_size=manifest["group_size"],
                ort_run_same_session_us=round(same * 1e6, 1), ort_run_cycling_us=round(cycling * 1e6, 1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--payload-bytes", type=int, default=1100, help="one token row of hidden 256 + header")
    p.add_argument("--work-us", type=float, default=300.0, help="server work per message in the 2nd run")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--store", help="a split store: also time ONNX Runtime runs of its functions")
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    result = dict(payload_bytes=args.payload_bytes)
    for label, work_s in (("idle", 0.0), (f"work{args.work_us:g}us", args.work_us / 1e6)):
        ports = ctx.Queue()
        server = ctx.Process(target=_serve, args=(ports, work_s), daemon=True)
        server.start()
        try:
            trips = _round_trips_us(ports.get(timeout=30), b"x" * args.payload_bytes, args.n)
        finally:
            server.terminate()
        result.update({f"{k[:-3]}_{label}_us": v for k, v in trips.items()})
    if args.store:
        result.update(_ort_runs_us(Path(args.store), 5))
    save("grpc_floor", result)
    print_flat(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
