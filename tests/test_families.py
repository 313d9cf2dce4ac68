"""Every supported MoE family (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V2, DeepSeek-V3) through the same
split, mesh and API: greedy tokens identical to transformers' own ``generate``, alone and co-batched, at group
size 1 and at the largest (one function per layer); the checks that refuse a bad checkpoint by name."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from faasmoe.proto.errors import CheckpointError
from faasmoe.router.control.local_mesh import LocalMesh
from faasmoe.router.engine.reference import reference_generate
from faasmoe.router.engine.sampling import SamplingParams
from faasmoe.router.engine.sequence import Request
from faasmoe.router.engine.serving import local_serving
from faasmoe.router.families import FAMILIES, family_of
from faasmoe.router.store.checkpoint import read_config
from faasmoe.router.store.split import split_checkpoint
from faasmoe.router.store.tiny_families import FAMILY_NAMES, make_family_checkpoint, make_family_config
from serving_fixtures import RouterProcess

PROMPTS = ["def add(a, b):", "x", "the quick brown fox jumps over the lazy dog, twice"]   # unequal lengths
MAX_NEW = 10


@dataclass
class FamilyModel:
    name: str
    model_dir: Path
    tokenizer: object
    reference: object
    refs: list
    num_experts: int


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    with LocalMesh(3, tmp_path_factory.mktemp("nodes"), memory_budget_mb=256) as m:
        yield m


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family_model(request, tmp_path_factory) -> FamilyModel:
    name = request.param
    model_dir = make_family_checkpoint(tmp_path_factory.mktemp(name) / "model", name, seed=11)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return FamilyModel(name, model_dir, tok, reference, reference_generate(reference, tok, PROMPTS, MAX_NEW),
                       read_config(model_dir).num_experts)


def _split(fm: FamilyModel, tmp_path: Path, group_size: int) -> Path:
    store = tmp_path / f"store-G{group_size}"
    split_checkpoint(fm.model_dir, store, group_size=group_size, progress=False)
    return store


def test_serve_with_openai_client_largest_group(family_model, mesh, tmp_path):
    """`serve` over three nodes, one function per MoE layer: the official client's greedy completions equal
    transformers', sent one at a time and all at once (co-batched, one of them streamed)."""
    fm = family_model
    store = _split(fm, tmp_path, fm.num_experts)
    expected = [fm.tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in fm.refs]
    with RouterProcess(store, mesh.addresses) as router:
        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)

        def complete(prompt: str) -> tuple[str, int]:
            out = client.completions.create(model=router.model, prompt=prompt, max_tokens=MAX_NEW, temperature=0)
            return out.choices[0].text, out.usage.completion_tokens

        def streamed(prompt: str) -> tuple[str, int]:
            chunks = list(client.completions.create(model=router.model, prompt=prompt, max_tokens=MAX_NEW,
                                                    temperature=0, stream=True,
                                                    stream_options={"include_usage": True}))
            return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage.completion_tokens

        alone = [complete(p) for p in PROMPTS]
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(lambda i: (streamed if i == 0 else complete)(PROMPTS[i]), range(len(PROMPTS))))
        assert router.counter("faasmoe_router_rpcs_total") > 0
    for ref, text, (a_text, a_n), (t_text, t_n) in zip(fm.refs, expected, alone, together):
        assert (a_text, a_n) == (text, len(ref.token_ids)), fm.name
        assert (t_text, t_n) == (text, len(ref.token_ids)), fm.name


async def _generate(store: Path, addresses, prompt_ids):
    async with local_serving(store, addresses) as serving:
        alone = [await serving.engine.generate(Request(tuple(ids), MAX_NEW, SamplingParams(), keep_logits=True))
                 for ids in prompt_ids]
        together = await asyncio.gather(*(serving.engine.generate(Request(tuple(ids), MAX_NEW, SamplingParams(),
                                                                          keep_logits=True)) for ids in prompt_ids))
        return alone, together, serving.mesh.stats.rpcs


def test_group_size_one_alone_and_co_batched(family_model, mesh, tmp_path):
    """One expert per function: the same tokens, and every generated token's logits within 1e-4."""
    fm = family_model
    store = _split(fm, tmp_path, 1)
    alone, together, rpcs = asyncio.run(_generate(store, mesh.addresses, [r.prompt_token_ids for r in fm.refs]))
    assert rpcs > 0
    for ref, a, t in zip(fm.refs, alone, together):
        for res in (a, t):
            assert res.token_ids == ref.token_ids, fm.name
            assert (res.logits - ref.logits).abs().max().item() <= 1e-4


