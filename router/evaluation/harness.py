"""``faasmoe bench``: one workload, every deployment of the scenario in turn, each measured the same way.

For each deployment: start its processes (in a cgroup where possible), sample them at 4 Hz, replay the
workload open-loop, keep sampling until the last response and for the scenario's whole window (idle memory
counts), read the cold starts, stop everything. The first deployment's outputs are the reference: a deployment
whose greedy outputs differ from them is reported as differing, never as a saving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from faasmoe.router.evaluation.corpora import Corpora
from faasmoe.router.evaluation.deploy import start_deployment
from faasmoe.router.evaluation.load import replay
from faasmoe.router.evaluation.sampler import Cgroup, ProcessSampler, integrate
from faasmoe.router.evaluation.scenario import DeploymentSpec, Scenario
from faasmoe.router.evaluation.workload import build_workload
from faasmoe.router.tenancy.config import Tenant, TenantsConfig, hash_key, new_key, save_tenants

log = logging.getLogger(__name__)
TAIL_S = 3.0        # sampling goes on this long after the last response (and at least to the window's end)
TINY = dict(num_layers=4, hidden_size=64, num_experts=16, top_k=4, moe_intermediate_size=32,
            shared_expert_intermediate_size=96, vocab_size=97, seed=0)
QWEN_DIMS = dict(hidden_size=2048, num_experts=60, top_k=4, moe_intermediate_size=1408,
                 shared_expert_intermediate_size=5632, vocab_size=151936, num_attention_heads=16,
                 num_key_value_heads=16, norm_topk_prob=False, seed=1234)


def quick(scenario: Scenario) -> Scenario:
    """The scenario on the tiny random model, cut to seconds (what CI runs)."""
    short = [replace(t, arrival=replace(t.arrival, rate_per_s=max(t.arrival.rate_per_s, 1.0)))
             if t.arrival.process != "trace" else t for t in scenario.tenants]
    return replace(scenario, model="random:tiny", duration_s=min(scenario.duration_s, 4.0),
                   max_prompt_tokens=min(scenario.max_prompt_tokens, 24),
                   max_output_tokens=min(scenario.max_output_tokens, 6), tenants=tuple(short),
                   deployments=tuple(replace(d, node_memory_mb=min(d.node_memory_mb, 256),
                                             keep_alive_s=min(d.keep_alive_s, 2.0) if math.isfinite(d.keep_alive_s)
                                             else d.keep_alive_s) for d in scenario.deployments))


def prepare_model(scenario: Scenario, work: Path) -> Path:
    model_dir = scenario.model_dir()
    if model_dir is not None:
        return model_dir
    from faasmoe.router.store.tiny_model import make_checkpoint
    popularity = scenario.popularity_dir()
    target = work / (f"model-{scenario.model.split(':')[1]}-{scenario.random_layers}l"
                     + (f"-routed-like-{popularity.name}" if popularity else ""))
    if not (target / "config.json").exists():
        if scenario.model == "random:tiny":
            make_checkpoint(target, **{**TINY, "num_layers": scenario.random_layers})
        elif popularity is not None:             # bfloat16 weights; float32 deployments upcast the same values
            from faasmoe.router.evaluation.qwen_weights import write_checkpoint
            write_checkpoint(target, scenario.random_layers, seed=QWEN_DIMS["seed"], popularity_from=popularity)
        else:
            make_checkpoint(target, num_layers=scenario.random_layers, with_tokenizer=False, **QWEN_DIMS)
    return target


def _stores(model_dir: Path, work: Path):
    from faasmoe.router.store.split import ensure_split
    made: dict[int, Path] = {}

    def store_of(group_size: int) -> Path:
        if group_size not in made:
            made[group_size] = ensure_split(model_dir, work / f"store-G{group_size}", group_size)
        return made[group_size]
    return store_of


def run_benchmark(scenario: Scenario, out: Path, progress: Callable[[str], None] = print) -> dict:
    from transformers import AutoConfig

    from faasmoe.router.engine.serving import load_tokenizer
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model(scenario, work)
    store_of = _stores(model_dir, work)
    tokenizer = load_tokenizer(model_dir)
    config = AutoConfig.from_pretrained(str(model_dir))
    items = build_workload(scenario, Corpora(tokenizer, config.vocab_size, scenario.seed))
    tenants = [t.name for t in scenario.tenants]
    keys, admin = {t: new_key() for t in tenants}, new_key()
    tenants_file = work / "tenants.toml"
    save_tenants(tenants_file, TenantsConfig({t: Tenant(t, hash_key(k)) for t, k in keys.items()}, hash_key(admin)))
    progress(f"{scenario.name}: {len(items)} requests from {len(tenants)} tenants over {scenario.duration_s:g} s, "
             f"{len(scenario.deployments)} deployments")
    results, reference = [], None
    for i, spec in enumerate(scenario.deployments, 1):
        progress(f"[{i}/{len(scenario.deployments)}] {spec.label}: starting")
        result = _run_one(spec, scenario, items, model_dir, store_of, tenants, keys, admin, tenants_file,
                          work / spec.label, reference)
        reference = reference or {o["request_id"]: o["output"] for o in result["outcomes"]}
        results.append(result)
        progress(f"[{i}/{len(scenario.deployments)}] {spec.label}: {result['figures']['gb_s']:.1f} GB·s, "
                 f"{result['figures']['core_s']:.1f} core·s, {result['errors']} errors, outputs identical "
                 f"{result['identical']}/{len(items)}")
    return dict(scenario=scenario.name, model=scenario.model, model_dir=str(model_dir), seed=scenario.seed,
                duration_s=scenario.duration_s, requests=len(items), tenants=tenants,
                workload=[asdict(w) | {"prompt_tokens": len(w.prompt_ids), "prompt_ids": None} for w in items],
                deployments=results)


def _run_one(spec: DeploymentSpec, scenario: Scenario, items, model_dir, store_of, tenants, keys, admin,
             tenants_file, work: Path, reference) -> dict:
    cgroup = Cgroup.create(spec.label)
    run = start_deployment(spec, model_dir=model_dir, store_of=store_of, tenants=tenants, keys=keys, admin_key=admin,
                           tenants_file=tenants_file, workdir=work, dtype=scenario.baseline_dtype, cgroup=cgroup)
    try:
        sampler = ProcessSampler(run.roles, hz=4.0, cgroup=cgroup).start()
        copies = CopiesWatch(run).start()
        t0 = time.monotonic()
        outcomes = asyncio.run(replay(items, run.urls, run.keys))
        end_s = max(scenario.duration_s, time.monotonic() - t0) + TAIL_S    # the window, idle memory included
        while time.monotonic() - t0 < end_s:
            time.sleep(0.05)
        samples = sampler.stop()
        cold_starts = run.cold_starts()
    finally:
        if "copies" in locals():
            copies.stop()
        run.stop()
        if cgroup is not None:
            cgroup.remove()
    figures = integrate(samples)
    ok = [o for o in outcomes if o.error is None]
    identical = sum(reference is None or reference.get(o.request_id) == o.output for o in ok)
    return dict(label=spec.label, spec=asdict(spec), figures=figures, roles=sorted(run.roles.values()),
                sampled_roles=sorted(samples.roles.values()), cold_starts=cold_starts, copies=copies.summary(),
                errors=len(outcomes) - len(ok), identical=identical if reference is not None else len(ok),
                outcomes=[asdict(o) for o in outcomes],
                series=dict(times_s=samples.times_s,
                            total_gb=[sum(samples.rss[p][k] for p in samples.rss) / 1e9
                                      for k in range(len(samples.times_s))]))


class CopiesWatch:
    """The mesh's function copies every ``period_s`` while a deployment runs (the replica count over time)."""

    def __init__(self, run, period_s: float = 2.0):
        self.run, self.period_s, self.seen = run, period_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="faasmoe-copies", daemon=True)

    def start(self) -> CopiesWatch:
        if self.run.spec.kind == "mesh":
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.seen.append(self.run.copies())

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self) -> dict:
        return {"min": min(self.seen), "max": max(self.seen), "last": self.seen[-1]} if self.seen else {}


def save_json(result: dict, path: Path) -> None:
    path.write_text(json.dumps(result, indent=1, default=str))
