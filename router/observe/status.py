"""``faasmoe-router status``: one row per node (health, profile, budget, functions held and loaded), per node
its loaded functions with idle time and resident memory, and optionally the expert heat (``--heat``,
``--plot FILE``) and what the nodes publish on MQTT (``--mqtt URL``: nodes seen there, offline ones included,
and the load/evict events that arrived while collecting)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from faasmoe.proto.errors import FaasmoeError, MeshError
from faasmoe.router.control.client import NodeClient
from faasmoe.router.observe.heat import heat_matrix, render_heat
from faasmoe.router.store.manifest import load_manifest

MIB = 1 << 20
EVENTS_SHOWN = 10
_NODE_KEYS = ("node_id", "profile", "version", "threads", "memory_budget_bytes", "capacity_bytes", "deployed_bytes",
              "loaded_bytes", "rss_bytes", "keep_alive_s", "queue_depth", "heat_window_s")
_FUNCTION_KEYS = ("function_id", "layer", "size_bytes", "loaded", "invocations", "in_flight", "resident_bytes")


def _function(f, names: dict) -> dict:
    get = f.get if isinstance(f, dict) else lambda key: getattr(f, key)       # MQTT payloads may lack new keys
    out = {key: get(key) for key in _FUNCTION_KEYS}
    precision, block = get("precision") or "fp32", get("block_size") or 0
    out.update(name=names.get(out["function_id"], out["function_id"][:12]), expert_ids=list(get("expert_ids")),
               idle_s=round(get("idle_s"), 3), expert_calls_window=[int(c) for c in get("expert_calls_window")],
               precision=f"{precision}-b{block}" if block else precision, footprint_bytes=get("footprint_bytes") or 0,
               rss_delta_bytes=get("rss_delta_bytes") or 0, wait_s=round(get("wait_s") or 0.0, 3))
    return out


def _count_copies(nodes: list[dict]) -> dict:
    """How many live nodes hold each function (the replica count), written into every function entry."""
    copies: dict[str, int] = {}
    for n in nodes:
        if n["healthy"]:
            for f in n.get("functions", []):
                copies[f["function_id"]] = copies.get(f["function_id"], 0) + 1
    for n in nodes:
        for f in n.get("functions", []):
            f["copies"] = copies.get(f["function_id"], 0)
    counts = list(copies.values())
    return {"functions": len(counts), "copies": sum(counts), "with_replicas": sum(c > 1 for c in counts)}


def _probe(address: str, names: dict, timeout_s: float, tls=None) -> dict:
    client = NodeClient(address, tls=tls)
    try:
        st = client.status(timeout_s)
    except MeshError as exc:
        return {"address": address, "healthy": False, "source": "grpc", "error": exc.detail}
    finally:
        client.close()
    return {"address": address, "healthy": True, "source": "grpc", **{k: getattr(st, k) for k in _NODE_KEYS},
            "functions": [_function(f, names) for f in st.functions]}


def _merge_mqtt(nodes: list[dict], seen: dict[str, dict], names: dict, now_ts: float) -> None:
    """Annotate probed nodes with what MQTT says of them; add the nodes only MQTT knows (offline ones too)."""
    by_id = {n["node_id"]: n for n in nodes if n.get("node_id")}
    by_address = {n["address"]: n for n in nodes}
    for node_id, entry in sorted(seen.items()):
        payload = entry["status"]
        ts = payload.get("ts")            # null in a Last Will: when the node died is unknown
        mqtt = {"online": entry["online"], "age_s": round(now_ts - ts, 1) if ts else None,
                "reason": payload.get("reason")}
        probed = by_id.get(node_id) or by_address.get(payload.get("address"))
        if probed is not None and probed["healthy"]:
            probed["mqtt"] = mqtt
            continue
        node = {"address": payload.get("address") or "-", "healthy": entry["online"], "source": "mqtt",
                "node_id": node_id, "mqtt": mqtt}
        if entry["online"]:
            node.update({k: payload[k] for k in _NODE_KEYS if k in payload})
            node["functions"] = [_function(f, names) for f in payload["functions"]]
        else:
            node["error"] = f"offline ({payload.get('reason')})"
        if probed is not None:                      # gRPC failed: MQTT's word replaces the bare error
            node["error"] = f"{probed['error']}; MQTT: {node.get('error') or 'online'}"
            nodes[nodes.index(probed)] = node
        else:
            nodes.append(node)


def collect(addresses: Sequence[str], store: str | None = None, timeout_s: float = 3.0,
            mqtt_url: str | None = None, mqtt_wait_s: float = 2.0, tls=None) -> dict:
    names, manifest = {}, None
    if store:
        try:
            manifest = load_manifest(store)
            names = {f.function_id: f.name for f in manifest.functions}
        except FaasmoeError:
            manifest = None
    collector = None
    if mqtt_url:
        from faasmoe.router.observe.telemetry import TelemetryCollector
        collector = TelemetryCollector(mqtt_url).start()     # collects while the nodes are probed
    try:
        with ThreadPoolExecutor(max_workers=max(1, len(addresses))) as pool:
            nodes = list(pool.map(lambda a: _probe(a, names, timeout_s, tls), addresses))
        report: dict = {"nodes": nodes}
        if collector is not None:
            settled = collector.wait_settled(mqtt_wait_s)
            _merge_mqtt(nodes, collector.nodes(), names, time.time())
            events = [dict(e, name=names.get(e["function_id"], e["function_id"][:12])) for e in collector.events()]
            report["mqtt"] = {"url": str(collector.broker), "subscribed": collector.subscribed or settled,
                              "error": collector.last_error, "events": events}
    finally:
        if collector is not None:
            collector.stop()
    report["replicas"] = _count_copies(nodes)
    live = [n for n in nodes if n["healthy"] and "functions" in n]
    report["heat"] = heat_matrix(live, manifest.moe_layers if manifest else None,
                                 manifest.num_experts if manifest else None)
    return report


def _health(n: dict) -> str:
    if n["source"] == "mqtt":
        return "mqtt" if n["healthy"] else "offline"
    return "up" if n["healthy"] else "DOWN"


def render(report: dict, heat: bool = False) -> str:
    lines = [f"{'node':<24} {'address':<21} {'health':<7} {'profile':<16} {'budget':>9} {'deployed':>9} "
             f"{'loaded':>9} {'fns':>4} {'live':>4} {'repl':>4} {'rss':>8}  precision"]
    for n in report["nodes"]:
        if "functions" not in n:
            lines.append(f"{n.get('node_id', '?')[:24]:<24} {n['address']:<21} {_health(n):<7} {n['error']}")
            continue
        live = sum(f["loaded"] for f in n["functions"])
        shared = sum(f.get("copies", 1) > 1 for f in n["functions"])
        precisions = ",".join(sorted({f["precision"] for f in n["functions"]})) or "-"
        lines.append(f"{n['node_id'][:24]:<24} {n['address']:<21} {_health(n):<7} {n['profile'] or '-':<16} "
                     f"{n['memory_budget_bytes'] / MIB:>8.0f}M {n['deployed_bytes'] / MIB:>8.1f}M "
                     f"{n['loaded_bytes'] / MIB:>8.1f}M {len(n['functions']):>4} {live:>4} {shared:>4} "
                     f"{n['rss_bytes'] / MIB:>7.0f}M  {precisions}")
    r = report.get("replicas")
    if r:
        lines.append(f"{r['functions']} functions, {r['copies']} copies ({r['with_replicas']} with a second copy)")
    for n in report["nodes"]:
        loaded = [f for f in n.get("functions", []) if f["loaded"]]
        if loaded:
            lines.append(f"\n{n['node_id']}: {len(loaded)} loaded functions, "
                         f"{sum(f['resident_bytes'] for f in loaded) / MIB:.1f} MiB resident")
            for f in sorted(loaded, key=lambda f: (f["layer"], f["name"])):
                lines.append(f"  {f['name']:<16} layer {f['layer']:>3}  {f['precision']:<9} idle {f['idle_s']:>7.1f} s  "
                             f"{f['resident_bytes'] / MIB:>7.1f} MiB (RSS +{f['rss_delta_bytes'] / MIB:.1f})  "
                             f"{f['invocations']} calls, {f.get('copies', 1)} copies"
                             + (f", {f['in_flight']} in flight" if f["in_flight"] else ""))
    mqtt = report.get("mqtt")
    if mqtt is not None:
        lines.append(f"\nMQTT {mqtt['url']}: " + (f"error: {mqtt['error']}" if mqtt["error"] else
                     "subscribed" if mqtt["subscribed"] else "not subscribed yet"))
        for e in mqtt["events"][-EVENTS_SHOWN:]:
            what = (f"in {e['load_s']:.3f} s" + (" (cold start)" if e["cold_start"] else "") if e["event"] == "load"
                    else f"{e['reason']}, idle {e['idle_s']:.1f} s")
            lines.append(f"  {time.strftime('%H:%M:%S', time.localtime(e['ts']))} {e['node_id']:<20} "
                         f"{e['event']:<5} {e['name']:<16} {e['resident_bytes'] / MIB:>7.1f} MiB  {what}")
    if heat:
        lines.append("\n" + render_heat(report["heat"]))
    return "\n".join(lines)
