"""Prefetch: ``RouterSession.warm()`` / ``generate --warm`` load placed functions before the first token,
within each node's memory budget, so a warmed generation meets no cold start."""

from __future__ import annotations

import asyncio

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from faasmoe.proto.function_abi import resident_estimate_bytes
from faasmoe.router.cli import main as cli
from faasmoe.router.engine.generate import generate
from faasmoe.router.control.local_mesh import LocalMesh
from faasmoe.router.engine.reference import reference_generate
from faasmoe.router.engine.serving import start_serving
from faasmoe.router.control.session import RouterSession
from faasmoe.router.store.split import split_checkpoint
from model_factory import make_checkpoint

MIB = 1 << 20


def _store(tmp_path):
    model_dir = make_checkpoint(tmp_path / "model", num_layers=2, hidden_size=64, num_experts=16, top_k=4,
                                moe_intermediate_size=32, vocab_size=260, seed=5)
    store = tmp_path / "store"
    split_checkpoint(model_dir, store, group_size=4, progress=False)     # 8 functions
    return model_dir, store


def _loaded(session, address):
    return [f for f in session.client(address).status().functions if f.loaded]


def test_warm_loads_everything_placed_and_generation_has_no_cold_start(tmp_path, capsys):
    model_dir, store = _store(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(store))
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    expected = reference_generate(ref, tok, ["warm me up"], 6)[0].token_ids
    with LocalMesh(2, tmp_path / "nodes", memory_budget_mb=64, extra_args=["--keep-alive-s", "inf"]) as mesh:
        session = RouterSession(store)
        try:
            plan, _ = session.place_and_deploy(mesh.addresses)
            copies = sum(len(nodes) for nodes in plan.values())
            assert session.warm() == copies
            assert sum(len(_loaded(session, a)) for a in mesh.addresses) == copies

            async def run():
                serving = await start_serving(session)
                try:
                    out = (await generate(serving.engine, tok, ["warm me up"], 6))[0].token_ids
                    return out, serving.mesh.stats.cold_starts
                finally:
                    await serving.close()

            assert asyncio.run(run()) == (expected, 0)
        finally:
            session.close()
        # the CLI flag, on a fresh router: the nodes are already warm, and it says how many it loaded
        code = cli.main(["generate", "--store", str(store), "--nodes", ",".join(mesh.addresses), "--prompt",
                         "warm me up", "--max-new-tokens", "6", "--warm", "--json"])
        out = json.loads(capsys.readouterr().out)
        assert code == 0 and out["token_ids"] == expected
        assert out["warmed"] == copies and out["cold_starts"] == 0


def test_warm_stays_within_each_node_budget(tmp_path):
    _, store = _store(tmp_path)
    # budget 5 MiB holds 4 loaded functions (~1.1 MiB each); overcommit 2 lets all 8 be deployed there
    with LocalMesh(1, tmp_path / "nodes", memory_budget_mb=5,
                   extra_args=["--keep-alive-s", "inf", "--overcommit", "2"]) as mesh:
        session = RouterSession(store)
        try:
            session.place_and_deploy(mesh.addresses)
            need = resident_estimate_bytes(session.manifest.functions[0].bytes)
            fits = (5 * MIB) // need
            assert 0 < fits < len(session.manifest.functions)
            assert session.warm() == fits
            status = session.client(mesh.addresses[0]).status()
            assert len([f for f in status.functions if f.loaded]) == fits
            assert status.loaded_bytes <= status.memory_budget_bytes
            # the hottest `fits` functions, not the last ones a node would keep after evicting to make room
            order = sorted(session.manifest.functions, key=lambda e: (-e.expected_load, e.layer, e.name))
            assert {f.function_id for f in status.functions if f.loaded} == {e.function_id for e in order[:fits]}
        finally:
            session.close()
