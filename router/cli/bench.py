"""``faasmoe bench SCENARIO [--quick] [--out DIR]``: run a scenario's deployments on one workload and write
result.json, report.md and PNG plots (see :mod:`faasmoe.router.evaluation`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", help="scenario file (TOML; bench/scenarios/ has examples)")
    p.add_argument("--quick", action="store_true",
                   help="the tiny random model and a few seconds of workload (a check of the harness, ~2 min)")
    p.add_argument("--out", default=None, help="output folder (default: bench/out/<scenario>-<time>)")


def run(args) -> int:
    from faasmoe.router.evaluation.harness import quick, run_benchmark, save_json
    from faasmoe.router.evaluation.report import markdown, plots
    from faasmoe.router.evaluation.scenario import load_scenario
    scenario = load_scenario(args.scenario)
    if args.quick:
        scenario = quick(scenario)
    out = Path(args.out or f"bench/out/{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    result = run_benchmark(scenario, out, progress=lambda line: print(line, file=sys.stderr, flush=True))
    save_json(result, out / "result.json")
    (out / "report.md").write_text(markdown(result))
    pictures = plots(result, out)
    print(markdown(result))
    print(f"wrote {out / 'result.json'}, {out / 'report.md'} and {len(pictures)} plots in {time.monotonic() - t0:.0f} s",
          file=sys.stderr)
    return 0
