"""Time per output token of one client, every precision side by side in one run: the mesh (fp32 / int8 / int4
experts, float32 / bfloat16 / int8 dense part), transformers (float32, bfloat16) and llama.cpp (Q8_0, Q4_0), on the same
weights.

    python bench/qwen_checkpoint.py --out /work/scratch/qwen-4L --layers 4 --popularity-from ../shared/models/qwen2moe-tiny-code
    python bench/precision_speed.py --checkpoint /work/scratch/qwen-4L --llama-work-dir /work/scratch/gguf

The mesh and transformers rows are ``bench/serving.py``'s phases (3 local nodes behind ``faasmoe-router serve``,
every function loaded first; transformers' own ``generate``), with one client and ``--rounds`` requests of
``--max-tokens`` tokens; the llama.cpp rows are ``bench/llamacpp.py``'s (2 threads, weights not mmapped). Each
phase is its own process, one after the other. Prints ms per token and ratios against transformers float32 and
against llama.cpp at the same expert precision; writes bench/out/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from report import save

BENCH = Path(__file__).resolve().parent
MESH = [("fp32", "float32"), ("int8", "bfloat16"), ("int8", "int8"), ("int4", "bfloat16"), ("int4", "int8")]
LLAMA = {"int8": "q8_0", "int4": "q4_0"}


def serving_phase(phase: str, args, store: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, str(BENCH / "serving.py"), "--phase", phase, "--model", args.checkpoint, "--store",
           str(store), "--clients", "1", "--rounds", str(args.rounds), "--max-tokens", str(args.max_tokens),
           "--nodes", "3", "--node-budget-mb", "8192", "--replicas", "1", *extra]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        sys.exit(f"error: serving phase {phase} {extra} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--mesh", default=",".join(f"{e}/{d}" for e, d in MESH), help="EXPERTS/DENSE,...")
    p.add_argument("--transformers", default="float32,bfloat16")
    p.add_argument("--llama", default="q8_0,q4_0", help="llama.cpp quantisations, or 'none'")
    p.add_argument("--llama-work-dir", default=str(Path(tempfile.gettempdir()) / "faasmoe-llamacpp"))
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "faasmoe-bench"))
    p.add_argument("--name", default=None)
    args = p.parse_args()
    sys.path.insert(0, str(BENCH.parent))
    from faasmoe.router.store.quantize import parse_precision
    from faasmoe.router.store.split import ensure_split
    ckpt = Path(args.checkpoint)
    rows = {}
    for dtype in args.transformers.split(","):
        tf = serving_phase("transformers", args, ckpt, ["--tf-dtype", dtype])
        rows[f"transformers {dtype}"] = 1000 * statistics.median(t["tpot_s"] for t in tf["runs"]["1"]["timings"])
        print(f"transformers {dtype}: {rows[f'transformers {dtype}']:.1f} ms/token", file=sys.stderr, flush=True)
    for config in args.mesh.split(","):
        experts, dense = config.split("/")
        precision = parse_precision(experts)
        store = ensure_split(ckpt, Path(args.work_dir) / f"store-{ckpt.name}-G4-{precision.label}", 4, precision)
        mesh = serving_phase("mesh", args, store, ["--dense-dtype", dense])
        rows[f"mesh {experts} / {dense}"] = 1000 * statistics.median(r["tpot_s"] for r in mesh["runs"]["1"]["results"])
        print(f"mesh {config}: {rows[f'mesh {experts} / {dense}']:.1f} ms/token", file=sys.stderr, flush=True)
    if args.llama != "none":
        cmd = [sys.executable, str(BENCH / "llamacpp.py"), "--checkpoint", str(ckpt), "--quant", args.llama,
               "--work-dir", args.llama_work_dir, "--new-tokens", str(args.max_tokens), "--requantize-from", "q8_0",
               "--name", f"{args.name or ckpt.name}-speed"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        llama = json.loads((BENCH / "out" / f"llamacpp-{args.name or ckpt.name}-speed.json").read_text())
        for quant in args.llama.split(","):
            rows[f"llama.cpp {quant}"] = llama[f"{quant}_ms_per_token"]
    base = rows.get("transformers float32")
    table = []
    for label, ms in rows.items():
        experts = label.split()[1] if label.startswith("mesh") else None
        same = rows.get(f"llama.cpp {LLAMA.get(experts, '')}")
        table.append({"system": label, "ms_per_token": round(ms, 1),
                      "vs_transformers_fp32": round(ms / base, 3) if base else None,
                      "vs_llama_cpp_same_precision": round(ms / same, 3) if same else None})
    print(f"{'system':<28} {'ms/token':>9} {'x tf fp32':>10} {'x llama.cpp':>12}")
    for r in table:
        print(f"{r['system']:<28} {r['ms_per_token']:>9} {str(r['vs_transformers_fp32']):>10} "
              f"{str(r['vs_llama_cpp_same_precision']):>12}")
    print(f"wrote {save(args.name or f'precision-speed-{ckpt.name}', {'checkpoint': str(ckpt), 'rows': table})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
