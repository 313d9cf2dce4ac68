"""Correct while the mesh changes: 16 concurrent streams through the real HTTP server over three node
processes; mid-stream a function is moved to another node (make-before-break) and then a node is killed
with SIGKILL. The survivors can hold every function, so not one request fails and every text equals
transformers' greedy answer; only the killed node is ever marked dead."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from faasmoe.router.api.server import ServeOptions, ServerThread
from faasmoe.router.control.local_mesh import LocalMesh
from faasmoe.router.control.session import RouterSession
from faasmoe.router.engine.engine import EngineConfig
from faasmoe.router.engine.scheduler import Limits
from faasmoe.router.control.client import NodeClient
from serving_fixtures import tiny_model

STREAMS, MAX_NEW = 16, 80


def _prompts(tiny) -> list[str]:
    """16 prompts of different lengths whose greedy answers run the whole MAX_NEW tokens."""
    out = []
    for k in range(200):
        prompt = f"stream {k}: " + "xy" * (k % 7)
        if 0 not in tiny.greedy([prompt], MAX_NEW)[0].token_ids:
            out.append(prompt)
        if len(out) == STREAMS:
            return out
    pytest.fail("not enough prompts without an early end of sequence")


def test_16_streams_survive_a_move_and_a_kill(tmp_path):
    tiny = tiny_model(tmp_path)
    prompts = _prompts(tiny)
    expected = [tiny.text(r.token_ids) for r in tiny.greedy(prompts, MAX_NEW)]
    config = EngineConfig(limits=Limits(max_running=16, max_step_tokens=64, prefill_chunk=8), step_timeout_s=20)
    with LocalMesh(3, tmp_path / "nodes", memory_budget_mb=64) as mesh:
        session = RouterSession(tiny.store)
        with ServerThread(session, mesh.addresses, config, ServeOptions(port=0)) as server:
            received = [0] * STREAMS
            texts = [""] * STREAMS

            async def stream(aclient, i):
                chunks = await aclient.completions.create(model="store", prompt=prompts[i], max_tokens=MAX_NEW,
                                                          temperature=0, stream=True)
                async for chunk in chunks:
                    texts[i] += chunk.choices[0].text
                    received[i] += 1

            async def until(predicate, what):
                for _ in range(3000):
                    if predicate():
                        return
                    await asyncio.sleep(0.005)
                pytest.fail(f"timed out waiting for {what}")

            async def scenario():
                aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
                streams = [asyncio.ensure_future(stream(aclient, i)) for i in range(STREAMS)]
                await until(lambda: min(received) >= 3, "every stream to be running")
                fid, nodes = next((f, n) for f, n in sorted(session.placement.items()) if len(n) < 3)
                source = nodes[0]
                target = next(a for a in mesh.addresses if a not in nodes)
                await asyncio.to_thread(session.move, fid, source, target)
                assert target in session.placement[fid] and source not in session.placement[fid]
                assert not any(s.done() for s in streams), "the move happened after the streams ended"
                moved_at = min(received)
                await until(lambda: min(received) >= moved_at + 3, "the streams to go on after the move")
                victim = next(n for n in mesh.nodes if n.address != target)
                victim.kill()
                assert not any(s.done() for s in streams), "the kill happened after the streams ended"
                results = await asyncio.gather(*streams, return_exceptions=True)
                return victim, [r for r in results if isinstance(r, BaseException)]

            victim, failures = asyncio.run(scenario())
            assert failures == []                                   # zero failed requests
            assert texts == expected                                # identical tokens
            assert session.dead == {victim.address}                 # the move marked nobody dead
            assert all(victim.address not in n for n in session.placement.values())
        # a router that stops lets go of its leases: the nodes hold nothing for it any more
        for node in mesh.nodes:
            if node is not victim:
                status = NodeClient(node.address).status()
                assert not [f.function_id for f in status.functions if session.router_id in f.owners]


def test_a_hung_node_is_routed_around_long_before_the_step_deadline(tmp_path):
    """SIGSTOP: the node keeps its connections but never answers. Its health checks fail within ~2 s; the
    calls in flight to it fail then, its functions go to the survivors, and the requests finish exactly."""
    tiny = tiny_model(tmp_path)
    prompts = _prompts(tiny)[:4]
    expected = [tiny.text(r.token_ids) for r in tiny.greedy(prompts, MAX_NEW)]
    config = EngineConfig(limits=Limits(max_running=16, max_step_tokens=64, prefill_chunk=8), step_timeout_s=60)
    with LocalMesh(3, tmp_path / "nodes", memory_budget_mb=64) as mesh:
        session = RouterSession(tiny.store)
        with ServerThread(session, mesh.addresses, config, ServeOptions(port=0)) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
            victim = mesh.nodes[0]
            started = time.monotonic()

            def one(i):
                chunks = client.completions.create(model="store", prompt=prompts[i], max_tokens=MAX_NEW,
                                                   temperature=0, stream=True)
                text = ""
                for k, chunk in enumerate(chunks):
                    text += chunk.choices[0].text
                    if i == 0 and k == 5:
                        os.kill(victim.process.pid, signal.SIGSTOP)        # hung mid-stream
                return text

            try:
                with ThreadPoolExecutor(4) as pool:
                    texts = list(pool.map(one, range(4)))
            finally:
                os.kill(victim.process.pid, signal.SIGCONT)
            assert texts == expected
            assert time.monotonic() - started < 20                 # not the 60 s step deadline
            assert victim.address in session.dead
