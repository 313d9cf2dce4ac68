"""Network faults between router and nodes, injected by the user-space proxy: a blackholed node never makes a
step outlast its deadline by more than 1 s, a replica answers instead of a silent node (same tokens), retries
stay within the attempt limit and the budget, and degraded mode is opt-in and says what it dropped."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from faasmoe.proto.errors import StepFailed
from faasmoe.router.control.local_mesh import LocalMesh
from faasmoe.router.engine.engine import EngineConfig
from faasmoe.router.engine.generate import generate
from faasmoe.router.engine.reference import reference_generate
from faasmoe.router.control.replicas import ReplicaPolicy
from faasmoe.router.engine.serving import local_serving
from faasmoe.router.evaluation.faults import FaultProxy
from faasmoe.router.mesh.retry import MAX_ATTEMPTS, RetryBudget
from faasmoe.router.store.split import split_checkpoint
from model_factory import make_checkpoint

PROMPT = "hello mesh"


# -- the proxy itself ---------------------------------------------------------------------------------

class EchoServer:
    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn):
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:             # the proxy reset it: that is the test
                pass


def _connect(address: str, timeout_s: float = 2.0) -> socket.socket:
    host, port = address.split(":")
    return socket.create_connection((host, int(port)), timeout=timeout_s)


def test_proxy_passes_delays_blackholes_and_resets():
    echo = EchoServer()
    with FaultProxy(echo.address) as proxy:
        c = _connect(proxy.address)
        c.sendall(b"ping")
        assert c.recv(16) == b"ping"
        proxy.set(delay_s=0.3)
        t0 = time.monotonic()
        c.sendall(b"late")
        assert c.recv(16) == b"late"
        assert time.monotonic() - t0 >= 0.6 - 0.05          # both directions
        proxy.set(blackhole=True)
        c.sendall(b"lost")
        c.settimeout(0.5)
        with pytest.raises(socket.timeout):
            c.recv(16)
        assert proxy.stats.chunks_blackholed >= 1
        proxy.set()
        assert proxy.reset() == 1
        c.settimeout(2.0)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            c.sendall(b"x")
            if not c.recv(16):
                raise ConnectionResetError
        proxy.set(refuse=True)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):   # at connect, or at the first read
            c2 = _connect(proxy.address)
            c2.sendall(b"x")
            if not c2.recv(16):
                raise ConnectionResetError
        proxy.set(drop_p=1.0)
        c3 = _connect(proxy.address)
        c3.sendall(b"dropped")
        c3.settimeout(0.5)
        with pytest.raises(socket.timeout):
            c3.recv(16)
        assert proxy.stats.chunks_dropped >= 1
    echo.sock.close()


# -- the mesh through proxies ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model_dir = make_checkpoint(root / "model", num_layers=2, hidden_size=64, moe_intermediate_size=32,
                                num_experts=8, top_k=2, vocab_size=260, seed=11)
    split_checkpoint(model_dir, root / "store", group_size=2, progress=False)
    tok = AutoTokenizer.from_pretrained(str(root / "store"))
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    expected = reference_generate(ref, tok, [PROMPT], 10)[0].token_ids
    return root / "store", tok, expected


def _fault_after_steps(serving, steps: int, fault) -> dict:
    """Apply ``fault()`` once ``steps`` layer steps were submitted (mid-generation); returns when it did."""
    original, seen = serving.mesh.submit, {"n": 0, "at": None}

    async def submit(*a, **kw):
        seen["n"] += 1
        if seen["n"] == steps:
            fault()
            seen["at"] = time.monotonic()
        return await original(*a, **kw)

    serving.mesh.submit = submit
    return seen


def test_blackholed_node_is_answered_by_its_replica_same_tokens(tmp_path, model):
    store, tok, expected = model
    config = EngineConfig(step_timeout_s=20, frame_timeout_s=1.0)

    async def run(addresses, proxy):
        async with local_serving(store, addresses, config, replica_policy=ReplicaPolicy("2")) as serving:
            placement = serving.session.placement
            assert all(len(nodes) == 2 for nodes in placement.values())     # room for a copy on each node
            seen = _fault_after_steps(serving, 5, lambda: proxy.set(blackhole=True))
            out = (await generate(serving.engine, tok, [PROMPT], 10))[0]
            mesh = serving.mesh
            assert proxy.address in mesh.bans.failures or proxy.address in serving.session.dead
            assert serving.engine.stats.failed_steps == 0
            assert mesh.budget.spent < mesh.budget.floor + mesh.budget.ratio * mesh.budget.first_sends + 1
            return out, seen

    with LocalMesh(2, tmp_path / "nodes", memory_budget_mb=256) as mesh:
        with FaultProxy(mesh.addresses[1]) as proxy:
            out, seen = asyncio.run(run([mesh.addresses[0], proxy.address], proxy))
    assert seen["at"] is not None and proxy.stats.chunks_blackholed > 0
    assert out.token_ids == expected


def test_blackholed_node_without_room_fails_within_the_step_deadline(tmp_path, model):
    store, tok, _ = model
    from faasmoe.router.control.session import RouterSession
    function_bytes = sum(f.bytes for f in RouterSession(store).placement_functions())
    budget_mb = 1.05 * function_bytes / 2**20 / 2         # two nodes hold everything once, one cannot
    step_timeout_s = 3.0
    config = EngineConfig(step_timeout_s=step_timeout_s, frame_timeout_s=1.0)

    async def run(addresses, proxy):
        async with local_serving(store, addresses, config) as serving:
            seen = _fault_after_steps(serving, 3, lambda: proxy.set(blackhole=True))
            with pytest.raises(StepFailed) as err:
                await generate(serving.engine, tok, [PROMPT], 10)
            failed_at = time.monotonic()
            return err.value, failed_at - seen["at"]

    with LocalMesh(2, tmp_path / "nodes", memory_budget_mb=budget_mb) as mesh:
        with FaultProxy(mesh.addresses[1]) as proxy:
            error, took_s = asyncio.run(run([mesh.addresses[0], proxy.address], proxy))
    assert proxy.address in str(error) or "deadline" in str(error)
    assert took_s <= step_timeout_s + 1.0, took_s


class _NoRecovery:
    """A control plane that can do nothing (every node it could move functions to is the failing one)."""

    def __init__(self):
        self.calls = 0

    async def node_failed(self, node, error):
        self.calls += 1

    async def functions_missing(self, pairs):
        self.calls += 1


def test_resets_get_at_most_three_attempts_and_retries_stay_within_budget(tmp_path, model):
    store, tok, _ = model

    async def run(addresses, proxy):
        async with local_serving(store, addresses, EngineConfig(step_timeout_s=10, frame_timeout_s=1.0)) as serving:
            mesh = serving.mesh
            mesh.control = _NoRecovery()
            mesh.budget = RetryBudget(ratio=0.1, floor=4, window_s=60.0)
            proxy.set(refuse=True)
            proxy.reset()
            outcomes = []
            for _ in range(12):
                sent_before, retries_before = mesh.stats.rpcs, mesh.stats.retries
                try:
                    await generate(serving.engine, tok, [PROMPT], 2)
                    outcomes.append("ok")
                except StepFailed as exc:
                    outcomes.append(str(exc))
                assert mesh.stats.retries - retries_before <= MAX_ATTEMPTS - 1
                assert mesh.stats.rpcs > sent_before
            return outcomes, mesh.budget, mesh.stats.rpcs

    with LocalMesh(1, tmp_path / "nodes", memory_budget_mb=256) as mesh:
        with FaultProxy(mesh.addresses[0]) as proxy:
            outcomes, budget, rpcs = asyncio.run(run([proxy.address], proxy))
    assert all(o != "ok" for o in outcomes)
    assert any("after 3 attempts" in o for o in outcomes)
    assert any("retry budget is spent" in o for o in outcomes)
    # each retry was granted while spent < floor + ratio x first sends (one window covers the whole test)
    assert budget.spent < budget.floor + budget.ratio * budget.first_sends + 1
    assert budget.refused > 0 and budget.first_sends <= rpcs


def test_degraded_mode_is_opt_in_and_lists_what_it_dropped(tmp_path, model):
    store, tok, expected = model
    from faasmoe.router.control.session import RouterSession
    function_bytes = sum(f.bytes for f in RouterSession(store).placement_functions())
    budget_mb = 1.05 * function_bytes / 2**20 / 2         # no room for copies: each function on one node

    async def run(addresses, proxy, degraded):
        config = EngineConfig(step_timeout_s=5, frame_timeout_s=0.5, degraded=degraded)
        async with local_serving(store, addresses, config) as serving:
            serving.mesh.control = _NoRecovery()
            proxy.set(blackhole=True)
            if not degraded:
                with pytest.raises(StepFailed):
                    await generate(serving.engine, tok, [PROMPT], 2)
                return None
            return (await generate(serving.engine, tok, [PROMPT], 2))[0]

    with LocalMesh(2, tmp_path / "nodes", memory_budget_mb=budget_mb) as mesh:
        for degraded in (False, True):
            with FaultProxy(mesh.addresses[1]) as proxy:
                # no replicas: the proxied node holds functions no one else has
                out = asyncio.run(run([mesh.addresses[0], proxy.address], proxy, degraded))
    assert out is not None and out.dropped
    assert all(isinstance(layer, int) and isinstance(expert, int) and n > 0 for (layer, expert), n in out.dropped.items())


def test_degraded_responses_are_labelled_through_the_api(tmp_path):
    """serve --degraded, one of two nodes killed with no room for its functions: the official client gets an
    answer that says it is not exact and lists the dropped experts, in the body and (non-streamed) the header;
    without --degraded the same request is an explicit error."""
    import openai

    from faasmoe.router.control.session import RouterSession
    from serving_fixtures import RouterProcess, tiny_model

    tiny = tiny_model(tmp_path)
    function_bytes = sum(f.bytes for f in RouterSession(tiny.store).placement_functions())
    budget_mb = 1.05 * function_bytes / 2**20 / 2
    for degraded in (True, False):
        with LocalMesh(2, tmp_path / f"nodes-{degraded}", memory_budget_mb=budget_mb) as mesh:
            flags = ["--no-replicas", "--frame-timeout-s", "1", "--step-timeout-s", "10"] + (["--degraded"] if degraded else [])
            with RouterProcess(tiny.store, mesh.addresses, *flags) as router:
                client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)
                exact = client.completions.create(model=router.model, prompt=PROMPT, max_tokens=4, temperature=0)
                assert exact.model_extra.get("faasmoe_degraded") is None
                mesh.nodes[1].kill()
                mesh.nodes[1].process.wait(10)
                if not degraded:
                    with pytest.raises(openai.APIStatusError) as err:
                        client.completions.create(model=router.model, prompt=PROMPT, max_tokens=4, temperature=0)
                    message = str(err.value.message)
                    assert err.value.status_code >= 500, message
                    assert "cannot hold" in message or mesh.nodes[1].address in message, message
                    continue
                raw = client.completions.with_raw_response.create(model=router.model, prompt=PROMPT, max_tokens=4,
                                                                   temperature=0)
                label = raw.parse().model_extra["faasmoe_degraded"]
                assert raw.headers["x-faasmoe-degraded"] == "true"
                assert label["exact"] is False and label["dropped_expert_calls"] > 0
                assert all(set(d) == {"layer", "expert", "token_calls"} for d in label["dropped_experts"])
                chunks = list(client.completions.create(model=router.model, prompt=PROMPT, max_tokens=4,
                                                        temperature=0, stream=True))
                assert chunks[-1].model_extra["faasmoe_degraded"]["exact"] is False
