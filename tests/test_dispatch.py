"""A layer step against real node processes when the routing table is wrong or a frame is too big: NOT_FOUND
re-routes to another copy or asks control to repair, a frame over the node's message limit is split; the
outputs are right and no healthy node is reported dead."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from faasmoe.proto.errors import FunctionNotFound
from faasmoe.router.control.local_mesh import start_node
from faasmoe.router.control.client import NodeClient
from faasmoe.router.mesh.dispatch import ExpertMesh
from faasmoe.router.mesh.grouping import LayerFunctions
from faasmoe.router.mesh.routing import RoutingBoard
from faasmoe.router.mesh.transport import Transport
from node_fixtures import make_function

HIDDEN = 256
WIDE = 2048          # 8 KiB per row: 128 rows fill a node's 1 MiB message limit


@pytest.fixture
def nodes(tmp_path):
    started = [start_node(tmp_path / f"n{i}", memory_budget_mb=64, extra_args=["--max-message-mb", "1"])
               for i in range(2)]
    yield started
    for node in started:
        node.stop()


def _deploy(fn, address, tmp_path):
    path = tmp_path / f"{fn.function_id}.onnx"
    path.write_bytes(fn.data)
    client = NodeClient(address)
    try:
        client.deploy(path, fn.header(owner="test"))
    finally:
        client.close()


class RecordingControl:
    """Control's side of the contract, for real: repairs deploy the function where the table says it is."""

    def __init__(self, fn, tmp_path):
        self.fn, self.tmp_path = fn, tmp_path
        self.failed, self.missing = [], []

    async def node_failed(self, node, error):
        self.failed.append(node)
        raise error

    async def functions_missing(self, pairs):
        self.missing.append(set(pairs))
        for _, node in pairs:
            await asyncio.to_thread(_deploy, self.fn, node, self.tmp_path)


def _step(fn, placement, rows: int, control=None, top_k=2, hidden_size=HIDDEN):
    layers = {0: LayerFunctions({fn.function_id: tuple(fn.expert_ids)})}
    router = RoutingBoard()
    router.publish(placement)
    hidden = np.random.default_rng(0).standard_normal((rows, hidden_size), dtype=np.float32)
    index = np.tile(np.array(fn.expert_ids[:top_k]), (rows, 1))

    async def run():
        transport = Transport()
        mesh = ExpertMesh(layers, transport, router, control=control, step_timeout_s=20)
        try:
            pending = await mesh.submit(0, hidden, index, mesh.context("step"))
            return await mesh.collect(pending), mesh.stats
        finally:
            await transport.close()

    results, stats = asyncio.run(run())
    for expert, items in results.items():
        j = fn.expert_ids.index(expert)
        for item in items:
            expected = fn.reference(hidden, item.tokens, [len(item.tokens) if k == j else 0
                                                          for k in range(len(fn.expert_ids))])
            np.testing.assert_allclose(item.output, expected, atol=1e-4)
    assert sum(len(i.tokens) for items in results.values() for i in items) == rows * top_k
    return stats


def test_not_found_reroutes_to_the_copy_that_exists(nodes, tmp_path):
    fn = make_function(seed=21, n_experts=2, hidden=HIDDEN)
    have, lack = sorted(n.address for n in nodes)
    _deploy(fn, have, tmp_path)                 # the table also names `lack`, which the first step's turn picks
    control = RecordingControl(fn, tmp_path)
    stats = _step(fn, {fn.function_id: (have, lack)}, rows=64, control=control)
    assert stats.by_node == {lack: 1, have: 1} and stats.retries == 1
    assert control.failed == [] and control.missing == []       # nobody marked dead, no repair needed


def test_not_found_with_no_other_copy_asks_control_to_repair(nodes, tmp_path):
    fn = make_function(seed=22, n_experts=2, hidden=HIDDEN)
    a, _ = nodes
    control = RecordingControl(fn, tmp_path)
    stats = _step(fn, {fn.function_id: (a.address,)}, rows=4, control=control)
    assert control.missing == [{(fn.function_id, a.address)}] and control.failed == []
    assert stats.retries == 1


def test_not_found_without_control_is_an_error_naming_the_function(nodes, tmp_path):
    fn = make_function(seed=23, n_experts=2, hidden=HIDDEN)
    with pytest.raises(FunctionNotFound, match=fn.function_id):
        _step(fn, {fn.function_id: (nodes[0].address,)}, rows=4)


def test_a_frame_over_the_node_limit_is_split_not_a_dead_node(nodes, tmp_path):
    fn = make_function(seed=24, n_experts=2, hidden=HIDDEN)
    a, _ = nodes
    _deploy(fn, a.address, tmp_path)
    control = RecordingControl(fn, tmp_path)
    rows = 2000                                 # ~2 MiB of hidden rows: over the node's 1 MiB limit
    stats = _step(fn, {fn.function_id: (a.address,)}, rows=rows, control=control)
    assert stats.retries >= 1 and stats.rpcs >= 3 and control.failed == []


def test_oversized_frames_sharing_a_stream_are_split_until_requests_and_replies_fit(nodes, tmp_path):
    """257 wide rows: the first split (128 + 128 + 1 on one stream) is still too large and takes the 1-row frame
    down with it; the next splits size by the largest failed frame until requests and replies (2 outputs per row)
    fit the node's 1 MiB limit."""
    fn = make_function(seed=25, n_experts=2, hidden=WIDE, inter=32)
    a, _ = nodes
    _deploy(fn, a.address, tmp_path)
    control = RecordingControl(fn, tmp_path)
    stats = _step(fn, {fn.function_id: (a.address,)}, rows=257, control=control, hidden_size=WIDE)
    assert stats.retries >= 2 and control.failed == [] and control.missing == []
