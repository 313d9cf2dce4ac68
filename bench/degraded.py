"""Fidelity of the opt-in degraded mode (``serve --degraded``): how far greedy output drifts from transformers
when a node's experts are dropped instead of failing the request.

    python bench/degraded.py [--model ../shared/models/qwen2moe-tiny-code] [--prompts 24] [--tokens 32]

Three nodes hold one copy of each function (no replicas) with no room to take a lost node's share; one node is
killed (SIGKILL) before generation, so its functions have no replica and no new home, and every step drops the
expert calls it would have served. Per prompt: whether the whole greedy output equals transformers', the tokens
generated before the first difference, positional token agreement, and the share of expert calls dropped.
A run with all nodes alive (degraded mode on, nothing dropped) is the control: it must be exact.
Results: a table, and bench/out/degraded.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["def fibonacci(n):", "import numpy as np\n", "The quick brown fox", "for i in range(",
           "class Stack:\n    def", "# read a csv file\n", "SELECT name FROM", "if __name__ == '__main__':",
           "def quicksort(xs):", "import os\nimport sys\n", "while True:", "with open(path) as f:",
           "def main():\n    args =", "try:\n    import", "x = [i * i for i in", "print('hello",
           "from typing import", "async def fetch(url):", "return sorted(", "# TODO: handle the",
           "def __init__(self,", "lambda x:", "raise ValueError(", "assert len("]


async def _run(store: Path, addresses: list[str], tok, prompts: list[str], tokens: int, kill=None):
    from faasmoe.router.engine.engine import EngineConfig
    from faasmoe.router.engine.generate import generate
    from faasmoe.router.engine.serving import local_serving
    config = EngineConfig(step_timeout_s=20, frame_timeout_s=2.0, degraded=True)
    async with local_serving(store, addresses, config) as serving:
        if kill is not None:
            kill()
        outs = await generate(serving.engine, tok, prompts, tokens)
        calls = serving.mesh.stats.answered_pairs + serving.mesh.stats.dropped_pairs
        dropped = serving.mesh.stats.dropped_pairs
    return outs, dropped, calls


def _compare(out_ids: list[int], ref_ids: list[int]) -> dict:
    prefix = next((i for i, (a, b) in enumerate(zip(out_ids, ref_ids)) if a != b), min(len(out_ids), len(ref_ids)))
    agree = sum(a == b for a, b in zip(out_ids, ref_ids)) / max(len(ref_ids), 1)
    return {"exact": out_ids == ref_ids, "first_difference": prefix, "positional_agreement": agree}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="degraded.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "qwen2moe-tiny-code"))
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "degraded.json"))
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from faasmoe.router.control.local_mesh import LocalMesh
    from faasmoe.router.control.session import RouterSession
    from faasmoe.router.engine.reference import reference_generate
    from faasmoe.router.store.split import split_checkpoint
    work = Path(tempfile.mkdtemp(prefix="faasmoe-degraded-"))
    store = work / "store"
    split_checkpoint(Path(args.model), store, group_size=4, progress=False)
    tok = AutoTokenizer.from_pretrained(str(store))
    prompts = (PROMPTS * (1 + args.prompts // len(PROMPTS)))[:args.prompts]
    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    refs = [r.token_ids for r in reference_generate(ref, tok, prompts, args.tokens)]
    total_mb = sum(f.bytes for f in RouterSession(store).placement_functions()) / 2**20
    budget_mb = 1.05 * total_mb / 3 + 1        # three nodes hold everything once; two cannot
    rows = {}
    for label, kill_one in (("all nodes alive", False), ("one node of three killed", True)):
        with LocalMesh(3, work / label.replace(" ", "-"), memory_budget_mb=budget_mb) as mesh:
            kill = (lambda: mesh.nodes[2].kill()) if kill_one else None
            outs, dropped, calls = asyncio.run(_run(store, mesh.addresses, tok, prompts, args.tokens, kill))
        per = [_compare(o.token_ids, r) for o, r in zip(outs, refs)]
        rows[label] = {"prompts": len(per), "exact": sum(x["exact"] for x in per),
                       "median_tokens_before_first_difference": statistics.median(x["first_difference"] for x in per),
                       "mean_positional_agreement": round(statistics.mean(x["positional_agreement"] for x in per), 3),
                       "dropped_expert_calls": dropped, "expert_calls": calls,
                       "responses_labelled": sum(bool(o.dropped) for o in outs)}
    print(f"degraded mode on {Path(args.model).name}: {args.prompts} prompts x {args.tokens} greedy tokens, "
          f"3 nodes, no replicas\n")
    print("| run | exact outputs | median tokens before the first difference | positional agreement | "
          "expert calls dropped | responses labelled degraded |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        print(f"| {label} | {r['exact']}/{r['prompts']} | {r['median_tokens_before_first_difference']} | "
              f"{r['mean_positional_agreement']:.3f} | {r['dropped_expert_calls']} of {r['expert_calls']} "
              f"({100 * r['dropped_expert_calls'] / max(r['expert_calls'], 1):.1f} %) | "
              f"{r['responses_labelled']}/{r['prompts']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": Path(args.model).name, "tokens": args.tokens, "runs": rows},
                                         indent=1))
    control = rows["all nodes alive"]
    return 0 if control["exact"] == control["prompts"] and control["dropped_expert_calls"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
