"""Serverless figures: cold start per function vs group size (p50/p99), invocations and time per output
token vs group size, and total node memory over time through idle -> burst -> idle (PNG, keep-alive marked).

    python bench/serverless.py --model ../shared/models/qwen2moe-tiny-code            # trained tiny model
    python bench/serverless.py --full-layer                                            # one Qwen1.5-MoE layer

Writes bench/out/serverless-<name>.json (and serverless-memory-<name>.png); prints tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from report import OUT, save

FULL_LAYER = dict(num_layers=1, hidden_size=2048, num_experts=60, top_k=4, moe_intermediate_size=1408,
                  shared_expert_intermediate_size=5632, vocab_size=151936, num_attention_heads=16,
                  num_key_value_heads=16, seed=99)
GROUPS = (1, 2, 4, 15, 60)


def pct(values, q):
    return float(np.percentile(values, q)) if values else None


def split_for(model_dir: Path, work: Path, g: int) -> Path:
    from faasmoe.router.store.split import ensure_split
    return ensure_split(model_dir, work / f"store-{model_dir.name}-G{g}", g)


def cold_starts(store: Path, layer_only: int, repeats: int, budget_mb: float) -> list[float]:
    """Deploy one layer's functions to one node with keep-alive 0: every call is a cold start."""
    from faasmoe.proto import frames, methods
    from faasmoe.router.control.local_mesh import LocalMesh
    from faasmoe.router.control.apply import header_of
    from faasmoe.router.control.session import RouterSession
    from faasmoe.router.mesh.channel import make_channel
    from faasmoe.router.store.manifest import load_manifest
    manifest = load_manifest(store)
    fns = manifest.layer_functions(layer_only)
    loads = []
    with tempfile.TemporaryDirectory() as tmp, LocalMesh(1, Path(tmp), memory_budget_mb=budget_mb,
                                                          extra_args=["--keep-alive-s", "0"]) as mesh:
        session = RouterSession(store)
        client = session.client(mesh.addresses[0])
        channel = make_channel(mesh.addresses[0])
        invoke = methods.stub(channel, methods.INVOKE)          # one raw Invoke per call, synchronous
        x = np.zeros((1, manifest.hidden_size), np.float32)
        for f in fns:
            client.deploy(store / f.file, header_of(f, manifest.model_id))
        for _ in range(repeats):
            for f in fns:
                counts = [1] + [0] * (len(f.expert_ids) - 1)
                frame = frames.encode_request("bench", "bench", f.layer, x,
                                              [frames.Call(f.function_id, np.array([0], np.int32), counts)])
                header, _ = frames.decode_reply(invoke(frame, timeout=120))
                if header.HasField("error"):
                    raise RuntimeError(f"invoke {f.function_id[:12]}: {header.error.details}")
                assert header.results[0].cold_start
                loads.append(header.results[0].load_s)
        channel.close()
        session.close()
    return loads


def per_token(store: Path, prompt_ids: list[int], new_tokens: int, nodes: int) -> dict:
    """Steady decode through the engine on ``nodes`` local nodes: one short warm-up generation (its cold
    starts load the functions), then the timed one; end-of-sequence does not stop either."""
    import asyncio

    from faasmoe.router.control.local_mesh import LocalMesh
    from faasmoe.router.engine.serving import local_serving
    from faasmoe.router.mesh.stats import MeshStats
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from mesh_vs_transformers import _engine_tokens

    async def run(addresses):
        async with local_serving(store, addresses) as serving:
            await _engine_tokens(serving.engine, prompt_ids, 4)          # warm up
            serving.mesh.stats = MeshStats()
            _, steps = await _engine_tokens(serving.engine, prompt_ids, new_tokens)
            return steps, serving.mesh.stats

    with tempfile.TemporaryDirectory() as tmp, LocalMesh(nodes, Path(tmp), memory_budget_mb=4096,
                                                          extra_args=["--threads", "1"]) as mesh:
        steps, st = asyncio.run(run(mesh.addresses))
    return dict(ms_per_token=1000 * statistics.median(steps[1:]), rpcs_per_token=st.rpcs / len(steps),
                invocations_per_token=st.function_calls / len(steps))


