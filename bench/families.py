"""Every MoE family at its reference model's real dimensions (random weights, as many layers as this machine holds
in float32 for both the mesh and transformers), served by the mesh (``bench/serving.py``: 3 local nodes behind
``faasmoe-router serve``, streamed requests from closed-loop clients) and by transformers on the same weights
(a padded batched ``generate``), side by side in one run per family. Prints one row per family and client count
and writes bench/out/families.json.

    python bench/families.py                                   # every family, default layers, 1 and 8 clients
    python bench/families.py --families qwen3_moe --layers qwen3_moe=2 --clients 1

Checkpoints (bfloat16, written by transformers from a seed) and stores go to ``--work-dir``; ``--clean`` deletes
each family's checkpoint and store after its run (they take 5-15 GB each).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from report import save

HERE = Path(__file__).resolve().parent
# float32 for both sides: experts ~2.4 GB per Qwen3 layer, 5.6 GB per Mixtral layer, 1.6 GB per OLMoE layer,
# 2.2 GB per DeepSeek-V2-Lite MoE layer (its first layer dense), plus the embeddings and lm_head
DEFAULT_LAYERS = {"qwen3_moe": 4, "mixtral": 2, "olmoe": 6, "deepseek_v2": 5}
GROUP_SIZE = {"qwen3_moe": 16, "mixtral": 1, "olmoe": 8, "deepseek_v2": 8}    # 8 functions per layer, Mixtral 8
COLUMNS = ("mesh_tokens_per_s", "transformers_tokens_per_s", "mesh_over_transformers", "mesh_tpot_ms_p50",
           "transformers_tpot_ms_p50", "mesh_ttft_ms_p50", "rpcs_per_decode_step", "texts_identical",
           "transformers_batch_texts_identical")


def run_family(family: str, layers: int, args) -> dict:
    from faasmoe.router.evaluation.family_dims import write_checkpoint
    work = Path(args.work_dir)
    model_dir = write_checkpoint(work / f"{family}-dims-{layers}l", family, layers)
    name = f"family-{family}-{layers}l"
    store = work / f"store-{family}-{layers}l"
    cmd = [sys.executable, str(HERE / "serving.py"), "--model", str(model_dir), "--store", str(store),
           "--group-size", str(GROUP_SIZE[family]), "--clients", args.clients, "--rounds", "1",
           "--max-tokens", str(args.max_tokens), "--replicas", "1", "--node-budget-mb", str(args.node_budget_mb),
           "--name", name, "--work-dir", str(work)]
    subprocess.run(cmd, check=True)
    result = json.loads((HERE / "out" / f"serving-{name}-fp32-float32.json").read_text())
    if args.clean:
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
    return {"family": family, "layers": layers, "group_size": GROUP_SIZE[family], "by_clients": result["by_clients"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(DEFAULT_LAYERS), help="comma-separated model_types")
    p.add_argument("--layers", action="append", default=[], metavar="FAMILY=N", help="layers of one family")
    p.add_argument("--clients", default="1,8")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--node-budget-mb", type=float, default=8192)
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "faasmoe-bench"))
    p.add_argument("--clean", action="store_true", help="delete each family's checkpoint and store after its run")
    args = p.parse_args()
    layers = dict(DEFAULT_LAYERS)
    for item in args.layers:
        family, _, n = item.partition("=")
        layers[family] = int(n)
    rows = []
    for family in args.families.split(","):
        if family not in DEFAULT_LAYERS:
            p.error(f"--families: {family!r} is not one of {', '.join(DEFAULT_LAYERS)}")
        rows.append(run_family(family, layers[family], args))
        save("families", {"max_tokens": args.max_tokens, "rounds": 1, "families": rows})
    print("family       layers G  clients " + " ".join(f"{c[:12]:>12}" for c in COLUMNS))
    for row in rows:
        for clients, r in row["by_clients"].items():
            print(f"{row['family']:<12} {row['layers']:>6} {row['group_size']:>2} {clients:>8} "
                  + " ".join(f"{str(r.get(c)):>12}" for c in COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
