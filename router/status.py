"""``faasmoe-router status``: one row per node (health, profile, budget, functions held and loaded) and,
per node, its functions with idle time and resident memory."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from faasmoe.proto.errors import FaasmoeError, MeshError
from faasmoe.router.client import NodeClient
from faasmoe.router.manifest import load_manifest

MIB = 1 << 20


def collect(addresses: Sequence[str], store: str | None = None, timeout_s: float = 3.0) -> dict:
    names = {}
    if store:
        try:
            names = {f.function_id: f.name for f in load_manifest(store).functions}
        except FaasmoeError:
            names = {}

    def one(address: str) -> dict:
        client = NodeClient(address)
        try:
            st = client.status(timeout_s)
        except MeshError as exc:
            return {"address": address, "healthy": False, "error": exc.detail}
        finally:
            client.close()
        return {
            "address": address, "healthy": True, "node_id": st.node_id, "profile": st.profile,
            "version": st.version, "threads": st.threads, "memory_budget_bytes": st.memory_budget_bytes,
            "capacity_bytes": st.capacity_bytes, "deployed_bytes": st.deployed_bytes,
            "loaded_bytes": st.loaded_bytes, "rss_bytes": st.rss_bytes, "keep_alive_s": st.keep_alive_s,
            "queue_depth": st.queue_depth,
            "functions": [{
                "function_id": f.function_id, "name": names.get(f.function_id, f.function_id[:12]),
                "layer": f.layer, "expert_ids": list(f.expert_ids), "size_bytes": f.size_bytes,
                "loaded": f.loaded, "idle_s": round(f.idle_s, 3), "invocations": f.invocations,
                "in_flight": f.in_flight, "resident_bytes": f.resident_bytes} for f in st.functions],
        }

    with ThreadPoolExecutor(max_workers=max(1, len(addresses))) as pool:
        nodes = list(pool.map(one, addresses))
    return {"nodes": nodes}


def render(report: dict) -> str:
    lines = [f"{'node':<24} {'address':<21} {'health':<7} {'profile':<16} {'budget':>9} {'deployed':>9} "
             f"{'loaded':>9} {'fns':>4} {'live':>4} {'rss':>8}"]
    for n in report["nodes"]:
        if not n["healthy"]:
            lines.append(f"{'?':<24} {n['address']:<21} {'DOWN':<7} {n['error']}")
            continue
        live = sum(f["loaded"] for f in n["functions"])
        lines.append(f"{n['node_id'][:24]:<24} {n['address']:<21} {'up':<7} {n['profile'] or '-':<16} "
                     f"{n['memory_budget_bytes'] / MIB:>8.0f}M {n['deployed_bytes'] / MIB:>8.1f}M "
                     f"{n['loaded_bytes'] / MIB:>8.1f}M {len(n['functions']):>4} {live:>4} "
                     f"{n['rss_bytes'] / MIB:>7.0f}M")
    for n in report["nodes"]:
        loaded = [f for f in n.get("functions", []) if f["loaded"]]
        if loaded:
            lines.append(f"\n{n['node_id']}: loaded functions")
            for f in sorted(loaded, key=lambda f: f["name"]):
                lines.append(f"  {f['name']:<16} idle {f['idle_s']:>7.1f} s  {f['resident_bytes'] / MIB:>7.1f} MiB  "
                             f"{f['invocations']} calls")
    return "\n".join(lines)
