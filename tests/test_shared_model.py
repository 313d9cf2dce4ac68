"""The trained 8-layer, 60-expert checkpoint in ``../shared/models`` (runs whenever it is there; CI has it):
served by the engine through a mesh of three node processes, the prompts co-batched, every prompt gets
transformers' greedy tokens, with logits within 1e-4."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from faasmoe.router.control.local_mesh import LocalMesh
from faasmoe.router.engine.reference import reference_generate
from faasmoe.router.engine.sampling import SamplingParams
from faasmoe.router.engine.sequence import Request
from faasmoe.router.engine.serving import local_serving
from faasmoe.router.store.split import split_checkpoint

PROMPTS = ["def quicksort(xs):\n    ", "import os\nimport sys\n\n", "class Stack:"]
MAX_NEW = 24
pytestmark = pytest.mark.shared_model


async def _serve(store, addresses, refs):
    async with local_serving(store, addresses) as serving:
        return await asyncio.gather(*(serving.engine.generate(
            Request(tuple(r.prompt_token_ids), MAX_NEW, SamplingParams(), keep_logits=True)) for r in refs))


@pytest.mark.parametrize("group_size", [4, 15])
def test_trained_model_through_the_mesh(tmp_path, shared_model, group_size):
    store = tmp_path / "store"
    split_checkpoint(shared_model, store, group_size=group_size, progress=False)
    tok = AutoTokenizer.from_pretrained(str(store))
    reference = AutoModelForCausalLM.from_pretrained(str(shared_model), dtype=torch.float32).eval()
    refs = reference_generate(reference, tok, PROMPTS, MAX_NEW)
    with LocalMesh(3, tmp_path / "nodes", memory_budget_mb=256) as mesh:
        results = asyncio.run(_serve(store, mesh.addresses, refs))
    for ref, res in zip(refs, results):
        assert res.token_ids == ref.token_ids
        assert (res.logits - ref.logits).abs().max().item() <= 1e-4
