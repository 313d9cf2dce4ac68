"""Which MatMulNBits configuration the split writes: speed, memory and error of each, side by side.

    python bench/quant_kernels.py                  # Qwen1.5-MoE expert dims, G = 4, 4 functions per config

Every configuration is a Qwen1.5-MoE-dimension expert function (4 experts of 2048 -> 1408 -> 2048, random
weights from a seed): float32 as the split writes it, and int8 / int4 quantized by ONNX Runtime's own
``MatMulNBitsQuantizer`` (symmetric or asymmetric, block 32 / 64 / 128, accuracy level 4 = int8 activations or
1 = float32 activations). For each:

- time per call, every configuration in one process, interleaved round by round, rotating over 4 functions so
  the weights are not in cache (what a node sees), at T = 1, 4, 16, 64 rows per expert, one ONNX Runtime thread;
- RSS a loaded session adds over its file, in a fresh process with the node's own session code (malloc settings,
  warm-up, trim);
- relative L2 error of the output against the float32 function on the same random input (random weights: this
  shows kernel error, e.g. the reported asymmetric-int4 / int8-compute failure on AVX2-only CPUs, not fidelity,
  which bench/fidelity.py measures on a trained model).

Prints a table (ratios against float32 from the same run); writes bench/out/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from report import save

REPO = Path(__file__).resolve().parents[1]
HIDDEN, INTER, G = 2048, 1408, 4
CONFIGS = ["fp32", "int8-b128-sym-acc4", "int8-b64-sym-acc4", "int8-b32-sym-acc4", "int8-b128-asym-acc4",
           "int8-b128-sym-acc1", "int4-b128-sym-acc4", "int4-b64-sym-acc4", "int4-b32-sym-acc4", "int4-b16-sym-acc4",
           "int4-b128-asym-acc4", "int4-b32-asym-acc4", "int4-b128-sym-acc1", "int4-b32-sym-acc1"]


def parse(label: str) -> dict | None:
    if label == "fp32":
        return None
    bits, block, sym, acc = label.split("-")
    return {"bits": int(bits[3:]), "block_size": int(block[1:]), "is_symmetric": sym == "sym",
            "accuracy_level": int(acc[3:])}


def build(work: Path, label: str, seed: int) -> Path:
    """A function file of ``label`` with the weights of ``seed`` (reused when present)."""
    import onnx

    from faasmoe.router.store.onnx_function import build_function
    path = work / f"{label}-{seed}.onnx"
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    gate_up = [(rng.standard_normal((2 * INTER, HIDDEN), dtype=np.float32) * HIDDEN ** -0.5) for _ in range(G)]
    down = [(rng.standard_normal((HIDDEN, INTER), dtype=np.float32) * INTER ** -0.5) for _ in range(G)]
    data, spec = build_function(0, tuple(range(G)), gate_up, down), parse(label)
    if spec is not None:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        q = MatMulNBitsQuantizer(onnx.load_from_string(data), **spec)
        q.process()
        data = q.model.model.SerializeToString()
    path.write_bytes(data)
    return path


def feeds(t: int, rng) -> dict:
    x = rng.standard_normal((t, HIDDEN)).astype(np.float32)
    return {"hidden": x, **{f"rows_{j}": np.arange(t, dtype=np.int64) for j in range(G)}}


def session(path: Path, threads: int = 1):
    import onnxruntime as ort
    from faasmoe.proto.ort_session import session_options
    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def timings(paths: dict[str, list[Path]], rounds: int) -> dict[str, dict[int, float]]:
    sessions = {label: [session(p) for p in ps] for label, ps in paths.items()}
    rng, samples = np.random.default_rng(1), {label: {t: [] for t in (1, 4, 16, 64)} for label in paths}
    for _ in range(rounds):
        for t in (1, 4, 16, 64):
            f = feeds(t, rng)
            for label, ss in sessions.items():
                for s in ss:
                    t0 = time.perf_counter()
                    s.run(["out"], f)
                    samples[label][t].append(time.perf_counter() - t0)
    return {label: {t: float(np.median(v[len(paths[label]):])) for t, v in by_t.items()}
            for label, by_t in samples.items()}


def errors(paths: dict[str, list[Path]]) -> dict[str, float]:
    f = feeds(64, np.random.default_rng(2))
    ref = session(paths["fp32"][0]).run(["out"], f)[0]
    return {label: float(np.linalg.norm(session(ps[0]).run(["out"], f)[0] - ref) / np.linalg.norm(ref))
            for label, ps in paths.items()}


def resident(path: Path) -> float:
    """RSS a second loaded session adds over its file (the first one pays ONNX Runtime's one-time state), in a
    fresh process with the node's session code."""
    code = ("import json, sys, psutil; from pathlib import Path; from faasmoe.node.cli import tune_malloc; "
            "tune_malloc(); from faasmoe.node.sessions import create_session; from faasmoe.node.store import "
            "FunctionInfo; from faasmoe.proto.function_abi import Precision; p = Path(sys.argv[1]); "
            "proc = psutil.Process(); info = FunctionInfo(p.name, p.stat().st_size, 0, (0, 1, 2, 3), 2048, '', p, "
            "1408, Precision()); first = create_session(info, 1, proc); s, _, d = create_session(info, 1, proc); "
            "print(json.dumps(d / p.stat().st_size))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                         cwd=REPO)
    return json.loads(out.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "faasmoe-quant-kernels"))
    p.add_argument("--name", default="quant_kernels")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    labels = args.configs.split(",")
    paths = {label: [build(work, label, seed) for seed in range(4)] for label in labels}
    err, speed = errors(paths), timings(paths, args.rounds)
    rows = []
    print(f"{'config':<22} {'file MiB':>8} {'RSS/file':>8} {'rel err':>8}  " +
          "  ".join(f"T={t:<3} ms (x fp32)" for t in (1, 4, 16, 64)))
    for label in labels:
        row = {"config": label, "file_bytes": paths[label][0].stat().st_size, "rss_per_file_byte": resident(
            paths[label][0]), "rel_l2_error": err[label], "ms": {t: 1e3 * v for t, v in speed[label].items()},
               "vs_fp32": {t: v / speed["fp32"][t] for t, v in speed[label].items()} if "fp32" in speed else {}}
        rows.append(row)
        print(f"{label:<22} {row['file_bytes'] / 2**20:>8.1f} {row['rss_per_file_byte']:>8.3f} "
              f"{row['rel_l2_error']:>8.4f}  " + "  ".join(f"{row['ms'][t]:6.2f} ({row['vs_fp32'].get(t, 0):4.2f})"
                                                          for t in (1, 4, 16, 64)), flush=True)
    print(f"wrote {save(args.name, {'dims': [HIDDEN, INTER, G], 'rounds': args.rounds, 'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
