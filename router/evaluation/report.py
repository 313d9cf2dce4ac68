"""The benchmark's outputs: ``result.json`` (everything), ``report.md`` (the comparison table) and PNG plots:
memory over time per deployment with the requests marked, GB·s and core·s bars, time-to-first-token CDFs, and
the group-size and keep-alive sweeps when the scenario has them."""

from __future__ import annotations

from pathlib import Path


def pct(values, q):
    values = sorted(v for v in values if v is not None)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))] if values else None


def summary(result: dict) -> list[dict]:
    """One row per deployment, with ratios against (a) the first full-per-tenant and (b) the first full-shared."""
    deps = result["deployments"]
    base = {k: next((d for d in deps if d["spec"]["kind"] == k), None) for k in ("full-per-tenant", "full-shared")}
    rows = []
    for d in deps:
        f, ok = d["figures"], [o for o in d["outcomes"] if o["error"] is None]
        row = dict(deployment=d["label"], gb_s=round(f["gb_s"], 2), core_s=round(f["core_s"], 2),
                   peak_gb=round(f["peak_gb"], 3), mean_gb=round(f["mean_gb"], 3), mean_cores=round(f["mean_cores"], 3),
                   ttft_ms_p50=_ms(pct([o["ttft_s"] for o in ok], 50)), ttft_ms_p99=_ms(pct([o["ttft_s"] for o in ok], 99)),
                   tpot_ms_p50=_ms(pct([o["tpot_s"] for o in ok], 50)), tpot_ms_p99=_ms(pct([o["tpot_s"] for o in ok], 99)),
                   cold_starts=d["cold_starts"], errors=d["errors"], identical=f"{d['identical']}/{len(d['outcomes'])}",
                   copies=_copies(d.get("copies")))
        for key, ref in (("a", base["full-per-tenant"]), ("b", base["full-shared"])):
            faithful = d["identical"] == len(d["outcomes"]) and not d["errors"]
            if ref is not None and faithful:
                row[f"gb_s_vs_{key}"] = round(f["gb_s"] / ref["figures"]["gb_s"], 3)
                row[f"core_s_vs_{key}"] = round(f["core_s"] / ref["figures"]["core_s"], 3)
            elif ref is not None:
                row[f"gb_s_vs_{key}"] = row[f"core_s_vs_{key}"] = "outputs differ"
        rows.append(row)
    return rows


def _copies(copies: dict | None) -> str:
    """The mesh's function copies during the run (min-max), '-' for a full model."""
    if not copies:
        return "-"
    return str(copies["min"]) if copies["min"] == copies["max"] else f"{copies['min']}-{copies['max']}"


def _ms(seconds):
    return None if seconds is None else round(1000 * seconds, 1)


def markdown(result: dict) -> str:
    rows = summary(result)
    cols = list(rows[0])
    lines = [f"# {result['scenario']}: {result['requests']} requests, {len(result['tenants'])} tenants, "
             f"{result['duration_s']:g} s, model {result['model']}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plots(result: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    deps, written = result["deployments"], []
    fig, ax = plt.subplots(figsize=(10, 5))
    for d in deps:
        ax.plot(d["series"]["times_s"], d["series"]["total_gb"], label=d["label"])
    for w in result["workload"]:
        ax.axvline(w["at_s"], color="grey", alpha=0.15, linewidth=0.8)
    ax.set(xlabel="seconds (grey: request arrivals)", ylabel="resident memory, GB (all processes)",
           title="memory over time")
    ax.legend(fontsize=7)
    written.append(_save(fig, out / "memory_over_time.png"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [d["label"] for d in deps]
    for ax, key, unit in zip(axes, ("gb_s", "core_s"), ("memory GB·s", "CPU core·s")):
        ax.bar(range(len(deps)), [d["figures"][key] for d in deps])
        ax.set_xticks(range(len(deps)), labels, rotation=35, ha="right", fontsize=7)
        ax.set(ylabel=unit, title=unit)
    written.append(_save(fig, out / "gb_s_core_s.png"))
    fig, ax = plt.subplots(figsize=(8, 5))
    for d in deps:
        ttft = sorted(o["ttft_s"] for o in d["outcomes"] if o["ttft_s"] is not None)
        if ttft:
            ax.plot([1000 * t for t in ttft], [(i + 1) / len(ttft) for i in range(len(ttft))], label=d["label"])
    ax.set(xlabel="time to first token, ms", ylabel="share of requests", title="latency CDF", xscale="log")
    ax.legend(fontsize=7)
    written.append(_save(fig, out / "ttft_cdf.png"))
    for name, key in (("group_size", "group_size"), ("keep_alive", "keep_alive_s")):
        sweep = [d for d in deps if d["spec"]["kind"] == "mesh" and d["spec"]["routers"] == "shared"]
        values = sorted({d["spec"][key] for d in sweep})
        if len(values) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for d in sweep:
            ax.scatter(d["figures"]["gb_s"], pct([o["ttft_s"] for o in d["outcomes"]], 99) or 0, label=d["label"])
        ax.set(xlabel="memory GB·s", ylabel="TTFT p99, s", title=f"{name} sweep: cost against latency")
        ax.legend(fontsize=7)
        written.append(_save(fig, out / f"sweep_{name}.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
