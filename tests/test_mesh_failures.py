"""Failures seen from the router: unreachable and silent nodes fail within the deadline naming the node;
a node killed mid-generation is replaced by the survivors (same tokens) or fails saying why."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from faasmoe.proto.errors import NodeUnavailable, PlacementError, StepFailed
from faasmoe.router.control.local_mesh import LocalMesh
from faasmoe.router.control.replicas import ReplicaPolicy
from faasmoe.router.control.session import RouterSession
from faasmoe.router.engine.engine import EngineConfig
from faasmoe.router.engine.generate import generate
from faasmoe.router.engine.reference import reference_generate
from faasmoe.router.engine.serving import local_serving
from faasmoe.router.mesh.dispatch import ExpertMesh
from faasmoe.router.mesh.grouping import LayerFunctions
from faasmoe.router.mesh.routing import RoutingBoard
from faasmoe.router.mesh.transport import Transport
from faasmoe.router.model.build import build_mesh_model
from faasmoe.router.store.split import split_checkpoint
from model_factory import make_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SilentServer:
    """Accepts TCP connections and never answers: a hung node."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.conns = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


async def _layer_step(address: str, timeout_s: float):
    layers = {0: LayerFunctions({"f" * 64: (0, 1)})}
    transport = Transport()
    router = RoutingBoard()
    router.publish({"f" * 64: (address,)})
    mesh = ExpertMesh(layers, transport, router, step_timeout_s=timeout_s)
    try:
        ctx = mesh.context("r")
        pending = await mesh.submit(0, np.zeros((2, 8), np.float32), np.array([[0, 1], [1, 0]]), ctx)
        return await mesh.collect(pending)
    finally:
        await transport.close()


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_unreachable_node_fails_within_deadline_naming_it(kind):
    server = SilentServer() if kind == "silent" else None
    address = server.address if server else f"127.0.0.1:{_free_port()}"
    start = time.monotonic()
    try:
        with pytest.raises(NodeUnavailable, match=address.replace(".", r"\.")):
            asyncio.run(_layer_step(address, timeout_s=1.5))
    finally:
        if server:
            server.close()
    assert time.monotonic() - start < 1.5 + 1.0


def test_no_reachable_node_is_a_placement_error(tmp_path):
    model_dir = make_checkpoint(tmp_path / "model")
    split_checkpoint(model_dir, tmp_path / "store", group_size=4, progress=False)
    session = RouterSession(tmp_path / "store", status_timeout_s=1.0)
    with pytest.raises(PlacementError, match="no reachable node"):
        session.place_and_deploy([f"127.0.0.1:{_free_port()}"])


@pytest.fixture
def model_and_store(tmp_path):
    model_dir = make_checkpoint(tmp_path / "model", num_layers=2, hidden_size=64, moe_intermediate_size=32,
                                num_experts=8, top_k=2, vocab_size=260, seed=11)
    split_checkpoint(model_dir, tmp_path / "store", group_size=2, progress=False)
    return model_dir, tmp_path / "store"


def _kill_after_calls(serving, node, calls: int):
    """Wrap the mesh so ``node`` is SIGKILLed once ``calls`` layer steps were submitted (mid-generation)."""
    original = serving.mesh.submit
    count = {"n": 0}

    async def submit(*a, **kw):
        count["n"] += 1
        if count["n"] == calls:
            node.kill()
        return await original(*a, **kw)

    serving.mesh.submit = submit


@pytest.mark.parametrize("replicas", ["1", "2"])
def test_killed_node_is_replaced_by_survivors_same_tokens(tmp_path, model_and_store, replicas):
    """With one copy of each function the killed node's functions are re-placed on the survivors mid-generation
    (make-before-break); with two, the survivors' copies take over. Either way the tokens stay exact."""
    model_dir, store = model_and_store
    tok = AutoTokenizer.from_pretrained(str(store))
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    expected = reference_generate(ref, tok, ["hello mesh"], 10)[0].token_ids

    async def run(mesh):
        async with local_serving(store, mesh.addresses, EngineConfig(step_timeout_s=10),
                                 replica_policy=ReplicaPolicy(replicas)) as serving:
            assert {len(nodes) for nodes in serving.session.placement.values()} == {int(replicas)}
            _kill_after_calls(serving, mesh.nodes[1], calls=7)
            out = (await generate(serving.engine, tok, ["hello mesh"], 10))[0]
            session = serving.session
            assert mesh.nodes[1].address in session.dead
            assert all(mesh.nodes[1].address not in nodes for nodes in session.placement.values())
            assert serving.engine.stats.failed_steps == 0
            return out

    with LocalMesh(3, tmp_path / "nodes", memory_budget_mb=64) as mesh:
        out = asyncio.run(run(mesh))
    assert out.token_ids == expected


def test_killed_node_without_room_fails_saying_so(tmp_path):
    model_dir = make_checkpoint(tmp_path / "model", num_layers=2, hidden_size=256, moe_intermediate_size=256,
                                num_experts=8, top_k=2, vocab_size=260, seed=11)
    store = tmp_path / "store"
    split_checkpoint(model_dir, store, group_size=2, progress=False)
    tok = AutoTokenizer.from_pretrained(str(store))
    function_bytes = sum(f.bytes for f in RouterSession(store).placement_functions())   # memory when loaded
    budget_mb = 1.05 * function_bytes / 2**20 / 2      # two nodes hold everything once, one cannot

    async def run(mesh):
        async with local_serving(store, mesh.addresses, EngineConfig(step_timeout_s=10)) as serving:
            _kill_after_calls(serving, mesh.nodes[0], calls=5)
            start = time.monotonic()
            with pytest.raises(StepFailed, match="cannot hold"):
                await generate(serving.engine, tok, ["hello mesh"], 10)
            assert time.monotonic() - start < 10
            assert serving.engine.stats.failed_steps == 1 and not serving.engine.running

    with LocalMesh(2, tmp_path / "nodes", memory_budget_mb=budget_mb) as mesh:
        asyncio.run(run(mesh))


def test_store_whose_config_disagrees_with_its_functions_is_a_clear_error(tmp_path):
    import json

    from faasmoe.proto.errors import CheckpointError
    model_dir = make_checkpoint(tmp_path / "model")
    store = tmp_path / "store"
    split_checkpoint(model_dir, store, group_size=4, progress=False)
    config = json.loads((store / "config.json").read_text())
    config["mlp_only_layers"] = [0]                 # layer 0 has expert functions but would be a dense MLP
    (store / "config.json").write_text(json.dumps(config))
    session = RouterSession(store)
    with pytest.raises(CheckpointError, match="layer 0 has expert functions but no MoE block"):
        build_mesh_model(store, session.manifest)
