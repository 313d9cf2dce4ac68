"""Greedy tokens through a mesh of real node processes, served by the engine, equal transformers' own
``generate`` prompt by prompt; logits of every generated token agree within 1e-4 (fp32). The prompts run
concurrently, so they are co-batched in the engine's steps."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from faasmoe.router.control.local_mesh import LocalMesh
from faasmoe.router.engine.reference import reference_generate
from faasmoe.router.engine.sampling import SamplingParams
from faasmoe.router.engine.sequence import Request
from faasmoe.router.control.replicas import ReplicaPolicy
from faasmoe.router.engine.serving import local_serving
from faasmoe.router.store.split import split_checkpoint
from model_factory import make_checkpoint

PROMPTS = ["def add(a, b):", "x", "the quick brown fox jumps over"]   # unequal lengths
MAX_NEW = 8


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    with LocalMesh(3, tmp_path_factory.mktemp("nodes"), memory_budget_mb=256) as m:
        yield m


async def _serve_all(store, addresses, prompt_ids):
    async with local_serving(store, addresses, replica_policy=ReplicaPolicy("2")) as serving:   # every node busy
        results = await asyncio.gather(*(serving.engine.generate(Request(tuple(ids), MAX_NEW, SamplingParams(),
                                                                           keep_logits=True))
                                         for ids in prompt_ids))
        nodes = {n for nodes in serving.session.placement.values() for n in nodes}
        return results, serving.mesh.stats.rpcs, nodes


CONFIGS = [
    # id, checkpoint kwargs, group size
    ("norm-off-G1", dict(norm_topk_prob=False, num_experts=8, top_k=2), 1),
    ("norm-on-G4-divisor", dict(norm_topk_prob=True, num_experts=8, top_k=2), 4),
    ("norm-on-Gall", dict(norm_topk_prob=True, num_experts=8, top_k=2), 8),
    ("norm-off-G5-uneven-top4-fused", dict(norm_topk_prob=False, num_experts=12, top_k=4, layout="fused",
                                           num_layers=3, mlp_only_layers=(1,)), 5),
]


@pytest.mark.parametrize("kwargs,group_size", [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_mesh_matches_transformers(tmp_path, mesh, kwargs, group_size):
    model_dir = make_checkpoint(tmp_path / "model", hidden_size=64, moe_intermediate_size=32, vocab_size=260,
                                seed=7, **kwargs)
    store = tmp_path / "store"
    split_checkpoint(model_dir, store, group_size=group_size, progress=False)
    tok = AutoTokenizer.from_pretrained(str(store))
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    refs = reference_generate(reference, tok, PROMPTS, MAX_NEW)
    results, rpcs, nodes = asyncio.run(_serve_all(store, mesh.addresses, [r.prompt_token_ids for r in refs]))
    assert len(nodes) == 3 and rpcs > 0                     # really spread over the mesh
    for ref, res in zip(refs, results):
        assert res.token_ids == ref.token_ids
        assert res.logits.shape == ref.logits.shape
        assert (res.logits - ref.logits).abs().max().item() <= 1e-4
        assert res.text == tok.decode(res.token_ids, skip_special_tokens=True)


def test_router_cli_generate_json(tmp_path, mesh):
    model_dir = make_checkpoint(tmp_path / "model", hidden_size=64, moe_intermediate_size=32, vocab_size=260,
                                num_experts=8, top_k=2, seed=3)
    store = tmp_path / "store"
    split_checkpoint(model_dir, store, group_size=2, progress=False)
    proc = subprocess.run([sys.executable, "-m", "faasmoe.router", "generate", "--store", str(store),
                           "--nodes", ",".join(mesh.addresses), "--prompt", PROMPTS[0], "--prompt", PROMPTS[2],
                           "--max-new-tokens", str(MAX_NEW), "--json"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)["results"]
    tok = AutoTokenizer.from_pretrained(str(store))
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    refs = reference_generate(reference, tok, [PROMPTS[0], PROMPTS[2]], MAX_NEW)
    for item, ref in zip(out, refs):
        assert item["prompt_token_ids"] == ref.prompt_token_ids
        assert item["token_ids"] == ref.token_ids
        assert item["text"] == tok.decode(item["token_ids"], skip_special_tokens=True)
