"""``faasmoe demo``: the whole path on one machine with nothing else running.

Builds a small random ``Qwen2MoeForCausalLM`` (or takes ``--model DIR``), splits it, starts N node processes
on loopback, deploys, generates through the mesh, prints the text, per-step timings and whether the tokens
match transformers run locally, then shuts everything down.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from faasmoe.proto.errors import ConfigError

DEMO_PROMPT = "def fibonacci(n):"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="Hugging Face Qwen2MoeForCausalLM directory (default: a small random model)")
    p.add_argument("--nodes", type=int, default=3, help="node processes to start on 127.0.0.1 (default 3)")
    p.add_argument("--group-size", type=int, default=4, help="experts per function (default 4)")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--memory-budget-mb", type=float, default=512, help="memory budget of each node")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _reference_tokens(model_dir: Path, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    from faasmoe.router.engine.generate import generate
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return generate(model, tokenizer, [prompt], max_new_tokens)[0].token_ids


def run(args) -> int:
    if args.nodes < 1:
        raise ConfigError("--nodes must be at least 1")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from faasmoe.router.engine.generate import generate
    from faasmoe.router.control.local_mesh import LocalMesh
    from faasmoe.router.model.build import build_mesh_model
    from faasmoe.router.control.session import RouterSession
    from faasmoe.router.store.split import split_checkpoint

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
        manifest = split_checkpoint(model_dir, store, group_size=args.group_size, progress=False)
        t1 = time.perf_counter()
        with LocalMesh(args.nodes, tmp / "nodes", memory_budget_mb=args.memory_budget_mb) as mesh:
            t2 = time.perf_counter()
            session = RouterSession(store)
            try:
                plan, _ = session.place_and_deploy(mesh.addresses)
                t3 = time.perf_counter()
                model = build_mesh_model(store, session.manifest, session.mesh)
                tokenizer = AutoTokenizer.from_pretrained(str(store))
                out = generate(model, tokenizer, [args.prompt], args.max_new_tokens)[0]
                stats = session.mesh.stats
            finally:
                session.close()
        reference = _reference_tokens(model_dir, tokenizer, args.prompt, args.max_new_tokens)
    decode_s = out.step_s[1:]
    report = {
        "text": out.text, "token_ids": out.token_ids, "prompt_token_ids": out.prompt_token_ids,
        "matches_transformers": out.token_ids == reference,
        "nodes": args.nodes, "functions": len(manifest.functions), "group_size": manifest.group_size,
        "function_copies": sum(len(v) for v in plan.values()),
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
            print("(random weights, so the text is noise; --model DIR runs a trained Qwen2-MoE checkpoint)")
        print(f"split {report['split_s']} s into {report['functions']} functions (G={report['group_size']}); "
              f"{args.nodes} nodes started in {report['start_nodes_s']} s; "
              f"{report['function_copies']} copies deployed in {report['deploy_s']} s")
        print(f"prefill {1000 * (report['prefill_s'] or 0):.1f} ms; decode p50 {report['decode_step_ms_p50']} ms per "
              f"token; per step (ms): {' '.join(str(s) for s in report['step_ms'])}")
        print(f"{stats.rpcs} RPCs, {stats.cold_starts} cold starts, dispatch share of mesh time "
              f"{report['dispatch_share']}")
        print("tokens match transformers: " + ("yes" if report["matches_transformers"] else "NO"))
    return 0 if report["matches_transformers"] else 1


DEMO_MODEL = dict(num_layers=4, hidden_size=64, num_experts=16, top_k=4, moe_intermediate_size=32,
                  shared_expert_intermediate_size=128, vocab_size=97, seed=0)   # printable ASCII only
