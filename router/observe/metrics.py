"""The router's Prometheus metrics (``/metrics`` of ``faasmoe-router serve``), in its own registry.

Counts come from the mesh's :class:`~faasmoe.router.mesh.MeshStats` at scrape time (layer calls, RPCs per
node, function calls, rows, retries, cold starts seen in replies, where the time went: dispatch vs node
compute). The one histogram, seconds per layer step across the mesh, is observed through :meth:`watch`.
With a :class:`~faasmoe.router.telemetry.TelemetryCollector` it also reports the nodes seen on MQTT.

    metrics = RouterMetrics(lambda: mesh.stats, telemetry=collector, engine=lambda: engine)
    metrics.watch(mesh, engine)      # then serve metrics.registry (the API mounts it at /metrics)
"""

from __future__ import annotations

import logging
from typing import Callable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


log = logging.getLogger(__name__)
STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

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


class _EngineCollector:
    def __init__(self, engine: Callable[[], object]):
        self.engine = engine

    def collect(self):
        engine = self.engine()
        if engine is None:
            return
        st = engine.stats
        for name, value, text in (("requests", st.requests, "requests accepted by the engine"),
                                  ("steps", st.steps, "engine steps (one batched forward each)"),
                                  ("failed_steps", st.failed_steps, "steps the mesh failed"),
                                  ("prompt_tokens", st.prompt_tokens, "prompt tokens prefilled"),
                                  ("completion_tokens", st.completion_tokens, "tokens generated"),
                                  ("decode_steps", st.decode_steps, "steps that fed decode tokens only"),
                                  ("decode_step_rpcs", st.decode_step_rpcs, "frames sent during decode-only steps")):
            yield CounterMetricFamily(f"faasmoe_router_engine_{name}", text, value=value)
        seqs = GaugeMetricFamily("faasmoe_router_engine_sequences", "sequences by state", labels=["state"])
        seqs.add_metric(["running"], len(engine.running))
        seqs.add_metric(["waiting"], len(engine.waiting))
        yield seqs


class RouterMetrics:
    """``stats``: a callable returning the current MeshStats (or None); ``engine``: one returning the running
    engine (or None); ``telemetry``: optional MQTT collector. Read at scrape time on the engine's loop."""

    def __init__(self, stats: Callable[[], object], telemetry=None, engine: Callable[[], object] | None = None):
        self.registry = CollectorRegistry(auto_describe=False)
        self.step_s = Histogram("faasmoe_router_layer_step_seconds", "one MoE layer step across the mesh",
                                buckets=STEP_BUCKETS_S, registry=self.registry)
        self.engine_step_s = Histogram("faasmoe_router_engine_step_seconds", "one engine step (all layers)",
                                       buckets=STEP_BUCKETS_S, registry=self.registry)
        self.registry.register(_StatsCollector(stats, telemetry))
        if engine is not None:
            self.registry.register(_EngineCollector(engine))

    def observe_step(self, layer: int, wall_s: float) -> None:
        self.step_s.observe(wall_s)

    def observe_engine_step(self, wall_s: float, tokens: int) -> None:
        self.engine_step_s.observe(wall_s)

    def watch(self, mesh, engine=None) -> None:
        """Time every layer step of ``mesh`` (its ``on_layer_done`` hook) and every step of ``engine``."""
        mesh.on_layer_done = self.observe_step
        if engine is not None:
            engine.on_step = self.observe_engine_step
