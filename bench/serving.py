"""Serving under concurrent clients: the mesh (3 local nodes behind ``faasmoe-router serve``, over HTTP) side
by side with transformers serving the same requests batched (a padded batched ``generate``), on one machine
in one run. Per client count: aggregate output tokens/s, time to first token and time per output token
(p50/p99), RPCs per decode step, and how many greedy texts equal transformers' for the request alone (the
mesh's, co-batched, and transformers' own padded batch's).

    python bench/serving.py --model ../shared/models/qwen2moe-tiny-code          # the trained tiny model
    python bench/serving.py --qwen-dims --layers 4                                # Qwen1.5-MoE dims, 4 layers
    python bench/serving.py --model DIR --experts int8 --dense-dtype bfloat16 --clients 1   # precision choices

Each client is a closed loop: it sends ``--rounds`` streamed requests one after the other (greedy,
``--max-tokens`` tokens each, end-of-sequence ignored so every request has the same length). The transformers
phase runs the same requests as batches of ``clients`` prompts (left-padded, one ``generate`` per round).
Phases run in their own processes; results print as a table and go to bench/out/serving-<name>.json.
``--transformers-cb`` also times transformers' own continuous batching (``generate_batch``) at 8 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from faasmoe.proto.ready import ROUTER_READY, parse_ready
from report import save

QWEN_DIMS = dict(hidden_size=2048, num_experts=60, top_k=4, moe_intermediate_size=1408,
                 shared_expert_intermediate_size=5632, vocab_size=151936, num_attention_heads=16,
                 num_key_value_heads=16, norm_topk_prob=False, seed=1234)
CODE_PROMPTS = ["def quicksort(xs):\n    ", "import os\nimport sys\n\n", "class Stack:\n    def __init__(self):",
                "for i in range(10):\n    ", "def read_config(path):\n    with open(path) as fh:",
                "# parse the command line\nimport argparse\n", "async def fetch(url, session):\n",
                "def fibonacci(n):\n    if n < 2:\n        return n\n"]


def prompts_for(model_dir: Path, n: int) -> list[list[int]]:
    """``n`` prompts as token ids: code for a model with a tokenizer, seeded ids of 8..40 tokens otherwise."""
    if (model_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        return [tok(CODE_PROMPTS[i % len(CODE_PROMPTS)] + "#" * (i // len(CODE_PROMPTS)))["input_ids"]
                for i in range(n)]
    import random
    rng = random.Random(7)
    return [[rng.randrange(100, 30000) for _ in range(8 + (i * 5) % 33)] for i in range(n)]


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))] if values else None


# ------------------------------------------------------------------------------------------------ mesh phase
async def _request(http, url, ids, max_tokens, key: str | None = None):
    body = {"model": "bench", "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "logprobs": 0, "stream_options": {"include_usage": True}}
    t0, marks, text, usage, ids = time.perf_counter(), [], [], None, []
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with http.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice.get("logprobs") and choice["logprobs"]["tokens"]:
                    marks.append(time.perf_counter())
                    ids += choice["logprobs"]["tokens"]
                text.append(choice.get("text") or "")
    n = usage["completion_tokens"]
    if all(t.startswith("token_id:") for t in ids):     # a store without a tokenizer names the ids
        text = [" ".join(t.split(":", 1)[1] for t in ids)]
    return dict(ttft_s=marks[0] - t0, tpot_s=(marks[-1] - marks[0]) / max(1, len(marks) - 1), tokens=n,
                text="".join(text))


async def _load(url, prompts, clients, rounds, max_tokens):
    import httpx
    async with httpx.AsyncClient(timeout=600) as http:
        async def client(c):
            return [await _request(http, url, prompts[(c * rounds + r) % len(prompts)], max_tokens)
                    for r in range(rounds)]
        t0 = time.perf_counter()
        results = await asyncio.gather(*(client(c) for c in range(clients)))
        return time.perf_counter() - t0, [r for per_client in results for r in per_client]


def _metrics(url) -> dict:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if not s.labels:
                out[s.name] = s.value
    return out


def phase_mesh(args) -> dict:
    import signal

    from faasmoe.router.control.local_mesh import LocalMesh
    from faasmoe.router.store.manifest import load_manifest
    store = Path(args.store)
    manifest = load_manifest(store)
    prompts = prompts_for(Path(args.model), 64)
    extra = ["--threads", str(args.node_threads), "--keep-alive-s", "inf"]
    out = {"moe_layers": len(manifest.moe_layers), "nodes": args.nodes, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp, LocalMesh(args.nodes, Path(tmp), memory_budget_mb=args.node_budget_mb,
                                                          extra_args=extra) as mesh:
        router = subprocess.Popen([sys.executable, "-m", "faasmoe.router", "serve", "--store", str(store),
                                   "--nodes", ",".join(mesh.addresses), "--port", "0", "--warm", "--model-name",
                                   "bench", "--max-batch", "32", "--torch-threads", str(args.torch_threads),
                                   "--replicas", args.replicas, "--dense-dtype", args.dense_dtype],
                                  stdout=subprocess.PIPE, text=True)
        try:
            line = router.stdout.readline()
            info = parse_ready(line, ROUTER_READY)
            if info is None:
                sys.exit(f"error: the router did not start: {line!r}")
            url = info["url"]
            asyncio.run(_load(url, prompts, 2, 1, 8))                         # warm up
            for clients in args.clients:
                before = _metrics(url)
                wall_s, results = asyncio.run(_load(url, prompts, clients, args.rounds, args.max_tokens))
                after = _metrics(url)
                steps = after["faasmoe_router_engine_decode_steps_total"] - before["faasmoe_router_engine_decode_steps_total"]
                rpcs = (after["faasmoe_router_engine_decode_step_rpcs_total"]
                        - before["faasmoe_router_engine_decode_step_rpcs_total"])
                out["runs"][clients] = dict(wall_s=wall_s, results=results, decode_steps=steps, decode_rpcs=rpcs)
                print(f"mesh: {clients} clients done in {wall_s:.1f} s", file=sys.stderr)
        finally:
            router.send_signal(signal.SIGTERM)
            router.wait(60)
    return out


# -------------------------------------------------------------------------------------- transformers phase
def phase_transformers(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList
    torch.set_num_threads(args.torch_threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.tf_dtype)).eval()
    prompts = prompts_for(Path(args.model), 64)
    tokenizer = None
    if (Path(args.model) / "tokenizer.json").exists():
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.model)

    class Clock(LogitsProcessor):
        def __init__(self):
            self.marks = []

        def __call__(self, input_ids, scores):
            self.marks.append(time.perf_counter())
            return scores

    def batch(ids_list, max_tokens):
        width = max(len(ids) for ids in ids_list)
        input_ids = torch.tensor([[0] * (width - len(ids)) + ids for ids in ids_list])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in ids_list])
        clock = Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            seq = model.generate(input_ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0,
                                 logits_processor=LogitsProcessorList([clock]))
        steps = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
        new = seq[:, width:].tolist()
        return dict(ttft_s=clock.marks[0] - t0, tpot_s=statistics.mean(steps) if steps else 0.0), [render(t) for t in new]

    def render(token_ids):
        return tokenizer.decode(token_ids, skip_special_tokens=True) if tokenizer else " ".join(map(str, token_ids))

    batch(prompts[:2], 8)                                                       # warm up
    used = sorted({(c * args.rounds + r) % len(prompts) for c in range(max(args.clients)) for r in range(args.rounds)})
    out = {"runs": {}, "single": {i: batch([prompts[i]], args.max_tokens)[1][0] for i in used}}
    for clients in args.clients:
        timings, texts, t0 = [], [], time.perf_counter()
        for r in range(args.rounds):
            ids = [prompts[(c * args.rounds + r) % len(prompts)] for c in range(clients)]
            timing, round_texts = batch(ids, args.max_tokens)
            timings.append(timing)
            texts.append(round_texts)
        out["runs"][clients] = dict(wall_s=time.perf_counter() - t0, timings=timings, texts=texts)
        print(f"transformers: {clients} clients done", file=sys.stderr)
    return out


def phase_transformers_cb(args) -> dict:
    """transformers' own continuous batching (generate_batch, paged cache) for 8 requests."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    torch.set_num_threads(args.torch_threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prompts = prompts_for(Path(args.model), 8)
    config = GenerationConfig(max_new_tokens=args.max_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    model.generate_batch(inputs=prompts[:2], generation_config=config)          # warm up
    t0 = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts, generation_config=config)
    wall_s = time.perf_counter() - t0
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    return dict(wall_s=wall_s, tokens=tokens)


