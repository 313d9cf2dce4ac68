"""Node metrics: the expert heat window and Prometheus ``/metrics`` (``faasmoe-node --metrics-port P``).

Each node has its own ``CollectorRegistry`` (several nodes may share a test process). Counts the runtime
keeps anyway (invocations, rows, loads, evictions, bytes, queue depth) are read at scrape time by
:class:`_RuntimeCollector`: they cost the invoke path nothing. Only three histograms are observed as things
happen: compute seconds per call (label ``layer``), end-to-end Invoke handler seconds, and load seconds.
Functions are labelled with the first 12 hex digits of their id (``function``) and their ``layer``.

The endpoint is prometheus_client's HTTP server (a daemon thread) bound to the node's ``--host``; port 0 picks
a free port, reported in the log and as ``node.metrics_port``. The runtime is read on the node's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import operator
import time
from typing import Callable

import psutil
from prometheus_client import CollectorRegistry, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from faasmoe.proto.errors import FaasmoeError

log = logging.getLogger(__name__)
HEAT_WINDOW_S = 60.0
HEAT_BUCKET_S = 10.0
COMPUTE_BUCKETS_S = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LOAD_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SCRAPE_TIMEOUT_S = 5.0        # a scrape waits this long for the node's event loop


class HeatWindow:
    """Rows routed to each expert of one function over the last ``window_s``, in ``bucket_s`` buckets.

    ``add`` is the hot path (one bucket check and a C-level element-wise add); the window reported covers
    the current bucket plus the previous ``window_s / bucket_s - 1`` full ones.
    """

    __slots__ = ("bucket_s", "_epochs", "_rows")

    def __init__(self, window_s: float = HEAT_WINDOW_S, bucket_s: float = HEAT_BUCKET_S):
        n = max(1, round(window_s / bucket_s))
        self.bucket_s = bucket_s
        self._epochs = [-1] * n
        self._rows: list[list[int]] = [[] for _ in range(n)]

    @property
    def window_s(self) -> float:
        return self.bucket_s * len(self._epochs)

    def add(self, counts, now_s: float) -> None:
        epoch = int(now_s // self.bucket_s)
        i = epoch % len(self._epochs)
        if self._epochs[i] != epoch:
            self._epochs[i], self._rows[i] = epoch, list(counts)
        else:
            self._rows[i] = list(map(operator.add, self._rows[i], counts))

    def totals(self, n_experts: int, now_s: float) -> list[int]:
        epoch, out = int(now_s // self.bucket_s), [0] * n_experts
        for e, rows in zip(self._epochs, self._rows):
            if epoch - len(self._epochs) < e <= epoch:
                for j, value in enumerate(rows[:n_experts]):
                    out[j] += value
        return out


class Listeners(list):
    """The runtime's event hooks: callables taking one event dict, called on the event loop for each session
    load and eviction (never per call). A failing listener is logged, never raised into the runtime.

    Event dict: ``event`` ("load" | "evict"), ``function_id``, ``layer``, ``expert_ids``, ``size_bytes``,
    ``resident_bytes``; loads add ``load_s`` and ``cold_start``, evictions ``reason`` (keep_alive | memory |
    undeploy | shutdown) and ``idle_s``. Aggregated facts about functions only: no call data exists here.
    """

    def emit(self, event: str, info, resident_bytes: int, **fields) -> None:
        if not self:
            return
        record = {"event": event, "function_id": info.function_id, "layer": info.layer,
                  "expert_ids": list(info.expert_ids), "size_bytes": info.size_bytes,
                  "resident_bytes": resident_bytes, **fields}
        for listener in list(self):
            try:
                listener(record)
            except Exception:  # noqa: BLE001 - telemetry never breaks serving
                log.exception("runtime listener %r failed", listener)


class _RuntimeCollector:
    """Reads the runtime's own counters at scrape time, on the node's event loop (the runtime is only ever
    touched there): a scrape from the HTTP server's thread hands the reading over to the loop."""

    def __init__(self, node, loop: asyncio.AbstractEventLoop):
        self.node, self.loop = node, loop
        self._proc = psutil.Process()

    def collect(self):
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            return list(self._families())

        async def read():
            return list(self._families())
        return asyncio.run_coroutine_threadsafe(read(), self.loop).result(SCRAPE_TIMEOUT_S)

    def _families(self):
        node = self.node
        rt, store, cfg = node.runtime, node.store, node.config
        if rt is None or store is None:
            return
        fl = ["function", "layer"]
        fam = {name: CounterMetricFamily(f"faasmoe_node_function_{name}", text, labels=fl) for name, text in (
            ("invocations", "calls that ran, per function"), ("rows", "token rows computed, per function"),
            ("compute_seconds", "ONNX Runtime seconds, per function"),
            ("cold_starts", "loads caused by calls, per function"))}
        gauges = {name: GaugeMetricFamily(f"faasmoe_node_function_{name}", text, labels=fl) for name, text in (
            ("loaded", "1 while the function's session is loaded"), ("resident_bytes", "accounted memory"),
            ("idle_seconds", "since the last call ended"), ("in_flight", "calls running or waiting"))}
        now = time.monotonic()
        for fn in list(rt.deployed.values()):
            st, labels = fn.stats, [fn.info.function_id[:12], str(fn.info.layer)]
            for name, value in (("invocations", st.invocations), ("rows", st.rows),
                                ("compute_seconds", st.compute_s), ("cold_starts", st.cold_starts)):
                fam[name].add_metric(labels, value)
            for name, value in (("loaded", fn.session is not None), ("resident_bytes", fn.resident_bytes),
                                ("idle_seconds", max(0.0, now - st.last_used_s)), ("in_flight", st.in_flight)):
                gauges[name].add_metric(labels, float(value))
        yield from fam.values()
        yield from gauges.values()
        c = rt.counters
        for name, value, text in (("loads", c.loads, "session loads (calls and prefetch)"),
                                  ("cold_starts", c.cold_starts, "loads caused by calls"),
                                  ("backpressure", c.backpressure, "calls refused because the queue was full"),
                                  ("memory_waits", c.memory_waits, "loads that waited for memory")):
            yield CounterMetricFamily(f"faasmoe_node_{name}", text, value=value)
        ev = CounterMetricFamily("faasmoe_node_evictions", "sessions released by policy", labels=["reason"])
        ev.add_metric(["keep_alive"], c.evictions_keep_alive)
        ev.add_metric(["memory"], c.evictions_memory)
        yield ev
        for name, value, text in (
                ("resident_bytes", rt.loaded_bytes, "memory accounted to loaded sessions"),
                ("deployed_bytes", rt.deployed_bytes, "memory the deployed functions hold when all are loaded (estimate)"),
                ("disk_used_bytes", store.used_bytes, "function files on disk (warm cache included)"),
                ("disk_budget_bytes", cfg.disk_budget_bytes, "disk budget"),
                ("memory_budget_bytes", cfg.memory_budget_bytes, "memory budget of loaded sessions"),
                ("capacity_bytes", cfg.capacity_bytes, "deployable bytes (budget x overcommit)"),
                ("queue_depth", rt.queue_depth, "calls waiting for a load or a run slot"),
                ("rss_bytes", self._proc.memory_info().rss, "resident set size of the node process")):
            yield GaugeMetricFamily(f"faasmoe_node_{name}", text, value=value)
        fns = GaugeMetricFamily("faasmoe_node_functions", "functions by state", labels=["state"])
        fns.add_metric(["deployed"], len(rt.deployed))
        fns.add_metric(["loaded"], sum(fn.session is not None for fn in list(rt.deployed.values())))
        yield fns


