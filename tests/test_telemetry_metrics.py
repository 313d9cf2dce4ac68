"""Node Prometheus metrics and expert heat on a real in-process node (127.0.0.1, port 0, real ONNX Runtime),
scraped over real HTTP; the heat window and heat table as pure functions."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from faasmoe.node.cli import default_extensions
from faasmoe.node.metrics import HeatWindow, serve_metrics
from faasmoe.proto import faasmoe_pb2 as pb
from faasmoe.proto import frames
from faasmoe.proto.errors import FaasmoeError
from faasmoe.router.observe.heat import heat_matrix, render_heat
from node_fixtures import MIB, chunks_of, config, fn_status, make_function, running_node, cost

X = np.random.default_rng(3).standard_normal((6, 64), dtype=np.float32)


async def http_get(port: int, path: str = "/metrics") -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split(" ")[1]), body


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} of a Prometheus exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def invoke(stub, calls, layer: int = 0) -> None:
    await stub.invoke(frames.encode_request("req", "tenant", layer, X, calls))


@pytest.mark.asyncio
async def test_scrape_counts_invocations_rows_latency_loads_and_evictions(tmp_path):
    f2, f3 = make_function(seed=1, n_experts=2), make_function(seed=2, n_experts=3, layer=1)
    async with running_node(tmp_path) as (node, stub):
        async with serve_metrics(node, port=0) as metrics:
            assert node.metrics_port and metrics.registry is not None
            for fn in (f2, f3):
                await stub.deploy(chunks_of(fn))
            for _ in range(3):                                      # 3 Invokes per layer (a frame is one layer)
                await invoke(stub, [f2.call([0, 1, 2], [2, 1])], layer=0)
                await invoke(stub, [f3.call([3, 4, 5, 0], [1, 2, 1])], layer=1)
            await invoke(stub, [f2.call([5], [0, 1])])              # a 7th Invoke: 1 call, 1 row
            code, text = await http_get(node.metrics_port)
            assert code == 200
            got = samples(text)
            p2, p3 = (("function", f2.function_id[:12]), ("layer", "0")), (("function", f3.function_id[:12]),
                                                                            ("layer", "1"))
            assert got["faasmoe_node_function_invocations_total", p2] == 4
            assert got["faasmoe_node_function_invocations_total", p3] == 3
            assert got["faasmoe_node_function_rows_total", p2] == 3 * 3 + 1
            assert got["faasmoe_node_function_rows_total", p3] == 3 * 4
            assert got["faasmoe_node_function_cold_starts_total", p2] == 1
            assert got["faasmoe_node_compute_seconds_count", (("layer", "0"),)] == 4
            assert got["faasmoe_node_compute_seconds_count", (("layer", "1"),)] == 3
            assert got["faasmoe_node_invoke_seconds_count", ()] == 7
            assert got["faasmoe_node_invoke_seconds_sum", ()] > 0
            assert got["faasmoe_node_load_seconds_count", ()] == 2 and got["faasmoe_node_loads_total", ()] == 2
            assert got["faasmoe_node_cold_starts_total", ()] == 2
            assert got["faasmoe_node_deployed_bytes", ()] == cost(f2) + cost(f3)
            assert got["faasmoe_node_resident_bytes", ()] == node.runtime.loaded_bytes > 0
            assert got["faasmoe_node_disk_used_bytes", ()] == len(f2.data) + len(f3.data)
            assert got["faasmoe_node_memory_budget_bytes", ()] == 256 * MIB
            assert got["faasmoe_node_functions", (("state", "loaded"),)] == 2
            assert got["faasmoe_node_queue_depth", ()] == 0 and got["faasmoe_node_backpressure_total", ()] == 0
            assert got["faasmoe_node_rss_bytes", ()] > 0

            node.runtime.evict_idle(now_s=float("inf"))            # every session past its keep-alive
            got = samples((await http_get(node.metrics_port))[1])
            assert got["faasmoe_node_evictions_total", (("reason", "keep_alive"),)] == 2
            assert got["faasmoe_node_evictions_total", (("reason", "memory"),)] == 0
            assert got["faasmoe_node_resident_bytes", ()] == 0
            assert got["faasmoe_node_function_loaded", p3] == 0
        assert node.metrics_port is None and node.invoke_listeners == [] and node.runtime.listeners == []


@pytest.mark.asyncio
async def test_two_nodes_in_one_process_have_separate_registries(tmp_path):
    fn = make_function(seed=5)
    async with running_node(tmp_path / "a", node_id="a") as (a, stub_a), \
            running_node(tmp_path / "b", node_id="b") as (b, _):
        async with serve_metrics(a, 0), serve_metrics(b, 0):
            await stub_a.deploy(chunks_of(fn))
            await invoke(stub_a, [fn.call([0], [1, 0])])
            assert samples((await http_get(a.metrics_port))[1])["faasmoe_node_invoke_seconds_count", ()] == 1
            assert samples((await http_get(b.metrics_port))[1])["faasmoe_node_invoke_seconds_count", ()] == 0


@pytest.mark.asyncio
async def test_metrics_port_in_use_is_a_clear_error(tmp_path):
    async with running_node(tmp_path) as (node, _):
        async with serve_metrics(node, 0):
            with pytest.raises(FaasmoeError, match="--metrics-port"):
                async with serve_metrics(node, node.metrics_port):
                    pass


def test_extensions_follow_the_config(tmp_path):
    assert default_extensions(config(tmp_path)) == []
    assert len(default_extensions(config(tmp_path, metrics_port=0, mqtt_url="mqtt://127.0.0.1:1"))) == 2


@pytest.mark.asyncio
async def test_status_reports_rows_per_expert_in_the_heat_window(tmp_path):
    f3, f1 = make_function(seed=1, n_experts=3), make_function(seed=2, n_experts=1)
    async with running_node(tmp_path) as (node, stub):
        await stub.deploy(chunks_of(f3))
        await stub.deploy(chunks_of(f1))
        for counts in ([2, 0, 1], [1, 1, 1], [0, 0, 4]):
            await invoke(stub, [f3.call(list(range(sum(counts))), counts), f1.call([0, 1], [2])])
        status = await stub.status(pb.StatusRequest())
        assert status.heat_window_s == 60
        assert list(fn_status(status, f3.function_id).expert_calls_window) == [3, 1, 6]
        assert list(fn_status(status, f1.function_id).expert_calls_window) == [6]


@pytest.mark.parametrize("adds, now_s, expected", [
    ([(0.0, [1, 2]), (5.0, [1, 0])], 9.9, [2, 2]),                     # same bucket
    ([(0.0, [1, 2]), (15.0, [1, 0])], 59.9, [2, 2]),                   # window = 6 buckets of 10 s
    ([(0.0, [1, 2]), (15.0, [1, 0])], 60.0, [1, 0]),                   # the first bucket left the window
    ([(0.0, [1, 2]), (65.0, [3, 3])], 65.0, [3, 3]),                   # a reused slot starts from zero
    ([(0.0, [1, 2])], 200.0, [0, 0]),                                  # everything expired
    ([(0.0, [1, 2, 3])], 1.0, [1, 2]),                                 # asked for fewer experts
])
def test_heat_window(adds, now_s, expected):
    heat = HeatWindow(window_s=60, bucket_s=10)
    for t, counts in adds:
        heat.add(counts, t)
    assert heat.totals(len(expected), now_s) == expected and heat.window_s == 60


def test_heat_matrix_sums_replicas_and_renders_compactly_for_many_experts():
    fns = [{"layer": 3, "expert_ids": [0, 1], "expert_calls_window": [5, 0]}]
    nodes = [{"heat_window_s": 60.0, "functions": fns}, {"heat_window_s": 60.0, "functions": fns}]
    heat = heat_matrix(nodes, layers=[2, 3], num_experts=4)
    assert heat["calls"] == [[0, 0, 0, 0], [10, 0, 0, 0]] and heat["layers"] == [2, 3]
    table = render_heat(heat).splitlines()
    assert table[1].split() == ["layer", "e0", "e1", "e2", "e3", "total"]
    assert table[3].split() == ["3", "10", "0", "0", "0", "10"]

    many = heat_matrix([{"heat_window_s": 60.0, "functions": [
        {"layer": 0, "expert_ids": list(range(60)), "expert_calls_window": [0] * 59 + [90]},
        {"layer": 1, "expert_ids": list(range(60)), "expert_calls_window": [10] + [0] * 59}]}])
    lines = render_heat(many).splitlines()
    assert all(len(line) < 120 for line in lines)
    assert lines[3].split()[:3] == ["0", "." * 59 + "9", "90"] and lines[3].endswith("e59:90")
    assert lines[4].split()[:3] == ["1", "1" + "." * 59, "10"]
