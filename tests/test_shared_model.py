"""Opt-in (a fresh clone lacks the model): the trained 8-layer, 60-expert checkpoint through a mesh of three
node processes gives transformers' greedy tokens, with prefill and decode logits within 1e-4.

    FAASMOE_SHARED_MODEL=1 python -m pytest -m shared_model tests/test_shared_model.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from faasmoe.router.control.local_mesh import LocalMesh
from faasmoe.router.model.build import build_mesh_model
from faasmoe.router.control.session import RouterSession
from faasmoe.router.store.split import split_checkpoint

SHARED_MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "qwen2moe-tiny-code"
PROMPTS = ["def quicksort(xs):\n    ", "import os\nimport sys\n\n", "class Stack:"]

pytestmark = [pytest.mark.shared_model,
              pytest.mark.skipif(not SHARED_MODEL.is_dir() or not os.environ.get("FAASMOE_SHARED_MODEL"),
                                 reason="needs ../shared/models/qwen2moe-tiny-code and FAASMOE_SHARED_MODEL=1")]


def _run(model, tok):
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tok.pad_token_id or 0,
                             temperature=None, top_p=None, top_k=None)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("group_size", [4, 15])
def test_trained_model_through_the_mesh(tmp_path, group_size):
    store = tmp_path / "store"
    split_checkpoint(SHARED_MODEL, store, group_size=group_size, progress=False)
    tok = AutoTokenizer.from_pretrained(str(store))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ref_seq, ref_logits = _run(AutoModelForCausalLM.from_pretrained(str(SHARED_MODEL), dtype=torch.float32).eval(),
                               tok)
    with LocalMesh(3, tmp_path / "nodes", memory_budget_mb=256) as mesh:
        session = RouterSession(store)
        try:
            session.place_and_deploy(mesh.addresses)
            seq, logits = _run(build_mesh_model(store, session.manifest, session.mesh), tok)
        finally:
            session.close()
    assert torch.equal(seq, ref_seq)
    assert (logits - ref_logits).abs().max().item() <= 1e-4