class NodeMetrics:
    """The Prometheus registry of one node; ``attach()`` after the node started."""

    def __init__(self, node):
        self.node = node
        self.registry = CollectorRegistry(auto_describe=False)
        self.compute_s = Histogram("faasmoe_node_compute_seconds", "ONNX Runtime seconds per function call",
                                   ["layer"], buckets=COMPUTE_BUCKETS_S, registry=self.registry)
        self.invoke_s = Histogram("faasmoe_node_invoke_seconds", "Invoke handler seconds, frame in to reply out",
                                  buckets=COMPUTE_BUCKETS_S, registry=self.registry)
        self.load_s = Histogram("faasmoe_node_load_seconds", "session load seconds (warm-up included)",
                                buckets=LOAD_BUCKETS_S, registry=self.registry)
        self.registry.register(_RuntimeCollector(node, asyncio.get_running_loop()))
        self._compute_by_layer: dict[int, object] = {}

    def attach(self) -> None:
        self.node.runtime.listeners.append(self.on_event)
        self.node.invoke_listeners.append(self.on_invoke)

    def detach(self) -> None:
        for hooks, hook in ((getattr(self.node.runtime, "listeners", []), self.on_event),
                            (self.node.invoke_listeners, self.on_invoke)):
            with contextlib.suppress(ValueError):
                hooks.remove(hook)

    def on_invoke(self, layer: int, results, elapsed_s: float) -> None:
        self.invoke_s.observe(elapsed_s)
        deployed = self.node.runtime.deployed
        for result, _ in results:
            if result.compute_s:
                fn = deployed.get(result.function_id)
                fn_layer = fn.info.layer if fn is not None else layer      # the function's own layer
                child = self._compute_by_layer.get(fn_layer)
                if child is None:
                    child = self._compute_by_layer[fn_layer] = self.compute_s.labels(str(fn_layer))
                child.observe(result.compute_s)

    def on_event(self, event: dict) -> None:
        if event["event"] == "load":
            self.load_s.observe(event["load_s"])

    def scrape(self) -> bytes:
        return generate_latest(self.registry)


@contextlib.asynccontextmanager
async def serve_metrics(node, port: int | None = None):
    """Node extension: metrics of ``node`` on ``node.config.host`` : ``port`` (default: --metrics-port),
    served by prometheus_client's own HTTP server (a daemon thread; each scrape reads the runtime on the
    node's event loop)."""
    metrics = NodeMetrics(node)
    port = port if port is not None else node.config.metrics_port or 0
    try:
        server, thread = start_http_server(port, addr=node.config.host, registry=metrics.registry)
    except OSError as err:
        raise FaasmoeError(f"cannot serve metrics on {node.config.host}:{port} ({err.strerror}); pick another "
                           "--metrics-port (0 = any free port)") from None
    metrics.attach()
    try:
        node.metrics_port = server.server_port
        log.info("node %s: Prometheus metrics on http://%s/metrics", node.node_id,
                 _host_port(node.config.host, node.metrics_port))
        yield metrics
    finally:
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        thread.join(5)
        metrics.detach()
        node.metrics_port = None


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def metrics_extension(config) -> Callable:
    """What :func:`faasmoe.node.cli.default_extensions` adds for ``--metrics-port``."""
    return functools.partial(serve_metrics, port=config.metrics_port)
