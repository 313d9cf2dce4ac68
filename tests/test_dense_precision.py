"""``--dense-dtype bfloat16 | int8``: the router stores the attention and shared-expert projections and the
embedding table in bfloat16 and keeps activations, norms, the gate and ``lm_head`` in float32; or runs those
projections and ``lm_head`` through ONNX Runtime's MatMulNBits over int8 blocks. Neither is exact against float32
(their fidelity is a benchmark), but each is exactly what it says: greedy tokens through real nodes equal
transformers' own model with the same modules swapped, and the big matrices really take fewer bytes."""

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
from faasmoe.router.model.bf16 import Bf16Embedding, Bf16Linear, store_in_bfloat16
from faasmoe.router.model.int8 import Int8Linear, store_in_int8
from faasmoe.router.model.build import build_mesh_model, dense_bytes
from faasmoe.router.store.split import split_checkpoint
from model_factory import make_checkpoint

PROMPTS = ["def add(a, b):", "the quick brown fox jumps over"]


@pytest.mark.parametrize("dtype,linear,swap,ratio", [(torch.bfloat16, Bf16Linear, store_in_bfloat16, 0.8),
                                                      (torch.int8, Int8Linear, store_in_int8, 0.6)],
                         ids=["bfloat16", "int8"])
def test_dense_part_equals_transformers_with_the_same_modules(tmp_path, dtype, linear, swap, ratio):
    model_dir = make_checkpoint(tmp_path / "model", num_layers=3, hidden_size=64, moe_intermediate_size=32,
                                num_experts=8, top_k=2, vocab_size=260, mlp_only_layers=(1,), seed=9)
    store = tmp_path / "store"
    manifest = split_checkpoint(model_dir, store, group_size=4, progress=False)
    fp32, lean = build_mesh_model(store, manifest), build_mesh_model(store, manifest, dtype)
    assert isinstance(lean.model.layers[0].self_attn.q_proj, linear)
    assert isinstance(lean.model.layers[1].mlp.down_proj, linear)              # a dense layer's MLP too
    assert isinstance(lean.model.embed_tokens, Bf16Embedding)
    assert isinstance(lean.lm_head, Int8Linear) if dtype == torch.int8 else lean.lm_head.weight.dtype == torch.float32
    assert lean.model.layers[0].mlp.gate.weight.dtype == torch.float32
    assert dense_bytes(lean) < ratio * dense_bytes(fp32)

    tok = AutoTokenizer.from_pretrained(str(store))
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    swap(reference)
    expected = reference_generate(reference, tok, PROMPTS, 8)

    async def run(addresses):
        async with local_serving(store, addresses, dtype=dtype) as serving:
            assert serving.precision.label() == {"experts": "fp32", "block_size": 0, "dense": str(dtype)[6:],
                                                 "exact": False}
            return [await serving.engine.generate(Request(tuple(r.prompt_token_ids), 8, SamplingParams(),
                                                          keep_logits=True)) for r in expected]

    with LocalMesh(2, tmp_path / "nodes", memory_budget_mb=128) as mesh:
        results = asyncio.run(run(mesh.addresses))
    for ref, res in zip(expected, results):
        assert res.token_ids == ref.token_ids
        assert (res.logits - ref.logits).abs().max().item() <= 1e-3


def test_a_dense_tensor_of_the_wrong_shape_is_a_one_line_error(tmp_path):
    from safetensors.torch import load_file, save_file

    from faasmoe.proto.errors import CheckpointError
    model_dir = make_checkpoint(tmp_path / "model", num_layers=2, hidden_size=64, moe_intermediate_size=32,
                                num_experts=8, top_k=2, vocab_size=260, seed=9)
    store = tmp_path / "store"
    manifest = split_checkpoint(model_dir, store, group_size=4, progress=False)
    dense = load_file(str(store / manifest.dense_file))
    dense["model.norm.weight"] = torch.ones(3)                  # copy_ would broadcast [3] silently into [64]?
    save_file(dense, str(store / manifest.dense_file))
    for dtype in (torch.float32, torch.bfloat16, torch.int8):
        with pytest.raises(CheckpointError, match=r"model.norm.weight is \[3\], the config makes it \[64\]"):
            build_mesh_model(store, manifest, dtype)


def test_an_int8_weight_that_cannot_be_prepared_is_a_one_line_error(tmp_path, monkeypatch):
    import tempfile

    from faasmoe.proto.errors import CheckpointError
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-dir"))     # its session file cannot be written
    with pytest.raises(CheckpointError, match=r"int8 session of a 16x64 dense weight in .*no-such-dir \(set TMPDIR\)"):
        Int8Linear(torch.nn.Linear(64, 16, bias=False))
