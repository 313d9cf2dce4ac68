"""Granularity: group sizes from 1 to all 60 experts are exact, and nodes serve functions of different
sizes (two splits of one model, deployed side by side) at once."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from faasmoe.router.control.local_mesh import LocalMesh
from faasmoe.router.engine.generate import generate
from faasmoe.router.engine.reference import reference_generate
from faasmoe.router.engine.serving import local_serving
from faasmoe.router.store.split import split_checkpoint
from model_factory import make_checkpoint

PROMPTS = ["import numpy as np", "for i in range(10):"]
MAX_NEW = 6


@pytest.fixture(scope="module")
def model_60(tmp_path_factory):
    root = tmp_path_factory.mktemp("g60")
    model_dir = make_checkpoint(root / "model", num_layers=2, hidden_size=32, num_experts=60, top_k=4,
                                moe_intermediate_size=16, vocab_size=260, norm_topk_prob=False, seed=5)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    expected = [r.token_ids for r in reference_generate(ref, tok, PROMPTS, MAX_NEW)]
    with LocalMesh(3, root / "nodes", memory_budget_mb=256) as mesh:
        yield model_dir, root, tok, expected, mesh


async def _serve(store, tok, mesh):
    async with local_serving(store, mesh.addresses) as serving:
        return [g.token_ids for g in await generate(serving.engine, tok, PROMPTS, MAX_NEW)], serving.mesh.stats


def _run(store, tok, mesh):
    return asyncio.run(_serve(store, tok, mesh))


@pytest.mark.parametrize("group_size", [1, 2, 4, 15, 60])
def test_group_size_is_exact(model_60, group_size):
    model_dir, root, tok, expected, mesh = model_60
    store = root / f"store-G{group_size}"
    manifest = split_checkpoint(model_dir, store, group_size=group_size, progress=False)
    assert len(manifest.functions) == 2 * 60 // group_size
    tokens, stats = _run(store, tok, mesh)
    assert tokens == expected
    assert stats.function_calls > 0


def test_mixed_group_sizes_share_the_nodes(model_60):
    model_dir, root, tok, expected, mesh = model_60
    stores = []
    for g in (3, 20):
        store = root / f"mixed-G{g}"
        split_checkpoint(model_dir, store, group_size=g, progress=False)
        stores.append(store)
    async def both():
        async with local_serving(stores[0], mesh.addresses) as a, local_serving(stores[1], mesh.addresses) as b:
            # both splits now live on the same nodes; each generates exactly, at the same time
            out = await asyncio.gather(generate(a.engine, tok, PROMPTS, MAX_NEW), generate(b.engine, tok, PROMPTS,
                                                                                          MAX_NEW))
            return out, a.session.client(mesh.addresses[0]).status()

    (out_a, out_b), status = asyncio.run(both())
    assert [g.token_ids for g in out_a] == expected and [g.token_ids for g in out_b] == expected
    sizes = {f.size_bytes for f in status.functions}
    assert len(sizes) >= 2      # functions of different granularity side by side on one node
