"""Time per output token: the mesh (N local nodes) over transformers' own generate(), same model and prompt,
measured in one run; plus router RSS over dense bytes, a node's idle RSS, and where a decode step goes.

    python bench/mesh_vs_transformers.py --model ../shared/models/qwen2moe-tiny-code      # (a) trained tiny
    python bench/mesh_vs_transformers.py --full-dims                                       # (b) Qwen1.5-MoE dims, 2 layers

Each phase runs in its own process (so RSS figures are clean); results print as a table and go to
bench/out/<name>.json. The mesh is measured in steady state, served by the engine: after placement every function is loaded
(``RouterSession.warm``), then one warm-up generation, then the timed one. ``--pin`` keeps the router on the
first CPU and the nodes on the others, as if the nodes were other devices.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from report import print_flat, save

FULL_DIMS = dict(num_layers=2, hidden_size=2048, num_experts=60, top_k=4, moe_intermediate_size=1408,
                 shared_expert_intermediate_size=5632, vocab_size=151936, num_attention_heads=16,
                 num_key_value_heads=16, norm_topk_prob=False, seed=1234)
PROMPT = "def quicksort(xs):\n    "


def _prompt_ids(store_or_model: Path, n_fallback: int = 12) -> list[int]:
    ids = []
    if (Path(store_or_model) / "tokenizer.json").exists():
        from transformers import AutoTokenizer
        ids = AutoTokenizer.from_pretrained(str(store_or_model))(PROMPT)["input_ids"]
    return ids or [(i * 7919) % 1000 + 10 for i in range(n_fallback)]


class StepClock:
    """A transformers streamer that records when generate() emits the prompt and each new token."""

    def __init__(self):
        self.marks_s: list[float] = []

    def put(self, value):
        self.marks_s.append(time.perf_counter())

    def end(self):
        pass

    def step_times_s(self) -> list[float]:
        return [b - a for a, b in zip(self.marks_s, self.marks_s[1:])]


def _timed_generate(model, ids: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    import torch
    clock = StepClock()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, streamer=clock, pad_token_id=0)
    return out[0, len(ids):].tolist(), clock.step_times_s()


def phase_transformers(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(args.torch_threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = _prompt_ids(Path(args.model))
    _timed_generate(model, ids, 8)                                    # warm up
    tokens, steps = _timed_generate(model, ids, args.new_tokens)
    return dict(token_ids=tokens, decode_s=steps[1:], prefill_s=steps[0],
                rss_bytes=psutil.Process().memory_info().rss)


async def _engine_tokens(engine, ids, new_tokens):
    """Greedy tokens of one request through ``engine`` with the time of each (the first: time to first token);
    end-of-sequence tokens do not stop it, as min_new_tokens does not for transformers."""
    from faasmoe.router.engine.generate import generate_one
    saved, engine.eos_ids = engine.eos_ids, frozenset()
    try:
        out = await generate_one(engine, ids, new_tokens)
    finally:
        engine.eos_ids = saved
    return out.token_ids, out.step_s


def phase_mesh(args) -> dict:
    import asyncio

    import torch

    from faasmoe.router.control.local_mesh import LocalMesh
    from faasmoe.router.control.placement import PlacementOptions
    from faasmoe.router.control.session import RouterSession
    from faasmoe.router.engine.serving import start_serving
    from faasmoe.router.mesh.stats import MeshStats
    from faasmoe.router.model.build import dense_bytes
    torch.set_num_threads(args.torch_threads)
    store = Path(args.store)
    ids = _prompt_ids(store)
    extra = ["--threads", str(args.node_threads), "--keep-alive-s", "inf"]
    prefix = ()
    if args.pin:        # router on the first CPU, nodes on the others: as if the nodes were other devices
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cpus[:1])
        prefix = ("taskset", "-c", ",".join(str(c) for c in cpus[1:]))

    async def run(mesh):
        session = RouterSession(store, placement_options=PlacementOptions(max_replicas=args.max_replicas))
        await asyncio.to_thread(session.place_and_deploy, mesh.addresses)
        warmed = await asyncio.to_thread(session.warm)           # steady state: every function loaded
        rss_before_model = psutil.Process().memory_info().rss
        serving = await start_serving(session)
        try:
            router_rss = psutil.Process().memory_info().rss
            await _engine_tokens(serving.engine, ids, 8)         # warm up
            serving.mesh.stats = MeshStats()
            tokens, steps = await _engine_tokens(serving.engine, ids, args.new_tokens)
            return (tokens, steps, serving.mesh.stats, warmed, router_rss, rss_before_model,
                    dense_bytes(serving.model))
        finally:
            await serving.close()
            session.close()

    with tempfile.TemporaryDirectory() as tmp, LocalMesh(args.nodes, Path(tmp), memory_budget_mb=args.node_budget_mb,
                                                          extra_args=extra, prefix=prefix) as mesh:
        node_idle_rss = [psutil.Process(n.process.pid).memory_info().rss for n in mesh.nodes]
        tokens, steps, stats, warmed, router_rss, rss_before_model, dense = asyncio.run(run(mesh))
        node_rss = [psutil.Process(n.process.pid).memory_info().rss for n in mesh.nodes]
    decode_total_s = sum(steps[1:])
    per_step = stats.layer_calls / max(1, len(steps))
    return dict(token_ids=tokens, decode_s=steps[1:], prefill_s=steps[0], router_rss_bytes=router_rss,
                router_model_rss_bytes=router_rss - rss_before_model,
                dense_bytes=dense, node_idle_rss_bytes=node_idle_rss, node_loaded_rss_bytes=node_rss,
                rpcs_per_token=stats.rpcs / len(steps), layer_calls_per_token=per_step,
                mesh_wall_s=stats.wall_s, node_compute_s=stats.node_compute_s, encode_s=stats.encode_s,
                wait_s=stats.wait_s, decode_reply_s=stats.decode_s, total_s=sum(steps),
                decode_total_s=decode_total_s, warmed=warmed, cold_starts=stats.cold_starts)


class _StubExperts:
    """Routed experts stubbed out (zeros), optionally waiting asleep or busy: the router's floor."""

    def __init__(self, wait=None):
        self.wait = wait

    async def submit(self, layer, hidden, top_k_index, top_k_weights, ctx):
        return hidden

    async def collect(self, hidden):
        import torch
        if self.wait is not None:
            self.wait(0.0005)
        return torch.zeros_like(hidden)


