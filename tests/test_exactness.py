"""Greedy tokens through a mesh of real node processes equal transformers' ``generate``; prefill and
decode logits agree within 1e-4 (fp32)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from faasmoe.router.control.local_mesh import LocalMesh
from faasmoe.router.model.build import build_mesh_model
from faasmoe.router.control.session import RouterSession
from faasmoe.router.store.split import split_checkpoint
from model_factory import make_checkpoint

PROMPTS = ["def add(a, b):", "x", "the quick brown fox jumps over"]   # unequal lengths, one batch
MAX_NEW = 8


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    with LocalMesh(3, tmp_path_factory.mktemp("nodes"), memory_budget_mb=256) as m:
        yield m


def _generate(model, tok, prompts):
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                             temperature=None, top_p=None, top_k=None)
        prefill = model(**enc).logits
    return out.sequences, torch.stack(out.logits), prefill


CONFIGS = [
    # id, checkpoint kwargs, group size
    ("norm-off-G1", dict(norm_topk_prob=False, num_experts=8, top_k=2), 1),
    ("norm-on-G4-divisor", dict(norm_topk_prob=True, num_experts=8, top_k=2), 4),
    ("norm-on-Gall", dict(norm_topk_prob=True, num_experts=8, top_k=2), 8),
    ("norm-off-G3-uneven-top4-fused", dict(norm_topk_prob=False, num_experts=12, top_k=4, layout="fused",
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
    ref_seq, ref_logits, ref_prefill = _generate(reference, tok, PROMPTS)

    session = RouterSession(store)
    try:
        plan, _ = session.place_and_deploy(mesh.addresses)
        assert len({n for nodes in plan.values() for n in nodes}) == 3          # really spread
        model = build_mesh_model(store, session.manifest, session.mesh)
        seq, logits, prefill = _generate(model, tok, PROMPTS)
        assert session.mesh.stats.rpcs > 0
    finally:
        session.close()
    assert torch.equal(seq, ref_seq)
    assert (prefill - ref_prefill).abs().max().item() <= 1e-4
    assert (logits - ref_logits).abs().max().item() <= 1e-4


def test_router_cli_generate_json(tmp_path, mesh):
    model_dir = make_checkpoint(tmp_path / "model", hidden_size=64, moe_intermediate_size=32, vocab_size=260,
                                num_experts=8, top_k=2, seed=3)
    store = tmp_path / "store"
    split_checkpoint(model_dir, store, group_size=2, progress=False)
    proc = subprocess.run([sys.executable, "-m", "faasmoe.router", "generate", "--store", str(store),
                           "--nodes", ",".join(mesh.addresses), "--prompt", PROMPTS[0],
                           "--max-new-tokens", str(MAX_NEW), "--json"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    tok = AutoTokenizer.from_pretrained(str(store))
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ref_seq, _, _ = _generate(reference, tok, PROMPTS[:1])
    assert out["prompt_token_ids"] == tok(PROMPTS[0])["input_ids"]
    assert out["token_ids"] == ref_seq[0, len(out["prompt_token_ids"]):].tolist()
    assert out["text"] == tok.decode(out["token_ids"], skip_special_tokens=True)
