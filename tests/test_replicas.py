"""The replica policy (``--replicas 1|2|auto``): its decision (pure, table-tested), what placement does with it,
and ``auto`` end to end: real nodes, a real directory and the placement controller; a function whose calls are
made to queue at its node gets a second copy, and loses it again once the queueing stops."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from faasmoe.proto.errors import ConfigError
from faasmoe.router.control.controller import PlacementController
from faasmoe.router.control.directory import NodeDirectory
from faasmoe.router.control.placement import FunctionSpec, NodeSpec, place
from faasmoe.router.control.replicas import Contention, ReplicaPolicy, decide
from faasmoe.router.control.session import RouterSession
from faasmoe.router.store.split import split_checkpoint
from faasmoe.proto import frames
from model_factory import make_checkpoint
from node_fixtures import GatedExecutor, Stub, running_node, wait_until

AUTO = ReplicaPolicy("auto", threshold=0.1)


def _state(wait=None, score=None, contended=()):
    return Contention(dict(wait or {}), dict(score or {}), frozenset(contended))


N1, N2 = "10.0.0.1:1", "10.0.0.2:1"


@pytest.mark.parametrize("previous,waits,interval_s,want_contended,want_score", [
    pytest.param(_state(), {(N1, "a"): 5.0}, 10, set(), {"a": 0.0}, id="first-sighting-is-a-baseline"),
    pytest.param(_state({(N1, "a"): 1.0}), {(N1, "a"): 3.0}, 10, {"a"}, {"a": 0.2}, id="growth-over-threshold"),
    pytest.param(_state({(N1, "a"): 1.0}), {(N1, "a"): 1.5}, 10, set(), {"a": 0.05}, id="growth-under-threshold"),
    pytest.param(_state({(N1, "a"): 3.0}, {"a": 0.2}, {"a"}), {(N1, "a"): 3.0}, 10, {"a"}, {"a": 0.16},
                 id="decays-keeps-copy"),
    pytest.param(_state({(N1, "a"): 3.0}, {"a": 0.06}, {"a"}), {(N1, "a"): 3.0}, 10, set(), {"a": 0.048},
                 id="decays-drops-copy"),
    pytest.param(_state({(N1, "a"): 3.0}, {"a": 0.08}, {"a"}), {(N1, "a"): 3.3}, 10, {"a"}, {"a": 0.064},
                 id="hysteresis-holds-above-half"),
    pytest.param(_state({(N1, "a"): 3.0}, {"a": 0.08}), {(N1, "a"): 3.3}, 10, set(), {"a": 0.064},
                 id="no-hysteresis-for-new"),
    pytest.param(_state({(N1, "a"): 9.0}), {(N1, "a"): 1.0}, 10, set(), {"a": 0.0}, id="restarted-node-no-growth"),
    pytest.param(_state({(N1, "a"): 0.0, (N2, "a"): 0.0, (N1, "b"): 0.0}),
                 {(N1, "a"): 2.0, (N2, "a"): 2.0, (N1, "b"): 0.5}, 2, {"a", "b"}, {"a": 2.0, "b": 0.25},
                 id="summed-over-copies"),
    pytest.param(_state({(N1, "a"): 1.0}), {(N1, "a"): 1.0, (N2, "a"): 50.0}, 10, set(), {"a": 0.0},
                 id="node-back-after-a-missed-survey-adds-nothing"),
])
def test_decide(previous, waits, interval_s, want_contended, want_score):
    after = decide(previous, waits, interval_s, AUTO)
    assert after.contended == frozenset(want_contended)
    assert after.score == pytest.approx(want_score)
    assert after.wait_s == waits


@pytest.mark.parametrize("kwargs", [dict(mode="3"), dict(threshold=0), dict(replica_share=1.5),
                                    dict(interval_s=0)])
def test_policy_is_checked(kwargs):
    with pytest.raises(ConfigError):
        ReplicaPolicy(**kwargs)


def _fns(layer_loads):
    return [FunctionSpec(f"f{i}", 0, 10, load, f"F{i}") for i, load in enumerate(layer_loads)]


@pytest.mark.parametrize("policy,contended,want_copies", [
    pytest.param(ReplicaPolicy("1"), frozenset(), {"f0": 1, "f1": 1, "f2": 1, "f3": 1}, id="one"),
    pytest.param(ReplicaPolicy("2"), frozenset(), {"f0": 2, "f1": 2, "f2": 2, "f3": 2}, id="two-while-memory-lasts"),
    pytest.param(AUTO, frozenset(), {"f0": 1, "f1": 1, "f2": 1, "f3": 1}, id="auto-quiet"),
    pytest.param(AUTO, frozenset({"f2"}), {"f0": 1, "f1": 1, "f2": 2, "f3": 1}, id="auto-contended-only"),
    pytest.param(ReplicaPolicy("auto", replica_share=0.1), frozenset({"f0", "f1", "f2"}),
                 {"f0": 2, "f1": 2, "f2": 1, "f3": 1}, id="auto-within-share"),
])
def test_placement_follows_the_policy(policy, contended, want_copies):
    """Four functions of 10 bytes, two nodes of 100: room for every second copy; auto adds only contended ones
    (hottest first), and no more than replica_share of each node (10 %: one copy per node here)."""
    nodes = [NodeSpec("a", 100), NodeSpec("b", 100)]
    placement = place(_fns([0.4, 0.3, 0.2, 0.1]), nodes, options=policy.options(contended))
    assert {f: len(n) for f, n in placement.items()} == want_copies


def test_auto_drops_a_copy_that_is_no_longer_contended():
    nodes = [NodeSpec("a", 100), NodeSpec("b", 100)]
    fns = _fns([0.4, 0.3, 0.2, 0.1])
    hot = place(fns, nodes, options=AUTO.options(frozenset({"f1"})))
    assert len(hot["f1"]) == 2
    calm = place(fns, nodes, hot, options=AUTO.options(frozenset()))
    assert all(len(n) == 1 for n in calm.values()) and all(calm[f][0] in hot[f] for f in calm)


# ---- auto, end to end ----------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_auto_gives_a_queueing_function_a_second_copy_then_takes_it_back(tmp_path):
    model_dir = make_checkpoint(tmp_path / "model", num_layers=2, hidden_size=64, num_experts=8,
                                moe_intermediate_size=64, seed=5)
    store = tmp_path / "store"
    manifest = split_checkpoint(model_dir, store, group_size=4, progress=False)
    gate_a, gate_b = GatedExecutor(1), GatedExecutor(1)
    gate_b.open()
    async with running_node(tmp_path / "a", run_executor=gate_a, threads=2, node_id="a") as (node_a, _), \
            running_node(tmp_path / "b", run_executor=gate_b, threads=2, node_id="b") as (node_b, _):
        gate_a.open()
        addresses = [node_a.address, node_b.address]
        session = RouterSession(store, replica_policy=ReplicaPolicy("auto", threshold=0.05, interval_s=0.3))
        directory = NodeDirectory(static=addresses, health_interval_s=0.2)
        controller = PlacementController(session, directory, settle_s=0.05)
        directory.start()
        controller.start()
        try:
            await wait_until(lambda: controller.replacements >= 1, 30, "the first placement")
            assert all(len(nodes) == 1 for nodes in session.placement.values())
            await wait_until(lambda: session._contention_at_s is not None, 10, "a first contention survey")
            fid = next(f for f, nodes in session.placement.items() if nodes == (node_a.address,))
            entry = next(f for f in manifest.functions if f.function_id == fid)
            gate_a.gate.clear()                       # node a's one run slot is held: calls queue behind it
            hidden = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
            call = frames.Call(fid, np.arange(4, dtype=np.int32), [4] + [0] * (len(entry.expert_ids) - 1))
            async with grpc.aio.insecure_channel(node_a.address) as channel:
                stub = Stub(channel)
                calls = [asyncio.ensure_future(stub.invoke(frames.encode_request(f"r{i}", "t", entry.layer, hidden,
                                                                                 [call]))) for i in range(4)]
                await wait_until(lambda: node_a.runtime.queue_depth >= 3, 10, "calls queueing at node a")
                queued_at_s = time.monotonic()        # let them queue through a whole survey interval
                await wait_until(lambda: (session._contention_at_s or 0) > queued_at_s + 0.3, 10, "a survey")
                gate_a.open()
                await asyncio.gather(*calls)
            await wait_until(lambda: len(session.placement.get(fid, ())) == 2, 30, "a second copy of the function")
            assert fid in session.contention.contended
            assert all(len(nodes) == 1 for f, nodes in session.placement.items() if f != fid)
            await wait_until(lambda: len(session.placement.get(fid, ())) == 1, 30, "the copy taken back")
            assert not session.contention.contended
        finally:
            controller.stop()
            directory.stop()
            session.close()
