"""faasmoe split: checkpoint reading (both expert layouts, single file and sharded), the store it writes,
numerics of the ONNX functions against transformers' own experts, and one-line errors for bad inputs."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file

from faasmoe.proto import function_abi as abi
from faasmoe.proto.errors import CheckpointError, ConfigError
from faasmoe.router.store import split as split_mod
from faasmoe.router.store.checkpoint import open_checkpoint
from faasmoe.router.store.manifest import load_manifest
from faasmoe.router.store.split import add_arguments, run, split_checkpoint
from model_factory import make_checkpoint, make_model, torch_expert

EXPERT_RE = re.compile(r"\.mlp\.experts\.")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The same seed-0 model in four on-disk forms."""
    root = tmp_path_factory.mktemp("ckpts")
    return {(layout, shards): make_checkpoint(root / f"{layout}-{shards}", layout=layout, shards=shards)
            for layout in ("per_expert", "fused") for shards in (1, 3)}


def _split(src: Path, out: Path, **kw):
    return split_checkpoint(src, out, progress=False, **kw)


def _run_function(store: Path, entry, x: np.ndarray, rows: list[np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(store / entry.file), providers=["CPUExecutionProvider"])
    feeds = {abi.HIDDEN_INPUT: x, **{abi.rows_input(j): r for j, r in enumerate(rows)}}
    return session.run([abi.OUTPUT], feeds)[0]


def _check_numerics(store: Path, manifest, model, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for entry in manifest.functions:
        x = rng.standard_normal((9, manifest.hidden_size)).astype(np.float32)
        rows = [np.sort(rng.choice(9, size=rng.integers(0, 7), replace=False)).astype(np.int64) for _ in entry.expert_ids]
        got = _run_function(store, entry, x, rows)
        with torch.no_grad():
            want = torch.cat([torch_expert(model, entry.layer, e, torch.from_numpy(x[r]))
                              for e, r in zip(entry.expert_ids, rows)]).numpy()
        assert got.shape == want.shape
        scale = max(1.0, float(np.abs(want).max(initial=0)))
        assert np.abs(got - want).max(initial=0) <= 1e-5 * scale, entry.name


def _no_partial_dirs(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.endswith(".partial") or ".old-" in p.name]


# ---- layouts, sharding, group sizes ---------------------------------------------------------------------------
def test_layouts_and_shards_give_identical_stores(ckpts, tmp_path):
    manifests, dense = {}, {}
    for key, src in ckpts.items():
        store = tmp_path / f"{key[0]}-{key[1]}"
        manifests[key] = _split(src, store, group_size=3)
        dense[key] = (store / "dense.safetensors").read_bytes()
    ref = manifests[("per_expert", 1)]
    for key, m in manifests.items():
        assert [(f.name, f.sha256, f.bytes) for f in m.functions] == [(f.name, f.sha256, f.bytes) for f in ref.functions], key
        assert m.model_id == ref.model_id
        assert dense[key] == dense[("per_expert", 1)], key
    for entry in ref.functions:      # identical bytes, not just identical hashes in the manifest
        files = {(tmp_path / f"{k[0]}-{k[1]}" / entry.file).read_bytes() for k in ckpts}
        assert len(files) == 1


@pytest.mark.parametrize("group_size, sizes", [(1, [1] * 8), (2, [2] * 4), (8, [8]), (3, [3, 3, 2]), (None, [4, 4])])
def test_group_sizes_cover_every_expert_once(ckpts, tmp_path, group_size, sizes):
    store = tmp_path / "store"
    m = _split(ckpts[("fused", 3)], store, group_size=group_size)
    assert m.group_size == (group_size or 4) and m.moe_layers == (0, 1)
    for layer in m.moe_layers:
        fns = m.layer_functions(layer)
        assert [len(f.expert_ids) for f in fns] == sizes
        assert sorted(e for f in fns for e in f.expert_ids) == list(range(8))
    for f in m.functions:
        first, last = f.expert_ids[0], f.expert_ids[-1]
        assert f.name == f"L{f.layer:02d}.E{first:02d}-{last:02d}"
        assert f.file == f"functions/L{f.layer:02d}_E{first:02d}-{last:02d}.onnx"
        data = (store / f.file).read_bytes()
        assert len(data) == f.bytes and f.sha256 == f.function_id == split_mod.hashlib.sha256(data).hexdigest()
        assert f.dtype == "float32" and f.opset == split_mod.OPSET
    assert sorted(p.name for p in (store / "functions").iterdir()) == sorted(Path(f.file).name for f in m.functions)
    assert load_manifest(store) == m
    assert m.dense_bytes == (store / "dense.safetensors").stat().st_size


def test_functions_match_transformers_experts(ckpts, tmp_path):
    m = _split(ckpts[("per_expert", 3)], tmp_path / "s", group_size=3)
    _check_numerics(tmp_path / "s", m, make_model(seed=0))


def test_bf16_fused_and_sparse_layers(tmp_path):
    kw = dict(num_layers=4, num_experts=6, top_k=3, mlp_only_layers=(3,), decoder_sparse_step=2, seed=7,
              dtype="bfloat16")
    a = _split(make_checkpoint(tmp_path / "a", layout="fused", shards=2, **kw), tmp_path / "sa", group_size=4)
    b = _split(make_checkpoint(tmp_path / "b", layout="per_expert", **kw), tmp_path / "sb", group_size=4)
    assert a.moe_layers == (1,) and [f.expert_ids for f in a.functions] == [(0, 1, 2, 3), (4, 5)]
    assert [f.sha256 for f in a.functions] == [f.sha256 for f in b.functions]
    model = make_model(**kw).float()      # bf16 weights, exactly representable in float32
    _check_numerics(tmp_path / "sa", a, model)
    dense = load_file(str(tmp_path / "sa" / "dense.safetensors"))
    assert "model.layers.3.mlp.gate_proj.weight" in dense and dense["model.norm.weight"].dtype == torch.bfloat16


def test_dense_file_holds_everything_but_routed_experts(ckpts, tmp_path):
    _split(ckpts[("per_expert", 1)], tmp_path / "s")
    dense = load_file(str(tmp_path / "s" / "dense.safetensors"))
    assert not [n for n in dense if EXPERT_RE.search(n)]
    state = make_model(seed=0).state_dict()
    assert set(dense) == {n for n in state if not EXPERT_RE.search(n)}
    assert "model.layers.0.mlp.shared_expert.up_proj.weight" in dense and "model.layers.1.mlp.gate.weight" in dense
    for name, tensor in dense.items():
        assert torch.equal(tensor, state[name]), name


def test_store_has_config_and_tokenizer(ckpts, tmp_path):
    from transformers import AutoConfig, AutoTokenizer
    store = tmp_path / "s"
    _split(ckpts[("fused", 1)], store)
    assert (store / "config.json").read_bytes() == (ckpts[("fused", 1)] / "config.json").read_bytes()
    assert (store / "generation_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(str(store))
    assert tok.decode(tok("def f(x):\n  return 1")["input_ids"]) == "def f(x):\n  return 1"
    assert AutoConfig.from_pretrained(str(store)).num_experts == 8
    assert _no_partial_dirs(tmp_path)


def test_checkpoint_dense_iterator(ckpts):
    with open_checkpoint(ckpts[("fused", 3)]) as ckpt:
        names = [n for n, _ in ckpt.dense_tensors()]
        assert names == ckpt.dense_names
        assert ckpt.layouts == {0: "fused", 1: "fused"}
        gate_up, down = ckpt.expert_weights(1, 5)
    ref = make_model(seed=0).model.layers[1].mlp.experts
    assert np.array_equal(gate_up, ref.gate_up_proj[5].detach().numpy())
    assert np.array_equal(down, ref.down_proj[5].detach().numpy())


# ---- store handling ----------------------------------------------------------------------------------------------
def test_failed_split_leaves_no_store(ckpts, tmp_path, monkeypatch):
    calls = []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise CheckpointError("boom")
        return build(*args, **kw)

    build = split_mod.build_function
    monkeypatch.setattr(split_mod, "build_function", failing)
    with pytest.raises(CheckpointError, match="boom"):
        _split(ckpts[("per_expert", 1)], tmp_path / "s")
    assert not (tmp_path / "s").exists() and _no_partial_dirs(tmp_path)


def test_existing_store_needs_overwrite(ckpts, tmp_path):
    store = tmp_path / "s"
    first = _split(ckpts[("per_expert", 1)], store, group_size=2)
    with pytest.raises(ConfigError, match="not empty"):
        _split(ckpts[("per_expert", 1)], store, group_size=4)
    assert load_manifest(store) == first
    second = _split(ckpts[("per_expert", 1)], store, group_size=4, overwrite=True)
    assert load_manifest(store) == second and len(list((store / "functions").iterdir())) == 4
    assert _no_partial_dirs(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("not a store")
    with pytest.raises(ConfigError, match="not a faasmoe store"):
        _split(ckpts[("per_expert", 1)], tmp_path / "other", overwrite=True)
    with pytest.raises(ConfigError, match="must not contain or sit inside"):
        _split(ckpts[("per_expert", 1)], ckpts[("per_expert", 1)] / "store", overwrite=True)


def test_cli_run_prints_summary(ckpts, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(ckpts[("per_expert", 3)]), "--out", str(tmp_path / "s"), "--group-size", "3",
                              "--no-progress"])
    assert run(args) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "6 functions" in line and "G=3" in line and " s" in line
    assert load_manifest(tmp_path / "s").group_size == 3


# ---- malformed inputs --------------------------------------------------------------------------------------------
def _edit_shard(src: Path, name: str, edit) -> None:
    """Rewrite the shard holding tensor ``name`` with ``edit(tensors)`` applied (index updated)."""
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = src / index["weight_map"][name]
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"] = {**{n: s for n, s in index["weight_map"].items() if s != shard.name},
                           **{n: shard.name for n in tensors}}
    index_path.write_text(json.dumps(index))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _truncate(path: Path, n_bytes: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - n_bytes)


def _shard(src: Path, i: int) -> Path:
    return src / f"model-{i:05d}-of-00003.safetensors"


E5_DOWN = "model.layers.1.mlp.experts.5.down_proj.weight"
BREAKAGES = {
    "missing config": (lambda s: (s / "config.json").unlink(), "config.json: missing"),
    "wrong model_type": (lambda s: _edit_json(s / "config.json", model_type="llama", architectures=["LlamaForCausalLM"]),
                         "config.json: model_type 'llama'"),
    "gelu": (lambda s: _edit_json(s / "config.json", hidden_act="gelu"), "config.json: hidden_act 'gelu'"),
    "no weights": (lambda s: [p.unlink() for p in s.glob("model*")], "neither model.safetensors nor"),
    "missing shard": (lambda s: _shard(s, 2).unlink(), "index.json: shard model-00002-of-00003.safetensors is missing"),
    "index names absent tensor": (
        lambda s: _edit_json(s / "model.safetensors.index.json", weight_map={
            **json.loads((s / "model.safetensors.index.json").read_text())["weight_map"],
            "model.extra.weight": _shard(s, 1).name}),
        "index.json: weight_map puts model.extra.weight in model-00001-of-00003.safetensors"),
    "truncated shard": (lambda s: _truncate(_shard(s, 3), 100), "model-00003-of-00003.safetensors: file is"),
    "corrupt header": (lambda s: _shard(s, 1).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"0" * 64),
                       "model-00001-of-00003.safetensors: corrupt safetensors header"),
    "missing expert": (lambda s: _edit_shard(s, E5_DOWN, lambda t: t.pop(E5_DOWN)),
                       f"index.json: missing tensor {E5_DOWN}"),
    "wrong expert shape": (lambda s: _edit_shard(s, E5_DOWN, lambda t: t.update({E5_DOWN: torch.zeros(32, 15)})),
                           f"safetensors: {E5_DOWN} has shape [32, 15], expected [32, 16]"),
    "int expert dtype": (lambda s: _edit_shard(s, E5_DOWN, lambda t: t.update({E5_DOWN: torch.zeros(32, 16, dtype=torch.int8)})),
                         f"safetensors: {E5_DOWN} has dtype I8"),
    "expert out of range": (lambda s: _edit_shard(s, E5_DOWN, lambda t: t.update({E5_DOWN.replace(".5.", ".8."): t[E5_DOWN].clone()})),
                            "names expert 8 but num_experts is 8"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_malformed_checkpoint_errors(ckpts, tmp_path, breakage):
    src = tmp_path / "ckpt"
    shutil.copytree(ckpts[("per_expert", 3)], src)
    damage, message = BREAKAGES[breakage]
    damage(src)
    with pytest.raises(CheckpointError) as info:
        _split(src, tmp_path / "store")
    text = str(info.value)
    assert message in text and "\n" not in text and str(src) in text
    assert not (tmp_path / "store").exists() and _no_partial_dirs(tmp_path)


def test_fused_layer_missing_down_proj(ckpts, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(ckpts[("fused", 1)], src)
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.0.mlp.experts.down_proj"]
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor model\.layers\.0\.mlp\.experts\.down_proj"):
        _split(src, tmp_path / "store")


@pytest.mark.parametrize("group_size", [0, 9, -1])
def test_bad_group_size(ckpts, tmp_path, group_size):
    with pytest.raises(CheckpointError, match=r"config\.json: group size .* must be 1\.\.8"):
        _split(ckpts[("per_expert", 1)], tmp_path / "store", group_size=group_size)
    assert not (tmp_path / "store").exists()


# ---- the shared trained model (../shared beside the clone; CI has it) --------------------------------------------
@pytest.mark.shared_model
def test_shared_model_splits(tmp_path, shared_model):
    from transformers import AutoModelForCausalLM
    m = _split(shared_model, tmp_path / "s", group_size=4)
    assert len(m.functions) == 8 * 15 and m.moe_layers == tuple(range(8))
    model = AutoModelForCausalLM.from_pretrained(str(shared_model), dtype=torch.float32)
    _check_numerics(tmp_path / "s", m, model)
