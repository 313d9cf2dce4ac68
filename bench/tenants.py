"""Tenants on one mesh: shared (one router for all) against private (one router per tenant), and a light
tenant beside a heavy one.

    python bench/tenants.py --model ../shared/models/qwen2moe-tiny-code

For 1, 2, 4 and 8 tenants, each tenant runs ``--clients`` closed-loop clients of ``--rounds`` streamed greedy
requests of ``--max-tokens`` tokens, all tenants at once, first through one shared router and then through one
private router per tenant, over the same 3 warm nodes. Per tenant: throughput and time to first token / time
per output token (p50, p99); per deployment: the routers' peak resident memory and CPU seconds (core·s) over
the run. Then the neighbour test in shared mode: tenant B sends one request at a time, alone and then beside
tenant A keeping 16 requests in flight; B's p99 time to first token in both. Results: a table and
bench/out/tenants-<model>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from report import save
from serving import _request, pct, prompts_for


def start_router(store, addresses, tenants_file, *extra) -> tuple[subprocess.Popen, str]:
    from faasmoe.proto.ready import ROUTER_READY, parse_ready
    proc = subprocess.Popen([sys.executable, "-m", "faasmoe.router", "serve", "--store", str(store), "--nodes",
                             ",".join(addresses), "--port", "0", "--model-name", "bench", "--tenants",
                             str(tenants_file), "--max-batch", "64", *extra], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    info = parse_ready(line, ROUTER_READY)
    if info is None:
        sys.exit(f"error: a router did not start: {line!r}")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    url = info["url"]
    import httpx
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/health").status_code != 200:          # placed and routed
        if time.monotonic() > deadline:
            sys.exit("error: a router never became healthy")
        time.sleep(0.05)
    return proc, url


class Sampler:
    """RSS and CPU time of some processes at 4 Hz."""

    def __init__(self, pids):
        self.procs = [psutil.Process(p) for p in pids]
        self.peak_rss = 0
        self._stop = threading.Event()
        self._cpu0 = self._cpu()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _cpu(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self.procs)

    def _run(self):
        while not self._stop.wait(0.25):
            self.peak_rss = max(self.peak_rss, sum(p.memory_info().rss for p in self.procs))

    def stop(self) -> tuple[int, float]:
        self._stop.set()
        self._thread.join()
        return self.peak_rss, self._cpu() - self._cpu0


async def tenant_load(url_of, keys, prompts, clients, rounds, max_tokens):
    import httpx
    async with httpx.AsyncClient(timeout=600) as http:
        async def one(tenant, c):
            out = []
            for r in range(rounds):
                ids = prompts[(hash((tenant, c, r)) & 0xffff) % len(prompts)]
                out.append(await _request(http, url_of(tenant), ids, max_tokens, keys[tenant]))
            return tenant, out
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(t, c) for t in keys for c in range(clients)))
        wall_s = time.perf_counter() - t0
    by_tenant: dict[str, list] = {}
    for tenant, out in results:
        by_tenant.setdefault(tenant, []).extend(out)
    return wall_s, by_tenant


def summarize(wall_s, by_tenant) -> dict:
    rows = {}
    for tenant, res in by_tenant.items():
        rows[tenant] = dict(tokens_per_s=round(sum(r["tokens"] for r in res) / wall_s, 2),
                            ttft_ms_p50=round(1000 * pct([r["ttft_s"] for r in res], 50), 1),
                            ttft_ms_p99=round(1000 * pct([r["ttft_s"] for r in res], 99), 1),
                            tpot_ms_p50=round(1000 * pct([r["tpot_s"] for r in res], 50), 2),
                            tpot_ms_p99=round(1000 * pct([r["tpot_s"] for r in res], 99), 2))
    return rows


def run_mode(mode, n_tenants, store, addresses, tenants_file, keys, prompts, args) -> dict:
    names = [f"t{i}" for i in range(n_tenants)]
    chosen = {t: keys[t] for t in names}
    routers = {}
    try:
        if mode == "shared":
            proc, url = start_router(store, addresses, tenants_file)
            routers = {t: (proc, url) for t in names}
        else:
            for t in names:
                routers[t] = start_router(store, addresses, tenants_file, "--tenant", t)
        procs = {id(p): p for p, _ in routers.values()}
        asyncio.run(tenant_load(lambda t: routers[t][1], chosen, prompts, 1, 1, 4))       # warm up
        sampler = Sampler([p.pid for p in procs.values()])
        wall_s, by_tenant = asyncio.run(tenant_load(lambda t: routers[t][1], chosen, prompts, args.clients,
                                                    args.rounds, args.max_tokens))
        rss, cpu_s = sampler.stop()
    finally:
        for p, _ in {id(p): (p, u) for p, u in routers.values()}.values():
            p.terminate()
            p.wait(60)
    per_tenant = summarize(wall_s, by_tenant)
    return dict(wall_s=round(wall_s, 2), routers=len({id(p) for p, _ in routers.values()}),
                router_peak_rss_mib=round(rss / 2**20, 1), router_core_s=round(cpu_s, 2),
                total_tokens_per_s=round(sum(r["tokens_per_s"] for r in per_tenant.values()), 2), tenants=per_tenant)


def neighbour(store, addresses, tenants_file, keys, prompts, args) -> dict:
    import httpx
    proc, url = start_router(store, addresses, tenants_file)

    async def light(http, n):
        return [await _request(http, url, prompts[i % len(prompts)], 16, keys["t1"]) for i in range(n)]

    async def run():
        async with httpx.AsyncClient(timeout=600) as http:
            await light(http, 2)
            alone = await light(http, args.light_requests)
            stop = asyncio.Event()

            async def heavy(k):
                i = 0
                while not stop.is_set():
                    await _request(http, url, prompts[(k * 7 + i) % len(prompts)], 32, keys["t0"])
                    i += 1
            flood = [asyncio.ensure_future(heavy(k)) for k in range(16)]
            await asyncio.sleep(2.0)                        # the flood reaches its steady state
            crowded = await light(http, args.light_requests)
            stop.set()
            await asyncio.gather(*flood)
            return alone, crowded

    try:
        alone, crowded = asyncio.run(run())
    finally:
        proc.terminate()
        proc.wait(60)
    a = [r["ttft_s"] for r in alone]
    c = [r["ttft_s"] for r in crowded]
    return dict(requests=len(a), light_ttft_ms_p50_alone=round(1000 * statistics.median(a), 1),
                light_ttft_ms_p99_alone=round(1000 * pct(a, 99), 1),
                light_ttft_ms_p50_with_heavy=round(1000 * statistics.median(c), 1),
                light_ttft_ms_p99_with_heavy=round(1000 * pct(c, 99), 1),
                p99_ratio=round(pct(c, 99) / pct(a, 99), 2))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--tenants", default="1,2,4,8")
    p.add_argument("--clients", type=int, default=2, help="closed-loop clients per tenant")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--light-requests", type=int, default=40)
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "faasmoe-bench"))
    args = p.parse_args()
    from faasmoe.router.control.local_mesh import LocalMesh
    from faasmoe.router.store.split import ensure_split
    from faasmoe.router.tenancy.config import Tenant, TenantsConfig, hash_key, new_key, save_tenants
    model_dir = Path(args.model)
    store = ensure_split(model_dir, Path(args.work_dir) / f"store-{model_dir.name}-G{args.group_size}", args.group_size)
    counts = [int(n) for n in args.tenants.split(",")]
    keys = {f"t{i}": new_key() for i in range(max(max(counts), 2))}
    prompts = prompts_for(model_dir, 64)
    result = dict(model=model_dir.name, clients_per_tenant=args.clients, rounds=args.rounds,
                  max_tokens=args.max_tokens, by_tenants={})
    with tempfile.TemporaryDirectory() as tmp, LocalMesh(3, Path(tmp) / "nodes", memory_budget_mb=2048,
                                                          extra_args=["--keep-alive-s", "inf"]) as mesh:
        tenants_file = Path(tmp) / "tenants.toml"
        save_tenants(tenants_file, TenantsConfig({t: Tenant(t, hash_key(k)) for t, k in keys.items()}))
        for n in counts:
            result["by_tenants"][n] = {mode: run_mode(mode, n, store, mesh.addresses, tenants_file, keys, prompts, args)
                                       for mode in ("shared", "private")}
            print(f"{n} tenants done", file=sys.stderr)
        result["neighbour"] = neighbour(store, mesh.addresses, tenants_file, keys, prompts, args)
    save(f"tenants-{model_dir.name}", result)
    print(f"{model_dir.name}: {args.clients} clients per tenant x {args.rounds} requests of {args.max_tokens} tokens")
    print(f"{'tenants':>7} {'mode':>8} {'tok/s':>8} {'per-tenant tok/s (min..max)':>28} {'TTFT p50/p99 ms':>18} "
          f"{'TPOT p50/p99 ms':>17} {'routers':>7} {'router MiB':>10} {'router core·s':>13}")
    for n, modes in result["by_tenants"].items():
        for mode, r in modes.items():
            t = list(r["tenants"].values())
            tps = [x["tokens_per_s"] for x in t]
            ttft = f"{max(x['ttft_ms_p50'] for x in t)}/{max(x['ttft_ms_p99'] for x in t)}"
            tpot = f"{max(x['tpot_ms_p50'] for x in t)}/{max(x['tpot_ms_p99'] for x in t)}"
            spread = f"{min(tps)}..{max(tps)}"
            print(f"{n:>7} {mode:>8} {r['total_tokens_per_s']:>8} {spread:>28} {ttft:>18} {tpot:>17} "
                  f"{r['routers']:>7} {r['router_peak_rss_mib']:>10} {r['router_core_s']:>13}")
    nb = result["neighbour"]
    print(f"light tenant TTFT p50/p99 alone {nb['light_ttft_ms_p50_alone']}/{nb['light_ttft_ms_p99_alone']} ms, "
          f"beside a heavy one (16 in flight) {nb['light_ttft_ms_p50_with_heavy']}/{nb['light_ttft_ms_p99_with_heavy']} "
          f"ms: p99 ratio {nb['p99_ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
