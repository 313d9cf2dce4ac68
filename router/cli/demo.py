"""``faasmoe demo``: the whole path on one machine with nothing else running.

Builds a small random ``Qwen2MoeForCausalLM`` (or takes ``--model DIR``), splits it, starts N node processes
on loopback, deploys, generates through the mesh with the serving engine, prints the text, per-step timings
and whether the tokens match transformers run locally, then shuts everything down.

With ``--serve`` the mesh stays up behind the OpenAI-compatible API instead, and the demo prints a ``curl``
line and an ``openai`` client snippet that work as printed (Ctrl-C stops everything).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

from faasmoe.proto.errors import ConfigError
from faasmoe.router.store.quantize import PRECISIONS

DEMO_PROMPT = "def fibonacci(n):"
DEMO_MODEL_NAME = "faasmoe-demo"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="Hugging Face MoE model directory, any supported family (default: a small random "
                   "Qwen2-MoE model)")
    p.add_argument("--nodes", type=int, default=3, help="node processes to start on 127.0.0.1 (default 3)")
    p.add_argument("--group-size", type=int, default=4, help="experts per function (default 4)")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--memory-budget-mb", type=float, default=512, help="memory budget of each node")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--serve", action="store_true",
                   help="keep the mesh up behind the OpenAI-compatible API (Ctrl-C stops)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port with --serve (default 8000; 0 = any free)")
    p.add_argument("--experts", choices=PRECISIONS, default="fp32",
                   help="precision of the expert functions: fp32 (default, exact), int8 or int4 (not exact)")
    p.add_argument("--block-size", type=int, default=None, help="quantization block of int8 / int4 (default 128)")
    from faasmoe.router.cli.main import add_dense_dtype_argument
    add_dense_dtype_argument(p)


def _reference_tokens(model_dir: Path, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    from faasmoe.router.engine.reference import reference_generate
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return reference_generate(model, tokenizer, [prompt], max_new_tokens)[0].token_ids


def run(args) -> int:
    if args.nodes < 1:
        raise ConfigError("--nodes must be at least 1")
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a port number (0 = any free port)")
    from transformers.utils import logging as hf_logging

    from faasmoe.router.control.local_mesh import LocalMesh
    from faasmoe.router.model.precision import dense_dtype
    from faasmoe.router.store.quantize import parse_precision
    from faasmoe.router.store.split import split_checkpoint

    precision, dtype = parse_precision(args.experts, args.block_size), dense_dtype(args.dense_dtype)
    from faasmoe.router.cli.commands import dense_threads
    dense_threads(args)

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="faasmoe-demo-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        if args.model:
            model_dir = Path(args.model)
        else:
            from faasmoe.router.store.tiny_model import make_checkpoint
            model_dir = make_checkpoint(tmp / "model", **DEMO_MODEL)
        store = tmp / "store"
        manifest = split_checkpoint(model_dir, store, group_size=args.group_size, progress=False, precision=precision)
        t1 = time.perf_counter()
        with LocalMesh(args.nodes, tmp / "nodes", memory_budget_mb=args.memory_budget_mb) as mesh:
            t2 = time.perf_counter()
            if args.serve:
                return _serve(args, store, mesh.addresses)
            out, stats, copies, t3, served = asyncio.run(_generate(args, store, mesh.addresses, dtype))
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(store))
        reference = _reference_tokens(model_dir, tokenizer, args.prompt, args.max_new_tokens)
    decode_s = out.step_s[1:]
    first_difference = next((i for i, (a, b) in enumerate(zip(out.token_ids, reference)) if a != b), None)
    report = {
        "text": out.text, "token_ids": out.token_ids, "prompt_token_ids": out.prompt_token_ids,
        "matches_transformers": out.token_ids == reference, "first_difference": first_difference,
        "faasmoe_precision": served.label(),
        "nodes": args.nodes, "functions": len(manifest.functions), "group_size": manifest.group_size,
        "function_copies": copies,
        "split_s": round(t1 - t0, 3), "start_nodes_s": round(t2 - t1, 3), "deploy_s": round(t3 - t2, 3),
        "prefill_s": round(out.step_s[0], 4) if out.step_s else None,
        "decode_step_ms_p50": round(1000 * statistics.median(decode_s), 2) if decode_s else None,
        "step_ms": [round(1000 * s, 2) for s in out.step_s],
        "rpcs": stats.rpcs, "cold_starts": stats.cold_starts,
        "dispatch_share": round(stats.dispatch_s() / stats.wall_s, 3) if stats.wall_s else None,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"prompt: {args.prompt!r}\ncompletion: {out.text!r}")
        if not args.model:
            print("(random weights, so the text is noise; --model DIR runs a trained checkpoint)")
        print(f"split {report['split_s']} s into {report['functions']} functions (G={report['group_size']}); "
              f"{args.nodes} nodes started in {report['start_nodes_s']} s; "
              f"{report['function_copies']} copies deployed in {report['deploy_s']} s")
        print(f"prefill {1000 * (report['prefill_s'] or 0):.1f} ms; decode p50 {report['decode_step_ms_p50']} ms per "
              f"token; per step (ms): {' '.join(str(s) for s in report['step_ms'])}")
        print(f"{stats.rpcs} RPCs, {stats.cold_starts} cold starts, dispatch share of mesh time "
              f"{report['dispatch_share']}")
        print(f"precision: {served.header()}" + ("" if served.exact else " (opt-in, NOT exact)"))
        print("tokens match transformers float32: " + ("yes" if report["matches_transformers"] else
                                                       f"NO (first difference at token {first_difference})"))
        print("next: `faasmoe demo --serve` keeps this mesh up behind an OpenAI-compatible API")
    return 0 if report["matches_transformers"] or not served.exact else 1


async def _generate(args, store: Path, addresses, dtype):
    from faasmoe.router.engine.generate import generate
    from faasmoe.router.engine.serving import local_serving

    async with local_serving(store, addresses, dtype=dtype) as serving:
        t3 = time.perf_counter()
        copies = sum(len(nodes) for nodes in serving.session.placement.values())
        out = (await generate(serving.engine, serving.tokenizer, [args.prompt], args.max_new_tokens))[0]
        return out, serving.mesh.stats, copies, t3, serving.precision


def _serve(args, store: Path, addresses) -> int:
    from faasmoe.router.api.server import ServeOptions, ServerThread
    from faasmoe.router.control.session import RouterSession

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    options = ServeOptions(host="127.0.0.1", port=args.port, model_name=DEMO_MODEL_NAME, dense_dtype=args.dense_dtype)
    with ServerThread(RouterSession(store), addresses, options=options) as server:
        print(usage(server.url, args.prompt), flush=True)
        stop.wait()
    print("stopped", flush=True)
    return 0


def usage(url: str, prompt: str) -> str:
    body = json.dumps({"model": DEMO_MODEL_NAME, "prompt": prompt, "max_tokens": 16, "temperature": 0})
    return "\n".join([
        f"faasmoe demo: {DEMO_MODEL_NAME} served by a local mesh at {url}/v1 (Ctrl-C stops it)",
        "",
        "curl:",
        f"curl -s {url}/v1/completions -H 'Content-Type: application/json' -d {shlex.quote(body)}",
        "",
        "python (pip install openai):",
        "from openai import OpenAI",
        f"client = OpenAI(base_url=\"{url}/v1\", api_key=\"none\")",
        f"out = client.completions.create(model=\"{DEMO_MODEL_NAME}\", prompt={prompt!r}, max_tokens=16, "
        "temperature=0)",
        "print(out.choices[0].text)",
        "",
    ])


DEMO_MODEL = dict(num_layers=4, hidden_size=64, num_experts=16, top_k=4, moe_intermediate_size=32,
                  shared_expert_intermediate_size=128, vocab_size=97, seed=0)   # printable ASCII only
