"""The full 24-layer Qwen1.5-MoE-A2.7B-dimension model on this one machine: split, four edge-profile nodes,
the router with a bf16 dense part, driven through ``faasmoe-router serve`` and the official ``openai`` client;
and transformers on the same checkpoint inside a memory limit.

    python bench/qwen_checkpoint.py --out /work/scratch/qwen-24L --layers 24
    python bench/full_depth.py --checkpoint /work/scratch/qwen-24L --experts int4
    python bench/full_depth.py --checkpoint /work/scratch/qwen-24L --experts int8 --transformers none

1. ``faasmoe split --experts P`` in a child process (its peak RSS sampled at 10 Hz), unless the store exists.
2. Four ``faasmoe-node --profile rpi5-8gb`` processes on loopback (the profile's 5.5 GiB budget; ``--threads 1``
   because this host has two cores for four nodes and the router), keep-alive from the profile.
3. ``faasmoe-router serve --dense-dtype bfloat16 --warm`` (every placed function loaded first; ``--cold``: loaded on
   first use, as scale-to-zero leaves them); the first request's cold starts are counted; then for each
   client count, every client sends ``--requests`` streamed greedy completions of ``--max-tokens`` tokens (token-id
   prompts: the checkpoint has no tokenizer), time to first token and time per output token from the stream.
   The RSS of every process is sampled at 4 Hz throughout (peak per process, and of their sum).
4. transformers (``AutoModelForCausalLM``, float32 and bfloat16) in a cgroup with ``--limit-gb`` of memory, so it
   cannot take the machine down: what happens is reported (killed by the cgroup's OOM killer, or its time).

Prints a table; writes bench/out/<name>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from faasmoe.proto.ready import ROUTER_READY, parse_ready
from report import save

REPO = Path(__file__).resolve().parents[1]
PROFILE, PROFILE_BUDGET_MB = "rpi5-8gb", 5632


def peak_rss_of(cmd: list[str], hz: float = 10.0, **popen) -> tuple[int, float, int]:
    """Run ``cmd``; return (exit code, seconds, peak RSS bytes of it and its children)."""
    t0, peak = time.perf_counter(), 0
    proc = subprocess.Popen(cmd, **popen)
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(1 / hz)
    return proc.returncode, time.perf_counter() - t0, peak


def split_store(args) -> tuple[Path, dict]:
    label = args.experts + (f"-b{args.block_size}" if args.block_size else "")
    store = Path(args.work_dir) / f"store-{Path(args.checkpoint).name}-{label}"
    if (store / "manifest.json").exists():
        return store, {"reused": True}
    cmd = [sys.executable, "-m", "faasmoe.router.cli.umbrella", "split", args.checkpoint, "--out", str(store),
           "--experts", args.experts, "--no-progress", *(["--block-size", str(args.block_size)] if args.block_size else [])]
    code, seconds, peak = peak_rss_of(cmd)
    if code != 0:
        sys.exit(f"error: split failed ({code})")
    return store, {"reused": False, "seconds": round(seconds, 1), "peak_rss_gib": round(peak / 2**30, 3)}


async def one_request(client, prompt, max_tokens) -> dict:
    t0, marks = time.perf_counter(), []
    stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, logprobs=0, extra_body={"ignore_eos": True})
    precision = None
    async for chunk in stream:
        precision = chunk.model_extra.get("faasmoe_precision", precision)
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.tokens:
                marks += [time.perf_counter()] * len(choice.logprobs.tokens)
    return {"ttft_s": marks[0] - t0, "tpot_s": (marks[-1] - marks[0]) / max(1, len(marks) - 1), "tokens": len(marks),
            "precision": precision}


async def load(url, clients: int, requests: int, max_tokens: int) -> tuple[float, list[dict]]:
    import openai
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600) as client:
        async def closed_loop(c):
            return [await one_request(client, [(7919 * (c * requests + r) + 13 * i) % 150000 + 100 for i in range(16)],
                                      max_tokens) for r in range(requests)]
        t0 = time.perf_counter()
        results = await asyncio.gather(*(closed_loop(c) for c in range(clients)))
        return time.perf_counter() - t0, [r for per in results for r in per]


def wait_healthy(url: str, timeout_s: float) -> None:
    import httpx
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"error: the router was not healthy within {timeout_s:.0f} s")
        time.sleep(1)


def router_counter(url: str, name: str) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.name == name and not s.labels:
                return s.value
    return 0.0


def mesh_phase(args, store: Path) -> dict:
    from faasmoe.router.control.local_mesh import LocalMesh
    from faasmoe.router.evaluation.sampler import ProcessSampler, integrate
    out: dict = {"runs": {}}
    extra = ["--profile", PROFILE, "--threads", str(args.node_threads)]
    with tempfile.TemporaryDirectory() as tmp, LocalMesh(4, Path(tmp), memory_budget_mb=PROFILE_BUDGET_MB,
                                                          extra_args=extra) as mesh:
        router = subprocess.Popen([sys.executable, "-m", "faasmoe.router", "serve", "--store", str(store), "--nodes",
                                   ",".join(mesh.addresses), "--port", "0", "--model-name", "bench",
                                   "--dense-dtype", args.dense_dtype, "--replicas", args.replicas,
                                   "--max-batch", "16", "--step-timeout-s", "600", "--frame-timeout-s", "300",
                                   *([] if args.cold else ["--warm"])],
                                  stdout=subprocess.PIPE, text=True)
        roles = {router.pid: "router", **{n.process.pid: f"node-{i}" for i, n in enumerate(mesh.nodes)}}
        sampler = ProcessSampler(roles, hz=4.0).start()
        try:
            t0 = time.perf_counter()
            line = router.stdout.readline()
            info = parse_ready(line, ROUTER_READY)
            if info is None:
                sys.exit(f"error: the router did not start: {line!r}")
            url = info["url"]
            out["router_ready_s"] = round(time.perf_counter() - t0, 1)
            wait_healthy(url, 3600)                             # every function deployed on a node
            out["placed_s"] = round(time.perf_counter() - t0, 1)
            t1 = time.perf_counter()
            _, first = asyncio.run(load(url, 1, 1, 8))
            out["first_request"] = {"seconds": round(time.perf_counter() - t1, 1),
                                    "cold_starts": router_counter(url, "faasmoe_router_cold_starts_total"),
                                    "precision": first[0]["precision"]}
            for clients in args.clients:
                cold0 = router_counter(url, "faasmoe_router_cold_starts_total")
                wall_s, results = asyncio.run(load(url, clients, args.requests, args.max_tokens))
                out["runs"][clients] = {
                    "tokens_per_s": round(sum(r["tokens"] for r in results) / wall_s, 3),
                    "ttft_s_p50": round(statistics.median(r["ttft_s"] for r in results), 3),
                    "tpot_ms_p50": round(1000 * statistics.median(r["tpot_s"] for r in results), 1),
                    "tpot_ms_max": round(1000 * max(r["tpot_s"] for r in results), 1),
                    "cold_starts": router_counter(url, "faasmoe_router_cold_starts_total") - cold0,
                    "requests": len(results)}
                print(f"mesh: {clients} clients: {out['runs'][clients]}", file=sys.stderr, flush=True)
        finally:
            samples = sampler.stop()
            router.send_signal(signal.SIGTERM)
            router.wait(120)
    usage = integrate(samples)
    out["memory"] = {"peak_total_gib": round(usage["peak_gb"] * 1e9 / 2**30, 2),
                     "peak_gib": {p["role"]: round(p["peak_gb"] * 1e9 / 2**30, 2) for p in usage["processes"].values()}}
    return out


def transformers_phase(args) -> dict:
    """transformers loads the checkpoint and generates 8 tokens, in a cgroup limited to --limit-gb, per dtype."""
    from faasmoe.router.evaluation.sampler import Cgroup
    out = {}
    for dtype in args.transformers.split(","):
        group = Cgroup.create(f"tf-{dtype}")
        if group is None:
            out[dtype] = {"outcome": "not run: no cgroup could be made (needs root and cgroup v1 memory)"}
            continue
        try:
            (group.dirs[0] / "memory.limit_in_bytes").write_text(str(int(args.limit_gb * 2**30)))
            code = ("import sys, time, torch; from transformers import AutoModelForCausalLM; t = time.time(); "
                    f"m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.{dtype}).eval(); "
                    "ids = torch.tensor([[100 + i for i in range(16)]]); "
                    "m.generate(ids, max_new_tokens=8, do_sample=False); print(time.time() - t)")
            exit_code, seconds, peak = peak_rss_of([*group.prefix(), sys.executable, "-c", code, args.checkpoint],
                                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            max_usage = int((group.dirs[0] / "memory.max_usage_in_bytes").read_text())
            oom = (group.dirs[0] / "memory.oom_control").read_text()
            killed = exit_code == -signal.SIGKILL
            out[dtype] = {"exit_code": exit_code, "seconds": round(seconds, 1), "peak_rss_gib": round(peak / 2**30, 2),
                          "cgroup_max_usage_gib": round(max_usage / 2**30, 2), "limit_gib": args.limit_gb,
                          "outcome": "killed by the cgroup's OOM killer" if killed else
                          ("ran" if exit_code == 0 else f"failed ({exit_code})"), "oom_control": oom.split()}
            print(f"transformers {dtype}: {out[dtype]['outcome']} after {seconds:.0f} s", file=sys.stderr, flush=True)
        finally:
            group.remove()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--experts", choices=["int4", "int8", "fp32"], default="int4")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--dense-dtype", choices=["float32", "bfloat16", "int8"], default="bfloat16")
    p.add_argument("--replicas", choices=["1", "2", "auto"], default="auto")
    p.add_argument("--node-threads", type=int, default=1)
    p.add_argument("--cold", action="store_true", help="no --warm: functions load on their first call (serverless)")
    p.add_argument("--clients", default="1,8")
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--transformers", default="float32,bfloat16", help="dtypes to try, or 'none'")
    p.add_argument("--no-mesh", action="store_true", help="only the transformers phase")
    p.add_argument("--limit-gb", type=float, default=20.0, help="transformers' memory limit (GiB)")
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "faasmoe-bench"))
    p.add_argument("--name", default=None)
    args = p.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    sys.path.insert(0, str(REPO))
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    store, split = split_store(args)
    from faasmoe.router.store.manifest import load_manifest
    manifest = load_manifest(store)
    result = {"checkpoint": args.checkpoint, "layers": manifest.num_layers, "experts": manifest.precision.label,
              "dense_dtype": args.dense_dtype, "function_gib": round(manifest.function_bytes / 2**30, 2),
              "footprint_gib": round(sum(f.footprint_bytes for f in manifest.functions) / 2**30, 2),
              "dense_file_gib": round(manifest.dense_bytes / 2**30, 2), "split": split,
              "nodes": f"4 x {PROFILE} ({PROFILE_BUDGET_MB} MiB budget, --threads {args.node_threads})"}
    if not args.no_mesh:
        result["mesh"] = mesh_phase(args, store)
    if args.transformers != "none":
        result["transformers"] = transformers_phase(args)
    name = args.name or (f"full-depth-{manifest.num_layers}L-{manifest.precision.label}-{args.dense_dtype}"
                         + ("-cold" if args.cold else "") + ("-transformers" if args.no_mesh else ""))
    print(json.dumps(result, indent=1))
    print(f"wrote {save(name, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
