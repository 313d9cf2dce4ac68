"""Serverless behaviour seen from the router: a burst of concurrent requests against an all-cold mesh (every
function scaled to zero) completes with zero errors and the same tokens; a tight node queue turns into
back-pressure the router absorbs, not failures."""

from __future__ import annotations

import asyncio
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from faasmoe.router.engine.generate import generate
from faasmoe.router.control.local_mesh import LocalMesh
from faasmoe.router.engine.engine import EngineConfig
from faasmoe.router.engine.reference import reference_generate
from faasmoe.router.engine.serving import local_serving
from faasmoe.router.control.session import RouterSession
from faasmoe.router.store.split import split_checkpoint
from model_factory import make_checkpoint

N_REQUESTS = 50
MAX_NEW = 3


def _wait_all_cold(session: RouterSession, addresses, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(not any(f.loaded for f in session.client(a).status().functions) for a in addresses):
            return True
        time.sleep(0.05)     # polling a condition, not ordering the test
    return False


def test_burst_against_all_cold_mesh(tmp_path):
    model_dir = make_checkpoint(tmp_path / "model", num_layers=2, hidden_size=64, num_experts=16, top_k=4,
                                moe_intermediate_size=32, vocab_size=260, seed=21)
    store = tmp_path / "store"
    split_checkpoint(model_dir, store, group_size=4, progress=False)
    tok = AutoTokenizer.from_pretrained(str(store))
    prompts = [f"request {i}: x = {i} *" for i in range(N_REQUESTS)]
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    expected = [r.token_ids for r in reference_generate(ref, tok, prompts, MAX_NEW)]

    # keep-alive 0.5 s: idle functions scale to zero; a small queue forces back-pressure in the burst
    with LocalMesh(3, tmp_path / "nodes", memory_budget_mb=64,
                   extra_args=["--keep-alive-s", "0.5", "--max-queue", "1"]) as mesh:
        asyncio.run(_burst(store, mesh.addresses, tok, prompts, expected))


async def _burst(store, addresses, tok, prompts, expected):
    async with local_serving(store, addresses, EngineConfig(step_timeout_s=60)) as serving:
        session, engine = serving.session, serving.engine
        warm = [g.token_ids for g in await generate(engine, tok, prompts[:3], MAX_NEW)]
        assert warm == expected[:3]
        cold = await asyncio.to_thread(_wait_all_cold, session, addresses, 20)
        assert cold, "functions never scaled to zero"
        cold_before = serving.mesh.stats.cold_starts
        results = await generate(engine, tok, prompts, MAX_NEW)          # all at once: one burst
        assert [g.token_ids for g in results] == expected                # zero errors, same tokens
        assert serving.mesh.stats.cold_starts > cold_before
        assert engine.stats.failed_steps == 0