def test_sliding_window_is_exact(mesh, tmp_path):
    """Mixtral with an 8-token window on prompts and generations longer than it: exact, and the window matters
    (the same weights without it answer differently)."""
    model_dir = make_family_checkpoint(tmp_path / "model", "mixtral", seed=4, sliding_window=8)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    windowed = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    full = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, sliding_window=None).eval()
    prompts = [PROMPTS[2], PROMPTS[0]]
    refs = reference_generate(windowed, tok, prompts, 16)
    assert [r.token_ids for r in refs] != [r.token_ids for r in reference_generate(full, tok, prompts, 16)]
    store = tmp_path / "store"
    split_checkpoint(model_dir, store, group_size=4, progress=False)

    async def run():
        async with local_serving(store, mesh.addresses) as serving:
            one = [await serving.engine.generate(Request(tuple(r.prompt_token_ids), 16, SamplingParams(),
                                                         keep_logits=True)) for r in refs]
            both = await asyncio.gather(*(serving.engine.generate(Request(tuple(r.prompt_token_ids), 16,
                                                                          SamplingParams())) for r in refs))
            return one, both
    one, both = asyncio.run(run())
    assert [r.token_ids for r in one] == [r.token_ids for r in refs] == [r.token_ids for r in both]
    for alone, ref in zip(one, refs):              # every token's logits, past the full window too
        assert (alone.logits - ref.logits).abs().max().item() <= 1e-4


def test_extra_layers_past_the_model_are_skipped(tmp_path):
    """DeepSeek-V3's release carries a multi-token-prediction layer past num_hidden_layers (transformers ignores
    it): the split skips it instead of refusing the checkpoint."""
    model_dir = make_family_checkpoint(tmp_path / "model", "deepseek_v3", seed=2)
    tensors = load_file(str(model_dir / "model.safetensors"))
    extra = {k.replace("model.layers.2.", "model.layers.3.", 1): v.clone() for k, v in tensors.items()
             if k.startswith("model.layers.2.")}
    save_file({**tensors, **extra}, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    split_checkpoint(model_dir, tmp_path / "store", group_size=4, progress=False)
    dense = load_file(str(tmp_path / "store" / "dense.safetensors"))
    assert not any(k.startswith("model.layers.3.") for k in dense) and "model.layers.2.mlp.gate.weight" in dense


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_moe_layers_match_transformers(name):
    """Which layers have an MoE block, from config.json alone, as transformers builds them."""
    from transformers import AutoModelForCausalLM as Auto
    variants = {"qwen2_moe": [dict(mlp_only_layers=[1]), dict(decoder_sparse_step=2)],
                "qwen3_moe": [dict(mlp_only_layers=[0, 2]), dict(decoder_sparse_step=2)],
                "deepseek_v2": [dict(first_k_dense_replace=2)], "deepseek_v3": [dict(first_k_dense_replace=0)]}
    for overrides in [{}] + variants.get(name, []):
        if name == "qwen2_moe":
            from faasmoe.router.store.tiny_model import make_config
            config = make_config(num_layers=4, **{("mlp_only_layers" if k == "mlp_only_layers" else k): v
                                                   for k, v in overrides.items()})
        else:
            config = make_family_config(name, num_hidden_layers=4, **overrides)
        with torch.device("meta"):
            model = Auto.from_config(config)
        built = tuple(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts"))
        assert FAMILIES[name].moe_layers(json.loads(config.to_json_string())) == built, (name, overrides)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_missing_expert_tensor_is_named(name, tmp_path):
    """Each family's checkpoint names; the command line (one family is enough) says it in one line."""
    model_dir = make_family_checkpoint(tmp_path / "model", name, seed=1)
    family = family_of(name)
    victim = f"{family.expert_prefix(read_config(model_dir).moe_layers[-1])}.3.{family.expert_keys[0]}.weight"
    tensors = load_file(str(model_dir / "model.safetensors"))
    assert victim in tensors
    del tensors[victim]
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape(victim)):
        split_checkpoint(model_dir, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()
    if name == "mixtral":
        proc = subprocess.run([sys.executable, "-m", "faasmoe.router.cli.umbrella", "split", str(model_dir),
                               "--out", str(tmp_path / "s"), "--no-progress"], capture_output=True, text=True,
                              timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and victim in lines[0], proc.stderr


def test_unknown_model_type_lists_the_families(tmp_path):
    model_dir = make_family_checkpoint(tmp_path / "model", "olmoe", seed=1)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (model_dir / "config.json").write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-m", "faasmoe.router.cli.umbrella", "split", str(model_dir), "--out", str(tmp_path / "s"),
                           "--no-progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    line = proc.stderr.strip()
    assert "\n" not in line and "'llama'" in line
    for family in FAMILIES.values():
        assert family.model_type in line and family.architecture in line
    with pytest.raises(CheckpointError, match="qwen3_moe"):
        family_of("llama")
