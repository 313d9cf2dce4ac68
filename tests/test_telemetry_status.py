"""The router's view: a real ExpertMesh stepping through a real node process, the router's Prometheus
endpoint, and ``faasmoe-router status --heat --plot`` showing exactly the rows the gate routed."""

from __future__ import annotations

import hashlib
import json
import asyncio

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from faasmoe.proto import faasmoe_pb2 as pb
from faasmoe.router.cli import main as router_cli
from faasmoe.router.control.client import NodeClient
from faasmoe.router.mesh.grouping import LayerFunctions
from faasmoe.router.control.local_mesh import start_node
from faasmoe.router.mesh.dispatch import ExpertMesh
from faasmoe.router.mesh.routing import RoutingBoard
from faasmoe.router.mesh.transport import Transport
from faasmoe.router.observe.metrics import RouterMetrics
from faasmoe.router.store.onnx_function import build_function

HIDDEN, INTER = 64, 96
LAYOUT = {0: [(0, 1), (2, 3)], 1: [(0, 1, 2, 3)]}          # layer -> functions (expert ids)
TOP_K = {0: np.array([[0, 2], [1, 2], [3, 0], [2, 1], [0, 3]]),    # 5 tokens, top-2
         1: np.array([[1, 2], [1, 3], [1, 0]])}


def deploy_layout(tmp_path, client: NodeClient) -> dict[int, LayerFunctions]:
    rng, layers = np.random.default_rng(0), {}
    for layer, groups in LAYOUT.items():
        experts_of = {}
        for experts in groups:
            data = build_function(layer, experts, [rng.standard_normal((2 * INTER, HIDDEN), np.float32) * 0.05
                                                   for _ in experts],
                                  [rng.standard_normal((HIDDEN, INTER), np.float32) * 0.05 for _ in experts])
            fid = hashlib.sha256(data).hexdigest()
            path = tmp_path / f"{fid}.onnx"
            path.write_bytes(data)
            client.deploy(path, pb.FunctionHeader(function_id=fid, size_bytes=len(data), layer=layer,
                                                  expert_ids=experts, model_id="heat", dtype="float32"))
            experts_of[fid] = experts
        layers[layer] = LayerFunctions(experts_of)
    return layers


def scrape(registry) -> dict[tuple, float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def stepped_node(tmp_path):
    """A node process after 3 steps of layer 0 and 1 of layer 1 through a real mesh with router metrics."""
    node = start_node(tmp_path / "store", extra_args=["--node-id", "heat-node"])
    client = NodeClient(node.address)
    try:
        layers = deploy_layout(tmp_path, client)
        router = RoutingBoard()
        router.publish({fid: (node.address,) for lf in layers.values() for fid in lf.experts_of})

        async def steps():
            transport = Transport()
            mesh = ExpertMesh(layers, transport, router)
            metrics = RouterMetrics(lambda: mesh.stats)
            metrics.watch(mesh)
            try:
                x = np.random.default_rng(1).standard_normal((5, HIDDEN), dtype=np.float32)
                for layer, n_steps in ((0, 3), (1, 1)):
                    for _ in range(n_steps):
                        ctx = mesh.context("heat-steps", tenant_id="tenant-heat")
                        pending = await mesh.submit(layer, x[:len(TOP_K[layer])], TOP_K[layer], ctx)
                        out = await mesh.collect(pending)
                        assert sorted(out) == sorted(set(TOP_K[layer].ravel().tolist()))
                return scrape(metrics.registry)
            finally:
                await transport.close()

        yield node, asyncio.run(steps())
    finally:
        client.close()
        node.stop()


def expected_heat() -> list[list[int]]:
    steps = {0: 3, 1: 1}
    return [[steps[layer] * int((TOP_K[layer] == e).sum()) for e in range(4)] for layer in (0, 1)]


def test_router_metrics_and_status_heat_table_and_plot(stepped_node, tmp_path, capsys):
    node, got = stepped_node
    assert got["faasmoe_router_layer_calls_total", ()] == 4
    assert got["faasmoe_router_rpcs_total", ()] == 4 == got["faasmoe_router_node_rpcs_total", (("node", node.address),)]
    assert got["faasmoe_router_function_calls_total", ()] == 3 * 2 + 1
    assert got["faasmoe_router_cold_starts_total", ()] == 3 and got["faasmoe_router_retries_total", ()] == 0
    assert got["faasmoe_router_layer_step_seconds_count", ()] == 4
    assert got["faasmoe_router_layer_seconds_total", ()] >= got["faasmoe_router_node_compute_seconds_total", ()] > 0
    assert got["faasmoe_router_dispatch_seconds_total", ()] > 0

    png = tmp_path / "heat.png"
    assert router_cli.main(["status", "--nodes", node.address, "--heat", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["layer", "e0"])
    table = [list(map(int, line.split())) for line in lines[header + 1:header + 3]]
    assert [row[0] for row in table] == [0, 1]
    assert [row[1:5] for row in table] == expected_heat()
    assert [row[5] for row in table] == [3 * 10, 6]                   # totals: tokens x top-k x steps
    assert "heat-node: 3 loaded functions" in out

    assert router_cli.main(["status", "--nodes", node.address, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["heat"]["calls"] == expected_heat() and report["heat"]["layers"] == [0, 1]
    (entry,) = report["nodes"]
    assert all(f["loaded"] and f["resident_bytes"] > f["size_bytes"] for f in entry["functions"])
