"""Batch invariance: does a row's result depend on how many rows share its step? Which kernel, and how often
does it flip a greedy token?

    python bench/batch_invariance.py --model ../shared/models/qwen2moe-tiny-code

1. Kernels: every matrix product of the router's dense part (the model's own Linear modules) and one ONNX
   expert function of the store, on real hidden states: row i computed alone vs among M rows (M = 2..64).
2. Tokens: --requests greedy requests through the engine over 3 local nodes, each once alone and once
   co-batched with the others (--batch at a time, joining together); how many differ, and where they first do.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from report import print_flat, save

PROMPT = "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n    pivot = xs[0]\n"


def kernel_report(model, store, rows_max: int = 64) -> dict:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(store))
    ids = tok(PROMPT * 4)["input_ids"][:rows_max]
    with torch.inference_mode():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor(ids)))
        out = {}
        layer = model.model.layers[0]
        mods = {"q_proj": layer.self_attn.q_proj, "k_proj": layer.self_attn.k_proj, "o_proj": layer.self_attn.o_proj,
                "gate": None, "shared_expert.up_proj": layer.mlp.shared_expert.up_proj,
                "shared_expert.down_proj": layer.mlp.shared_expert.down_proj, "lm_head": model.lm_head}
        for name, mod in mods.items():
            if name == "gate":
                fn = lambda t: torch.nn.functional.linear(t, layer.mlp.gate.weight)   # noqa: E731
            else:
                fn = mod
            width = mod.in_features if mod is not None else x.shape[1]
            xi = x if x.shape[1] == width else torch.randn(len(ids), width, generator=torch.Generator().manual_seed(0))
            worst, differs = 0.0, []
            for m in (2, 4, 8, 16, 32, 64):
                if m > len(ids):
                    break
                together = fn(xi[:m])
                for i in range(m):
                    diff = (fn(xi[i:i + 1])[0] - together[i]).abs().max().item()
                    worst = max(worst, diff)
                    if diff:
                        differs.append(m)
                        break
            out[name] = dict(max_abs_diff=worst, batch_sizes_that_differ=sorted(set(differs)))
    return out


def onnx_report(store, model, rows_max: int = 64) -> dict:
    import onnxruntime as ort

    from faasmoe.proto import function_abi as abi
    from faasmoe.router.store.manifest import load_manifest
    manifest = load_manifest(store)
    entry = manifest.functions[0]
    from faasmoe.proto.ort_session import session_options
    opts = session_options(1)
    session = ort.InferenceSession(str(store / entry.file), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs() if i.name != abi.HIDDEN_INPUT]
    x = np.random.default_rng(0).standard_normal((rows_max, manifest.hidden_size), dtype=np.float32)
    worst, differs = 0.0, []
    for m in (2, 4, 8, 16, 32, 64):
        feeds = {abi.HIDDEN_INPUT: x[:m], **{n: np.zeros(0, np.int64) for n in names}}
        feeds[names[0]] = np.arange(m, dtype=np.int64)
        together = session.run([abi.OUTPUT], feeds)[0]
        for i in range(m):
            one = {abi.HIDDEN_INPUT: x[i:i + 1], **{n: np.zeros(0, np.int64) for n in names}}
            one[names[0]] = np.zeros(1, np.int64)
            diff = float(np.abs(session.run([abi.OUTPUT], one)[0][0] - together[i]).max())
            worst = max(worst, diff)
            if diff:
                differs.append(m)
                break
    return {f"onnx expert function {entry.name}": dict(max_abs_diff=worst, batch_sizes_that_differ=sorted(set(differs)))}


async def token_report(store, addresses, n_requests: int, batch: int, max_tokens: int) -> dict:
    from transformers import AutoTokenizer

    from faasmoe.router.engine.sequence import Request
    from faasmoe.router.engine.serving import local_serving
    tok = AutoTokenizer.from_pretrained(str(store))
    lines = PROMPT.splitlines()
    prompts = [tok("\n".join(lines[: 1 + i % len(lines)]) + f"  # {i}")["input_ids"] for i in range(n_requests)]
    async with local_serving(store, addresses, warm=True) as serving:
        engine = serving.engine
        alone = [(await engine.generate(Request(tuple(p), max_tokens, ignore_eos=True))).token_ids for p in prompts]
        together = []
        for lo in range(0, n_requests, batch):
            results = await asyncio.gather(*(engine.generate(Request(tuple(p), max_tokens, ignore_eos=True))
                                             for p in prompts[lo:lo + batch]))
            together += [r.token_ids for r in results]
    flips = [next(i for i, (a, b) in enumerate(zip(x, y)) if a != b) for x, y in zip(alone, together) if x != y]
    return dict(requests=n_requests, batch=batch, tokens_per_request=max_tokens, requests_that_differ=len(flips),
                first_divergence_positions=flips, tokens_compared=n_requests * max_tokens)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "faasmoe-bench"))
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    from faasmoe.router.control.local_mesh import LocalMesh
    from faasmoe.router.store.split import ensure_split
    model_dir = Path(args.model)
    store = ensure_split(model_dir, Path(args.work_dir) / f"store-{model_dir.name}-G{args.group_size}", args.group_size)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    result = {"kernels": {**kernel_report(model, store), **onnx_report(store, model)}}
    with tempfile.TemporaryDirectory() as tmp, LocalMesh(3, Path(tmp), memory_budget_mb=2048,
                                                          extra_args=["--keep-alive-s", "inf"]) as mesh:
        result["tokens"] = asyncio.run(token_report(store, mesh.addresses, args.requests, args.batch, args.max_tokens))
    save(f"batch_invariance-{model_dir.name}", result)
    for name, figures in result["kernels"].items():
        print(f"{name:<40} max |alone - in batch| = {figures['max_abs_diff']:.3g}  "
              f"differs at M = {figures['batch_sizes_that_differ'] or 'never'}")
    print_flat(result["tokens"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