def phase_router_floor(args) -> dict:
    """The router alone, routed experts stubbed out (zeros): its dense part per token, and the same with
    the stub waiting 0.5 ms per layer asleep vs busy (what an idle core costs when it comes back)."""
    import asyncio

    import torch
    from transformers import AutoTokenizer

    from faasmoe.router.engine.engine import Engine
    from faasmoe.router.model.build import build_mesh_model
    from faasmoe.router.model.runner import ModelRunner
    from faasmoe.router.store.manifest import load_manifest
    torch.set_num_threads(args.torch_threads)
    if args.pin:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
    store = Path(args.store)
    model = build_mesh_model(store, load_manifest(store))
    tokenizer = AutoTokenizer.from_pretrained(str(store)) if (store / "tokenizer.json").exists() else None
    ids = _prompt_ids(store)

    def busy(seconds):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    async def one(wait):
        async with Engine(ModelRunner(model, _StubExperts(wait)), tokenizer) as engine:
            await _engine_tokens(engine, ids, 8)
            _, steps = await _engine_tokens(engine, ids, args.new_tokens)
        return statistics.median(steps[1:])

    return {name: asyncio.run(one(wait)) for name, wait in (("zero", None), ("sleep500us", time.sleep),
                                                             ("busy500us", busy))}


def build_full_dims(root: Path) -> Path:
    from faasmoe.router.store.tiny_model import make_checkpoint
    model_dir = root / "qwen-moe-dims-2l"
    if not (model_dir / "config.json").exists():
        make_checkpoint(model_dir, with_tokenizer=False, **FULL_DIMS)
    return model_dir


