"""The engine's step time in-process (no HTTP), with every function loaded: N greedy sequences of
``--max-tokens`` tokens at once on 3 local nodes, three repetitions; prints ms per step (wall and the engine's
own mean), RPCs per decode step, and writes bench/out/step-time-<n>.json. Run it under a sampling profiler to
see where a step goes (BENCHMARKS §0c):

    python bench/step_time.py --store STORE --sequences 1
    py-spy record --format raw -o step.raw -r 200 -- python bench/step_time.py --store STORE --sequences 1
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch

from faasmoe.router.control.local_mesh import LocalMesh
from faasmoe.router.engine.engine import EngineConfig
from faasmoe.router.engine.sampling import SamplingParams
from faasmoe.router.engine.sequence import Request
from faasmoe.router.engine.serving import local_serving
from report import print_flat, save

PROMPT = "def quicksort(xs):\n    "


async def measure(store: Path, addresses, n: int, max_tokens: int, repeats: int) -> dict:
    async with local_serving(store, addresses, EngineConfig(), warm=True) as serving:
        ids = tuple(serving.tokenizer(PROMPT)["input_ids"])
        walls, steps, rpcs = [], [], []
        for _ in range(repeats):
            serving.engine.stats.__init__()
            t0 = time.perf_counter()
            await asyncio.gather(*(serving.engine.generate(Request(ids, max_tokens, SamplingParams(0.0),
                                                                   ignore_eos=True)) for _ in range(n)))
            st = serving.engine.stats
            walls.append((time.perf_counter() - t0) / max_tokens * 1e3)
            steps.append(st.step_s / st.steps * 1e3)
            rpcs.append(st.decode_step_rpcs / max(1, st.decode_steps))
    return {"sequences": n, "max_tokens": max_tokens, "ms_per_step_wall_median": round(statistics.median(walls), 2),
            "ms_per_step_engine_median": round(statistics.median(steps), 2),
            "rpcs_per_decode_step": round(statistics.median(rpcs), 1), "ms_per_step_wall_runs": [round(w, 2) for w in walls]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="a split store (faasmoe split)")
    p.add_argument("--sequences", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch-threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory() as tmp, LocalMesh(3, Path(tmp), memory_budget_mb=4096) as mesh:
        result = asyncio.run(measure(Path(args.store), mesh.addresses, args.sequences, args.max_tokens, args.repeats))
    print_flat(result)
    print(f"wrote {save(f'step-time-{args.sequences}', result)}")


if __name__ == "__main__":
    main()