# -------------------------------------------------------------------------------------------------- driver
def run_phase(name: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--phase", name, *argv], stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        sys.exit(f"error: phase {name} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(mesh: dict, tf: dict, args) -> dict:
    rows = {}
    single = None
    bound = mesh["nodes"] * mesh["moe_layers"]
    for clients in args.clients:
        m, t = mesh["runs"][str(clients)], tf["runs"][str(clients)]
        res = m["results"]
        mesh_tps = sum(r["tokens"] for r in res) / m["wall_s"]
        tf_tps = clients * args.rounds * args.max_tokens / t["wall_s"]
        single = single or mesh_tps
        tf_texts = [text for round_texts in t["texts"] for text in round_texts]
        mesh_texts = [None] * len(tf_texts)
        for c in range(clients):                       # results are client-major, rounds inner
            for r in range(args.rounds):
                mesh_texts[r * clients + c] = res[c * args.rounds + r]["text"]
        single_texts = [tf["single"][str((c * args.rounds + r) % 64)] for r in range(args.rounds)
                        for c in range(clients)]
        rows[clients] = dict(
            mesh_tokens_per_s=round(mesh_tps, 2), transformers_tokens_per_s=round(tf_tps, 2),
            mesh_over_transformers=round(mesh_tps / tf_tps, 3), mesh_over_single_client=round(mesh_tps / single, 2),
            mesh_ttft_ms_p50=round(1000 * pct([r["ttft_s"] for r in res], 50), 1),
            mesh_ttft_ms_p99=round(1000 * pct([r["ttft_s"] for r in res], 99), 1),
            mesh_tpot_ms_p50=round(1000 * pct([r["tpot_s"] for r in res], 50), 2),
            mesh_tpot_ms_p99=round(1000 * pct([r["tpot_s"] for r in res], 99), 2),
            transformers_ttft_ms_p50=round(1000 * pct([x["ttft_s"] for x in t["timings"]], 50), 1),
            transformers_tpot_ms_p50=round(1000 * pct([x["tpot_s"] for x in t["timings"]], 50), 2),
            rpcs_per_decode_step=round(m["decode_rpcs"] / m["decode_steps"], 2) if m["decode_steps"] else None,
            rpc_bound_nodes_x_layers=bound,
            texts_identical=sum(a == b for a, b in zip(mesh_texts, single_texts)),
            transformers_batch_texts_identical=sum(a == b for a, b in zip(tf_texts, single_texts)),
            requests=len(res))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="Hugging Face MoE model directory (a supported family)")
    p.add_argument("--qwen-dims", action="store_true", help="Qwen1.5-MoE dims, random weights from a seed")
    p.add_argument("--layers", type=int, default=4, help="layers of the --qwen-dims model (default 4)")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "faasmoe-bench"))
    p.add_argument("--store")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--node-threads", type=int, default=1)
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--node-budget-mb", type=float, default=4096)
    p.add_argument("--clients", default="1,2,4,8,16")
    p.add_argument("--rounds", type=int, default=2, help="requests per client (closed loop)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--replicas", choices=["1", "2", "auto"], default="auto", help="the router's replica policy")
    p.add_argument("--no-replicas", dest="replicas", action="store_const", const="1", help=argparse.SUPPRESS)
    p.add_argument("--experts", choices=["fp32", "int8", "int4"], default="fp32", help="expert precision of the split")
    p.add_argument("--block-size", type=int, default=None, help="quantization block (int8 / int4)")
    p.add_argument("--dense-dtype", choices=["float32", "bfloat16", "int8"], default="float32", help="the router's dense part")
    p.add_argument("--tf-dtype", choices=["float32", "bfloat16"], default="float32", help="transformers' dtype")
    p.add_argument("--transformers-cb", action="store_true", help="also time transformers' generate_batch")
    p.add_argument("--name")
    p.add_argument("--phase", choices=["mesh", "transformers", "transformers_cb"], help=argparse.SUPPRESS)
    args = p.parse_args()
    args.clients = [int(c) for c in str(args.clients).split(",")]
    if args.phase:
        phases = dict(mesh=phase_mesh, transformers=phase_transformers, transformers_cb=phase_transformers_cb)
        print(json.dumps(phases[args.phase](args)))
        return 0
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.qwen_dims:
        from faasmoe.router.store.tiny_model import make_checkpoint
        model_dir = work / f"qwen-moe-dims-{args.layers}l"
        if not (model_dir / "config.json").exists():
            make_checkpoint(model_dir, num_layers=args.layers, with_tokenizer=False, **QWEN_DIMS)
    else:
        model_dir = Path(args.model)
    from faasmoe.router.store.quantize import parse_precision
    from faasmoe.router.store.split import ensure_split
    precision = parse_precision(args.experts, args.block_size)
    name = args.name or (model_dir.name if not args.qwen_dims else f"qwen-dims-{args.layers}l")
    store = Path(args.store) if args.store else work / f"store-{model_dir.name}-G{args.group_size}-{precision.label}"
    ensure_split(model_dir, store, args.group_size, precision)
    common = ["--model", str(model_dir), "--store", str(store), "--nodes", str(args.nodes),
              "--node-threads", str(args.node_threads), "--torch-threads", str(args.torch_threads),
              "--node-budget-mb", str(args.node_budget_mb), "--clients", ",".join(map(str, args.clients)),
              "--rounds", str(args.rounds), "--max-tokens", str(args.max_tokens), "--replicas", args.replicas,
              "--dense-dtype", args.dense_dtype, "--tf-dtype", args.tf_dtype]
    mesh = run_phase("mesh", common)
    tf = run_phase("transformers", common)
    rows = summarize(mesh, tf, args)
    result = dict(name=name, group_size=args.group_size, nodes=args.nodes, node_threads=args.node_threads,
                  torch_threads=args.torch_threads, rounds=args.rounds, max_tokens=args.max_tokens,
                  experts=precision.label, dense_dtype=args.dense_dtype, transformers_dtype=args.tf_dtype,
                  replicas=args.replicas, by_clients=rows)
    if args.transformers_cb:
        cb = run_phase("transformers_cb", common)
        batched8 = rows.get(8, {}).get("transformers_tokens_per_s")
        result["transformers_cb_8_tokens_per_s"] = round(cb["tokens"] / cb["wall_s"], 2)
        result["transformers_cb_over_padded_batch_8"] = round(cb["tokens"] / cb["wall_s"] / batched8, 3) if batched8 else None
    save(f"serving-{name}-{precision.label}-{args.dense_dtype}", result)
    cols = ["mesh_tokens_per_s", "transformers_tokens_per_s", "mesh_over_transformers", "mesh_over_single_client",
            "mesh_ttft_ms_p50", "mesh_ttft_ms_p99", "mesh_tpot_ms_p50", "mesh_tpot_ms_p99",
            "transformers_ttft_ms_p50", "transformers_tpot_ms_p50", "rpcs_per_decode_step", "texts_identical",
            "transformers_batch_texts_identical", "requests"]
    print(f"{name}: experts {precision.label}, dense {args.dense_dtype} (transformers {args.tf_dtype}), "
          f"G={args.group_size}, {args.nodes} nodes, {args.rounds} requests per client of {args.max_tokens} "
          f"tokens; RPC bound per decode step (nodes x MoE layers) = {mesh['nodes'] * mesh['moe_layers']}")
    print("clients " + " ".join(f"{c:>10.10}" for c in cols))
    for clients, row in rows.items():
        print(f"{clients:>7} " + " ".join(f"{str(row[c]):>10}" for c in cols))
    for key in ("transformers_cb_8_tokens_per_s", "transformers_cb_over_padded_batch_8"):
        if key in result:
            print(f"{key}: {result[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
