"""The router's Prometheus metrics (``faasmoe-router serve --metrics-port P``), in its own registry.

Counts come from the mesh's :class:`~faasmoe.router.mesh.MeshStats` at scrape time (layer calls, RPCs per
node, function calls, rows, retries, cold starts seen in replies, where the time went: dispatch vs node
compute). The one histogram, seconds per layer step across the mesh, is observed through :meth:`watch`.
With a :class:`~faasmoe.router.telemetry.TelemetryCollector` it also reports the nodes seen on MQTT.

    metrics = RouterMetrics(lambda: session.mesh.stats, telemetry=collector)
    metrics.watch(session.mesh)
    port = start_metrics_server(metrics.registry, args.metrics_port, host="0.0.0.0")
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from faasmoe.proto.errors import ConfigError

log = logging.getLogger(__name__)
STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_servers: dict[int, object] = {}
_servers_lock = threading.Lock()

_COUNTS = (("layer_calls", "MoE layer steps run through the mesh"), ("rpcs", "Invoke RPCs sent"),
           ("function_calls", "function calls inside those RPCs"), ("rows_sent", "token rows sent to nodes"),
           ("retries", "layer steps retried (node failure or back-pressure)"),
           ("cold_starts", "cold starts reported by nodes in replies"))
_SECONDS = (("wall_s", "layer_seconds", "layer steps end to end"),
            ("encode_s", "encode_seconds", "planning and framing on the router"),
            ("wait_s", "wait_seconds", "sending to last reply (RPC + node time)"),
            ("decode_s", "decode_seconds", "reading replies"),
            ("node_compute_s", "node_compute_seconds", "slowest node's ONNX time per layer step"))


class _StatsCollector:
    def __init__(self, stats: Callable[[], object], telemetry):
        self.stats, self.telemetry = stats, telemetry

    def collect(self):
        st = self.stats()
        if st is not None:
            for name, text in _COUNTS:
                yield CounterMetricFamily(f"faasmoe_router_{name}", text, value=getattr(st, name))
            for attr, name, text in _SECONDS:
                yield CounterMetricFamily(f"faasmoe_router_{name}", text, value=getattr(st, attr))
            yield CounterMetricFamily("faasmoe_router_dispatch_seconds", "time the mesh added beyond expert "
                                      "compute (serialization, RPC, waiting)", value=st.dispatch_s())
            per_node = CounterMetricFamily("faasmoe_router_node_rpcs", "Invoke RPCs per node", labels=["node"])
            for node, count in sorted(dict(st.by_node).items()):
                per_node.add_metric([node], count)
            yield per_node
        if self.telemetry is not None:
            seen = GaugeMetricFamily("faasmoe_router_nodes_seen", "nodes seen on MQTT", labels=["state"])
            nodes = self.telemetry.nodes()
            online = sum(n["online"] for n in nodes.values())
            seen.add_metric(["online"], online)
            seen.add_metric(["offline"], len(nodes) - online)
            yield seen
            yield CounterMetricFamily("faasmoe_router_node_events", "node load/evict events received on MQTT",
                                      value=self.telemetry.events_received)


class RouterMetrics:
    """``stats``: a callable returning the current MeshStats (or None); ``telemetry``: optional collector."""

    def __init__(self, stats: Callable[[], object], telemetry=None):
        self.registry = CollectorRegistry(auto_describe=False)
        self.step_s = Histogram("faasmoe_router_layer_step_seconds", "one MoE layer step across the mesh",
                                buckets=STEP_BUCKETS_S, registry=self.registry)
        self.registry.register(_StatsCollector(stats, telemetry))

    def observe_step(self, layer: int, wall_s: float) -> None:
        self.step_s.observe(wall_s)

    def watch(self, mesh) -> None:
        """Time every layer step of ``mesh`` (through its ``on_layer_done`` hook)."""
        mesh.on_layer_done = self.observe_step


def start_metrics_server(registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> int:
    """Serve ``registry`` on http://host:port/metrics from a daemon thread; returns the bound port (port 0
    picks a free one). Stop it with :func:`stop_metrics_server`."""
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise ConfigError(f"cannot serve metrics on {host}:{port} ({err.strerror}); pick another "
                          "--metrics-port (0 = any free port)") from None
    bound = server.server_port
    with _servers_lock:
        _servers[bound] = server
    log.info("router metrics on http://%s:%d/metrics", host, bound)
    return bound


def stop_metrics_server(port: int) -> None:
    with _servers_lock:
        server = _servers.pop(port, None)
    if server is not None:
        server.shutdown()
        server.server_close()