def memory_timeline(store: Path, keep_alive_s: float, burst: int, png: Path, nodes: int = 3) -> dict:
    """Sample total node RSS at 10 Hz: idle (deployed, cold) -> burst of concurrent requests -> idle."""
    import asyncio

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from faasmoe.router.control.local_mesh import LocalMesh
    from faasmoe.router.engine.engine import EngineConfig
    from faasmoe.router.engine.generate import generate
    from faasmoe.router.engine.serving import local_serving
    samples, marks = [], {}

    async def run(mesh):
        procs = [psutil.Process(n.process.pid) for n in mesh.nodes]
        async with local_serving(store, mesh.addresses, EngineConfig(step_timeout_s=120)) as serving:
            stop = threading.Event()
            t0 = time.monotonic()

            def sample():
                while not stop.is_set():
                    samples.append((time.monotonic() - t0, sum(p.memory_info().rss for p in procs)))
                    stop.wait(0.1)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                await asyncio.sleep(3)                          # idle: deployed, nothing loaded
                marks["burst_start_s"] = time.monotonic() - t0
                prompts = [f"def task_{i}(x):" for i in range(burst)]
                await generate(serving.engine, serving.tokenizer, prompts, 8)   # concurrent requests, co-batched
                marks["burst_end_s"] = time.monotonic() - t0
                await asyncio.sleep(keep_alive_s + 4)          # past the keep-alive window: scaled to zero
            finally:
                stop.set()
                sampler.join()

    with tempfile.TemporaryDirectory() as tmp, LocalMesh(nodes, Path(tmp), memory_budget_mb=4096,
                                                          extra_args=["--keep-alive-s", str(keep_alive_s),
                                                                      "--threads", "1"]) as mesh:
        asyncio.run(run(mesh))
    ts = [t for t, _ in samples]
    mib = [b / 2**20 for _, b in samples]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(ts, mib, lw=1.5)
    ax.axvspan(marks["burst_start_s"], marks["burst_end_s"], color="orange", alpha=0.2, label="burst")
    ax.axvline(marks["burst_end_s"] + keep_alive_s, color="red", ls="--", label=f"keep-alive {keep_alive_s:g} s")
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"RSS of {nodes} nodes (MiB)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    idle = [m for t, m in zip(ts, mib) if t < marks["burst_start_s"]]
    after = [m for t, m in zip(ts, mib) if t > marks["burst_end_s"] + keep_alive_s + 2]
    return dict(idle_mib=round(statistics.median(idle), 1), peak_mib=round(max(mib), 1),
                after_keep_alive_mib=round(statistics.median(after), 1), png=str(png), **marks)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--full-layer", action="store_true", help="one Qwen1.5-MoE layer, random weights")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "faasmoe-bench"))
    p.add_argument("--groups", default=",".join(map(str, GROUPS)))
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--keep-alive-s", type=float, default=5.0)
    p.add_argument("--burst", type=int, default=24)
    args = p.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    groups = [int(g) for g in args.groups.split(",")]
    if args.full_layer:
        from faasmoe.router.store.tiny_model import make_checkpoint
        model_dir = work / "qwen-moe-dims-1l"
        if not (model_dir / "config.json").exists():
            make_checkpoint(model_dir, with_tokenizer=False, **FULL_LAYER)
    else:
        model_dir = Path(args.model)
    name = "full-layer" if args.full_layer else model_dir.name
    result = {"name": name, "cold_start": {}, "per_token": {}}
    print(f"{'G':>3} {'functions/layer':>15} {'cold p50 ms':>12} {'cold p99 ms':>12}"
          + ("" if args.full_layer else f" {'ms/token':>9} {'RPCs/token':>10} {'invocations/token':>17}"))
    for g in groups:
        store = split_for(model_dir, work, g)
        repeats = max(1, 30 // max(1, 60 // g))
        loads = cold_starts(store, 0, repeats, budget_mb=4096 if args.full_layer else 512)
        row = dict(functions_per_layer=-(-60 // g), cold_p50_ms=1000 * pct(loads, 50),
                   cold_p99_ms=1000 * pct(loads, 99), samples=len(loads))
        result["cold_start"][g] = row
        line = f"{g:>3} {row['functions_per_layer']:>15} {row['cold_p50_ms']:>12.1f} {row['cold_p99_ms']:>12.1f}"
        if not args.full_layer:
            from transformers import AutoTokenizer
            ids = AutoTokenizer.from_pretrained(str(store))("def quicksort(xs):")["input_ids"]
            pt = per_token(store, ids, args.new_tokens, nodes=3)
            result["per_token"][g] = pt
            line += f" {pt['ms_per_token']:>9.2f} {pt['rpcs_per_token']:>10.2f} {pt['invocations_per_token']:>17.2f}"
        print(line, flush=True)
    if not args.full_layer:
        OUT.mkdir(exist_ok=True)
        store = split_for(model_dir, work, 4)
        mem = memory_timeline(store, args.keep_alive_s, args.burst, OUT / f"serverless-memory-{name}.png")
        result["memory"] = mem
        print(f"node memory (3 nodes): idle {mem['idle_mib']} MiB, peak {mem['peak_mib']} MiB, "
              f"after keep-alive {mem['after_keep_alive_mib']} MiB -> {mem['png']}")
    save(f"serverless-{name}", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