def run_phase(name: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--phase", name, *argv], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: phase {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="Hugging Face MoE model directory (a supported family)")
    p.add_argument("--full-dims", action="store_true", help="Qwen1.5-MoE dims cut to 2 layers, random weights")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "faasmoe-bench"))
    p.add_argument("--store")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--node-threads", type=int, default=1)
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--max-replicas", type=int, default=3)
    p.add_argument("--node-budget-mb", type=float, default=2048)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--pin", action="store_true",
                   help="mesh phase: router pinned to the first CPU, nodes to the others (needs >= 2 CPUs)")
    p.add_argument("--name")
    p.add_argument("--phase", choices=["transformers", "mesh", "router_floor"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        phases = dict(transformers=phase_transformers, mesh=phase_mesh, router_floor=phase_router_floor)
        print(json.dumps(phases[args.phase](args)))
        return 0
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_full_dims(work) if args.full_dims else Path(args.model)
    name = args.name or ("full-dims-2l" if args.full_dims else model_dir.name)
    store = work / f"store-{name}-G{args.group_size}"
    from faasmoe.router.store.split import ensure_split
    ensure_split(model_dir, store, args.group_size)
    common = ["--model", str(model_dir), "--store", str(store), "--nodes", str(args.nodes),
              "--node-threads", str(args.node_threads), "--torch-threads", str(args.torch_threads),
              "--max-replicas", str(args.max_replicas), "--node-budget-mb", str(args.node_budget_mb),
              "--new-tokens", str(args.new_tokens), "--group-size", str(args.group_size)] + (["--pin"] if args.pin else [])
    tf = run_phase("transformers", common)
    mesh = run_phase("mesh", common)
    floor = run_phase("router_floor", common)
    tf_ms, mesh_ms = 1000 * statistics.median(tf["decode_s"]), 1000 * statistics.median(mesh["decode_s"])
    router_compute_s = mesh["total_s"] - mesh["mesh_wall_s"]
    dispatch_s = mesh["mesh_wall_s"] - mesh["node_compute_s"]
    result = dict(
        name=name, group_size=args.group_size, nodes=args.nodes, node_threads=args.node_threads, pinned=args.pin,
        torch_threads=args.torch_threads, cold_starts_measured=mesh["cold_starts"], warmed=mesh["warmed"],
        max_replicas=args.max_replicas, new_tokens=args.new_tokens,
        transformers_ms_per_token=round(tf_ms, 2), mesh_ms_per_token=round(mesh_ms, 2),
        ratio_mesh_over_transformers=round(mesh_ms / tf_ms, 3),
        tokens_identical=tf["token_ids"] == mesh["token_ids"],
        router_rss_over_dense=round(mesh["router_rss_bytes"] / mesh["dense_bytes"], 3),
        router_model_rss_over_dense=round(mesh["router_model_rss_bytes"] / mesh["dense_bytes"], 3),
        router_rss_mib=round(mesh["router_rss_bytes"] / 2**20, 1), dense_mib=round(mesh["dense_bytes"] / 2**20, 1),
        transformers_rss_mib=round(tf["rss_bytes"] / 2**20, 1),
        node_idle_rss_mib=round(statistics.median(mesh["node_idle_rss_bytes"]) / 2**20, 1),
        node_loaded_rss_mib=[round(b / 2**20, 1) for b in mesh["node_loaded_rss_bytes"]],
        rpcs_per_token=round(mesh["rpcs_per_token"], 2),
        router_alone_ms_per_token=round(1000 * floor["zero"], 2),
        router_stub_sleep500us_ms_per_token=round(1000 * floor["sleep500us"], 2),
        router_stub_busy500us_ms_per_token=round(1000 * floor["busy500us"], 2),
        share_router_compute=round(router_compute_s / mesh["total_s"], 3),
        share_dispatch=round(dispatch_s / mesh["total_s"], 3),
        share_node_compute=round(mesh["node_compute_s"] / mesh["total_s"], 3),
    )
    save(f"mesh_vs_transformers-{name}", result)
    print_flat(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
