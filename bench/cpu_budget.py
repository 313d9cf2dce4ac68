"""Where a batched decode step's CPU goes, mesh against transformers, on one machine: the engine in-process over
``--nodes`` local node processes (every function loaded), N greedy sequences of ``--max-tokens`` tokens, and
transformers' padded batched ``generate`` of the same prompts, one after the other. For each: wall time per
step and CPU time per step (the router process, the node processes, transformers' process, all threads; from
the kernel's counters). On a machine of C cores a step cannot take less than its CPU time / C, so the table
says how far the mesh's CPU work alone lets it come to transformers here, whatever the scheduling.

    python bench/cpu_budget.py --store STORE --model MODEL_DIR [--sequences 8] [--nodes 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import psutil
import torch

from report import print_flat, save
from serving import CODE_PROMPTS

PROMPTS = CODE_PROMPTS            # the serving benchmark's prompts


def cpu_s(procs) -> float:
    total = 0.0
    for p in procs:
        t = p.cpu_times()
        total += t.user + t.system
    return total


async def mesh_phase(store: Path, nodes, n: int, max_tokens: int) -> dict:
    from faasmoe.router.engine.engine import EngineConfig
    from faasmoe.router.engine.sampling import SamplingParams
    from faasmoe.router.engine.sequence import Request
    from faasmoe.router.engine.serving import local_serving
    me = psutil.Process()
    node_procs = [psutil.Process(node.process.pid) for node in nodes]
    async with local_serving(store, [node.address for node in nodes], EngineConfig(), warm=True) as serving:
        ids = [tuple(serving.tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"]) for i in range(n)]

        async def run():
            await asyncio.gather(*(serving.engine.generate(Request(i, max_tokens, SamplingParams(), ignore_eos=True))
                                   for i in ids))
        await run()                                                  # warm up
        st = serving.engine.stats
        steps0, router0, nodes0, t0 = st.steps, cpu_s([me]), cpu_s(node_procs), time.perf_counter()
        await run()
        steps = st.steps - steps0
        return {"mesh_ms_per_step": (time.perf_counter() - t0) / steps * 1e3,
                "mesh_router_cpu_ms_per_step": (cpu_s([me]) - router0) / steps * 1e3,
                "mesh_nodes_cpu_ms_per_step": (cpu_s(node_procs) - nodes0) / steps * 1e3, "mesh_steps": steps}


def transformers_phase(model_dir: Path, n: int, max_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = [tok(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(n)]
    width = max(map(len, ids))
    input_ids = torch.tensor([[0] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])

    def run():
        with torch.inference_mode():
            model.generate(input_ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                           do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)
    run()
    me = psutil.Process()
    cpu0, t0 = cpu_s([me]), time.perf_counter()
    run()
    return {"tf_ms_per_step": (time.perf_counter() - t0) / max_tokens * 1e3,
            "tf_cpu_ms_per_step": (cpu_s([me]) - cpu0) / max_tokens * 1e3}


def main() -> None:
    from faasmoe.router.control.local_mesh import LocalMesh
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--model", required=True, help="the checkpoint the store was split from (transformers' side)")
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--torch-threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.torch_threads)
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp, LocalMesh(args.nodes, Path(tmp), memory_budget_mb=4096) as mesh:
        mesh_result = asyncio.run(mesh_phase(Path(args.store), mesh.nodes, args.sequences, args.max_tokens))
    result = {"sequences": args.sequences, "nodes": args.nodes, "cores": cores, **mesh_result,
              **transformers_phase(Path(args.model), args.sequences, args.max_tokens)}
    total = result["mesh_router_cpu_ms_per_step"] + result["mesh_nodes_cpu_ms_per_step"]
    result["mesh_cpu_ms_per_step"] = total
    result["mesh_step_floor_ms"] = total / cores                      # all cores busy, no idle, no waiting
    result["mesh_over_tf_measured"] = result["tf_ms_per_step"] / result["mesh_ms_per_step"]
    result["mesh_over_tf_ceiling"] = result["tf_ms_per_step"] / result["mesh_step_floor_ms"]
    result = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
    print_flat(result)
    save(f"cpu-budget-{args.sequences}-{args.nodes}n", result)


if __name__ == "__main__":
    main()
