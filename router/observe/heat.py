"""Expert heat: per MoE layer and expert, rows routed to it across the mesh in the nodes' heat window.

Built from node status (gRPC ``FunctionStatus.expert_calls_window`` or the MQTT status payload's
``functions[].expert_calls_window``); replicas of a function on several nodes add up. Shown as a table
(numbers for up to 16 experts, one digit of relative heat per expert beyond) or as a PNG heatmap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

NUMERIC_MAX_EXPERTS = 16
TOP_EXPERTS = 3


def heat_matrix(nodes: Iterable[dict], layers: Sequence[int] | None = None, num_experts: int | None = None) -> dict:
    """``{"window_s", "layers", "num_experts", "calls"}`` with ``calls[i][e]`` = rows for expert e of
    ``layers[i]``. ``nodes``: report entries with ``functions`` (only live nodes should be passed);
    ``layers`` / ``num_experts`` (from a manifest) fix the shape, else it is what the nodes hold."""
    cells: dict[tuple[int, int], int] = {}
    window_s, seen_layers, max_expert = 0.0, set(), -1
    for node in nodes:
        window_s = max(window_s, float(node.get("heat_window_s") or 0.0))
        for fn in node.get("functions", []):
            seen_layers.add(fn["layer"])
            calls = fn.get("expert_calls_window") or [0] * len(fn["expert_ids"])
            for expert, count in zip(fn["expert_ids"], calls):
                cells[fn["layer"], expert] = cells.get((fn["layer"], expert), 0) + int(count)
                max_expert = max(max_expert, expert)
    rows = sorted(layers) if layers else sorted(seen_layers)
    width = num_experts if num_experts else max_expert + 1
    return {"window_s": window_s, "layers": rows, "num_experts": width,
            "calls": [[cells.get((layer, e), 0) for e in range(width)] for layer in rows]}


def render_heat(heat: dict) -> str:
    layers, calls, n = heat["layers"], heat["calls"], heat["num_experts"]
    if not layers or n == 0:
        return "expert heat: no functions deployed"
    title = f"expert heat: rows per expert in the last {heat['window_s']:.0f} s (layers x experts)"
    peak = max((max(row) for row in calls), default=0)
    if n <= NUMERIC_MAX_EXPERTS:
        w = max(len(str(peak)), len(f"e{n - 1}")) + 1
        lines = [title, "layer" + "".join(f"{f'e{e}':>{w}}" for e in range(n)) + f"{'total':>9}"]
        lines += [f"{layer:>5}" + "".join(f"{c:>{w}}" for c in row) + f"{sum(row):>9}"
                  for layer, row in zip(layers, calls)]
        return "\n".join(lines)
    # compact: one character per expert, 1-9 = share of the hottest cell (rounded up), '.' = no rows
    ticks = "".join(str(e // 10 % 10) if e % 10 == 0 else " " for e in range(n))
    lines = [title, f"one character per expert: 1-9 = rows relative to the hottest cell ({peak}), '.' = none",
             f"{'layer':>5} {ticks} {'total':>9}  top experts"]
    for layer, row in zip(layers, calls):
        strip = "".join("." if c == 0 else str(max(1, -(-9 * c // peak))) for c in row)
        top = sorted(((c, e) for e, c in enumerate(row) if c), reverse=True)[:TOP_EXPERTS]
        lines.append(f"{layer:>5} {strip} {sum(row):>9}  " + " ".join(f"e{e}:{c}" for c, e in top))
    return "\n".join(lines)


def plot_heat(heat: dict, path: str | Path, title: str = "") -> Path:
    """Write a PNG heatmap (layers x experts) with matplotlib's Agg canvas (no display, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers, n = heat["layers"], heat["num_experts"]
    data = heat["calls"] if layers and n else [[0]]
    fig = Figure(figsize=(min(max(6.0, 0.18 * n + 2.5), 24.0), min(max(3.0, 0.32 * len(layers) + 1.8), 16.0)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(data, aspect="auto", cmap="inferno", interpolation="nearest", vmin=0)
    fig.colorbar(image, ax=ax, label=f"rows in the last {heat['window_s']:.0f} s")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers] if layers else ["-"])
    step = max(1, n // 16)
    ax.set_xticks(range(0, max(n, 1), step))
    ax.set_title(title or "faasmoe expert heat")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", dpi=100)
    return path
