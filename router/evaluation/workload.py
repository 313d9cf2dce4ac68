"""Pure decision: the scenario's requests, in time order, from its seed.

Arrivals per tenant: Poisson (exponential gaps), Gamma (gaps with the given coefficient of variation: bursts
when it is > 1), or a replay of an Azure trace slice (its timestamps from ``offset_s`` on, multiplied by
``time_scale``). Lengths: the trace's (times ``scale``) or lognormal; then cut to the scenario's maxima (at
least one token). Everything comes from one seeded generator per tenant, so a scenario is one workload.
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from importlib import resources

from faasmoe.router.evaluation.corpora import Corpora
from faasmoe.router.evaluation.scenario import Lengths, Scenario, TenantSpec


@dataclass(frozen=True)
class WorkItem:
    request_id: str
    at_s: float                     # send time since the start of the run
    tenant: str
    prompt_ids: tuple[int, ...]
    max_tokens: int


def trace_rows(name: str) -> list[tuple[float, int, int]]:
    text = resources.files("faasmoe.router.evaluation").joinpath(f"traces/azure_{name}_slice.csv").read_text()
    return [(float(r["seconds"]), int(r["context_tokens"]), int(r["generated_tokens"]))
            for r in csv.DictReader(text.splitlines())]


def _arrivals(tenant: TenantSpec, duration_s: float, rng: random.Random) -> list[tuple[float, int | None, int | None]]:
    a = tenant.arrival
    out = []
    if a.process == "trace":
        for t, ctx, gen in trace_rows(a.trace):
            if t < a.offset_s:
                continue
            at = (t - a.offset_s) * a.time_scale
            if at >= duration_s:
                break
            out.append((at, ctx, gen))
        return out
    shape = 1.0 if a.process == "poisson" else 1.0 / (a.cv ** 2)
    t = 0.0
    while True:
        t += rng.gammavariate(shape, 1.0 / (a.rate_per_s * shape))
        if t >= duration_s:
            return out
        out.append((t, None, None))


def _length(spec: Lengths, trace_value: int | None, cap: int, rng: random.Random) -> int:
    if spec.from_trace and trace_value is not None:
        n = trace_value * spec.scale
    else:
        n = rng.lognormvariate(math.log(spec.median), spec.sigma)
    return max(1, min(cap, int(round(n))))


def build_workload(scenario: Scenario, corpora: Corpora) -> list[WorkItem]:
    items = []
    for tenant in scenario.tenants:
        rng = random.Random(f"{scenario.seed}:{tenant.name}")
        for i, (at, ctx, gen) in enumerate(_arrivals(tenant, scenario.duration_s, rng)):
            n_prompt = _length(tenant.prompt_tokens, ctx, scenario.max_prompt_tokens, rng)
            n_out = _length(tenant.output_tokens, gen, scenario.max_output_tokens, rng)
            ids = corpora.prompt_ids(tenant.corpus, n_prompt, rng)
            items.append(WorkItem(f"{tenant.name}-{i:04d}", round(at, 4), tenant.name, tuple(ids), n_out))
    return sorted(items, key=lambda w: (w.at_s, w.request_id))
