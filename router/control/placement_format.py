"""A placement as a table for people and as a JSON-able dict for tools (``faasmoe plan``, /status).

    node  thr  fns  repl  used / capacity             %  load/thr  functions
    n0      4    9     6  180.0 / 200.0 MiB       90.0%     0.375  L00.E00-03,E08-11 L01.E00-03 ... (+6 more)

``fns`` counts every function deployed on the node, ``repl`` those of them that also live on another node,
``load/thr`` the node's share of expected traffic (each layer counts 1, split among copies) per ORT thread.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from faasmoe.router.control.placement import MIB, FunctionLike, NodeSpec, label, layer_shares

_LAYERED = re.compile(r"^(L\d+)\.(.+)$")


def plan_to_dict(placement: Mapping[str, Sequence[str]], functions: Sequence[FunctionLike],
                 nodes: Sequence[NodeSpec]) -> dict:
    """Per-node usage and per-function node lists; only str, int, float, list and dict inside."""
    by_id = {f.function_id: f for f in functions}
    shares = dict(zip((f.function_id for f in functions), layer_shares(functions)))
    rows = []
    for node in sorted(nodes, key=lambda n: n.node_id):
        held = sorted((f for f, ns in placement.items() if node.node_id in ns),
                      key=lambda f: (by_id[f].layer, label(by_id[f]), f) if f in by_id else (0, f, f))
        known = [by_id[f] for f in held if f in by_id]
        used = sum(f.bytes for f in known)
        load = sum(shares[f.function_id] / len(placement[f.function_id]) for f in known)
        rows.append({
            "node_id": node.node_id,
            "threads": node.threads,
            "capacity_bytes": node.capacity_bytes,
            "used_bytes": used,
            "used_fraction": round(used / node.capacity_bytes, 6) if node.capacity_bytes else 0.0,
            "functions": len(held),
            "replicated_copies": sum(1 for f in held if len(placement[f]) > 1),
            "layers": len({f.layer for f in known}),
            "expected_load_per_thread": round(load / node.threads, 6),
            "function_ids": held,
            "names": [label(f) for f in known],
        })
    return {
        "nodes": rows,
        "placement": {f: list(ns) for f, ns in sorted(placement.items())},
        "total_function_bytes": sum(f.bytes for f in functions),
        "total_deployed_bytes": sum(r["used_bytes"] for r in rows),
        "total_capacity_bytes": sum(n.capacity_bytes for n in nodes),
    }


def format_plan(placement: Mapping[str, Sequence[str]], functions: Sequence[FunctionLike],
                nodes: Sequence[NodeSpec], names_width: int = 60) -> str:
    """One line per node: function count, copies, bytes used / capacity, %, load per thread, names."""
    plan = plan_to_dict(placement, functions, nodes)
    width = max([len("node")] + [len(r["node_id"]) for r in plan["nodes"]])
    lines = [f"{'node':<{width}}  thr  fns  repl  {'used / capacity':<22} {'%':>6}  load/thr  functions"]
    for r in plan["nodes"]:
        usage = f"{r['used_bytes'] / MIB:.1f} / {r['capacity_bytes'] / MIB:.1f} MiB"
        lines.append(f"{r['node_id']:<{width}}  {r['threads']:>3}  {r['functions']:>3}  "
                     f"{r['replicated_copies']:>4}  {usage:<22} {100 * r['used_fraction']:>5.1f}%  "
                     f"{r['expected_load_per_thread']:>8.3f}  {compact_names(r['names'], names_width)}")
    total_cap = plan["total_capacity_bytes"]
    pct = 100 * plan["total_deployed_bytes"] / total_cap if total_cap else 0.0
    lines.append(f"{len(placement)} functions ({plan['total_function_bytes'] / MIB:.1f} MiB), "
                 f"{plan['total_deployed_bytes'] / MIB:.1f} MiB deployed with replicas on "
                 f"{len(plan['nodes'])} nodes ({total_cap / MIB:.1f} MiB, {pct:.1f}%)")
    return "\n".join(lines)


def compact_names(names: Sequence[str], width: int) -> str:
    """``L03.E00-03 L03.E08-11`` -> ``L03.E00-03,E08-11``; cut at ``width`` with a count of the rest."""
    text, prefix = "", None
    for i, name in enumerate(names):
        m = _LAYERED.match(name)
        if m and m.group(1) == prefix:
            piece = "," + m.group(2)
        else:
            piece = (" " if text else "") + name
            prefix = m.group(1) if m else None
        if len(text) + len(piece) > width:
            return f"{text} ... (+{len(names) - i} more)".lstrip()
        text += piece
    return text
