"""The replica policy's costs side by side: memory, tail latency and recovery from a lost node with
``--replicas 1``, ``2`` and ``auto``, on the same workload in one run.

    python bench/replicas.py --model ../shared/models/qwen2moe-tiny-code

Per policy: three local nodes and ``faasmoe-router serve --replicas P`` (``--replica-interval-s 2``); ``--clients``
closed-loop clients send streamed greedy completions of ``--max-tokens`` tokens for ``--steady-s`` seconds, then
one node is killed with SIGKILL while they go on for ``--after-s`` more. Every process is sampled at 4 Hz.
Reported: the nodes' memory (GB·s over the steady phase, mean and peak GB), function copies at the end of the
steady phase, TTFT and TPOT p50 / p99 of the steady phase, and for the kill: failed requests, the slowest request
that overlapped it, how soon /health noticed that some function had no live node, and for how long (with a
surviving copy of everything it never does).

Prints a table; writes bench/out/<name>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import save

REPO = Path(__file__).resolve().parents[1]


def ms(seconds):
    return round(1e3 * seconds, 1) if seconds is not None else None


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))] if values else None


async def one(http, url, ids, max_tokens) -> dict:
    t0, marks, ok = time.perf_counter(), [], True
    body = {"model": "bench", "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "logprobs": 0}
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            ok = response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    ok = ok and "error" not in chunk
                    marks += [time.perf_counter()] * sum(len((c.get("logprobs") or {}).get("tokens") or [])
                                                         for c in chunk.get("choices", []))
    except Exception:  # noqa: BLE001 - a failed request is a result here
        ok = False
    end = time.perf_counter()
    return {"start": t0, "end": end, "ok": ok and len(marks) == max_tokens,
            "ttft_s": marks[0] - t0 if marks else None,
            "tpot_s": (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else None}


async def drive(url, prompts, clients: int, seconds: float, max_tokens: int, on_half=None) -> list[dict]:
    import httpx
    stop_at, out = time.perf_counter() + seconds, []
    async with httpx.AsyncClient(timeout=300) as http:
        async def client(c):
            k = 0
            while time.perf_counter() < stop_at:
                out.append(await one(http, url, prompts[(c + k * clients) % len(prompts)], max_tokens))
                k += 1
        await asyncio.gather(*(client(c) for c in range(clients)))
    return out


def copies(url_nodes: list[str], store: Path) -> int:
    out = subprocess.run([sys.executable, "-m", "faasmoe.router", "status", "--nodes", ",".join(url_nodes),
                          "--store", str(store), "--json"], capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout)["replicas"]["copies"]


def run_policy(args, store: Path, policy: str, prompts) -> dict:
    import httpx

    from faasmoe.router.control.local_mesh import LocalMesh
    from faasmoe.router.evaluation.sampler import ProcessSampler, integrate
    with tempfile.TemporaryDirectory() as tmp, LocalMesh(3, Path(tmp), memory_budget_mb=args.node_budget_mb,
                                                          extra_args=["--threads", "1", "--keep-alive-s", "inf"]) as mesh:
        router = subprocess.Popen([sys.executable, "-m", "faasmoe.router", "serve", "--store", str(store), "--nodes",
                                   ",".join(mesh.addresses), "--port", "0", "--model-name", "bench", "--replicas",
                                   policy, "--replica-interval-s", "2", "--settle-s", "0.5", "--warm"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            url = json.loads(router.stdout.readline().split(" ", 1)[1])["url"]
            asyncio.run(drive(url, prompts, 2, 3, 8))                         # warm up
            nodes = {n.process.pid: f"node-{i}" for i, n in enumerate(mesh.nodes)}
            sampler = ProcessSampler(nodes, hz=4.0).start()
            steady = asyncio.run(drive(url, prompts, args.clients, args.steady_s, args.max_tokens))
            usage = integrate(sampler.stop())
            n_copies = copies(mesh.addresses, store)

            async def kill_phase():
                task = asyncio.ensure_future(drive(url, prompts, args.clients, args.after_s, args.max_tokens))
                await asyncio.sleep(1.0)                                       # noqa: load under way before the kill
                killed_at = time.perf_counter()
                mesh.nodes[0].kill()
                unhealthy_at = healthy_at = None          # /health: 503 while some function has no live node
                async with httpx.AsyncClient(timeout=5) as http:
                    while healthy_at is None and time.perf_counter() - killed_at < args.after_s:
                        ok = (await http.get(f"{url}/health")).status_code == 200
                        if not ok and unhealthy_at is None:
                            unhealthy_at = time.perf_counter()
                        elif ok and unhealthy_at is not None:
                            healthy_at = time.perf_counter()
                        await asyncio.sleep(0.02)
                return killed_at, unhealthy_at, healthy_at, await task
            killed_at, unhealthy_at, healthy_at, after = asyncio.run(kill_phase())
        finally:
            router.send_signal(signal.SIGTERM)
            router.wait(60)
    overlapping = [r for r in after if r["start"] <= killed_at <= r["end"]]
    ok = [r for r in steady if r["ok"]]
    return {"policy": policy, "node_gb_s": round(usage["gb_s"], 2), "node_mean_gb": round(usage["mean_gb"], 3),
            "node_peak_gb": round(usage["peak_gb"], 3), "copies": n_copies, "requests": len(steady),
            "steady_failed": len(steady) - len(ok), "tokens_per_s": round(len(ok) * args.max_tokens / args.steady_s, 1),
            "ttft_ms_p50": ms(pct([r["ttft_s"] for r in ok], 50)), "ttft_ms_p99": ms(pct([r["ttft_s"] for r in ok], 99)),
            "tpot_ms_p50": ms(pct([r["tpot_s"] for r in ok], 50)), "tpot_ms_p99": ms(pct([r["tpot_s"] for r in ok], 99)),
            "kill_failed": sum(not r["ok"] for r in after),
            "kill_slowest_overlapping_s": round(max((r["end"] - r["start"] for r in overlapping), default=0), 2),
            "kill_unhealthy_s": ("never" if unhealthy_at is None else
                                 round(healthy_at - unhealthy_at, 2) if healthy_at else f">{args.after_s:g}"),
            "kill_noticed_s": round(unhealthy_at - killed_at, 2) if unhealthy_at else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "qwen2moe-tiny-code"))
    p.add_argument("--policies", default="1,2,auto")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--steady-s", type=float, default=40.0)
    p.add_argument("--after-s", type=float, default=15.0)
    p.add_argument("--node-budget-mb", type=float, default=512)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "faasmoe-bench"))
    p.add_argument("--name", default="replicas")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from serving import prompts_for

    from faasmoe.router.store.split import ensure_split
    model = Path(args.model)
    store = ensure_split(model, Path(args.work_dir) / f"store-{model.name}-G{args.group_size}", args.group_size)
    prompts = prompts_for(model, 64)
    rows = []
    for policy in args.policies.split(","):
        rows.append(run_policy(args, store, policy, prompts))
        print(json.dumps(rows[-1]), flush=True)
    cols = [c for c in rows[0] if c != "policy"]
    print("policy " + " ".join(f"{c[:12]:>12}" for c in cols))
    for r in rows:
        print(f"{r['policy']:<6} " + " ".join(f"{str(r[c]):>12}" for c in cols))
    print(f"wrote {save(args.name, {'model': str(model), 'clients': args.clients, 'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
