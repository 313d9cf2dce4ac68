"""MQTT telemetry of a node (``faasmoe-node --mqtt mqtt://HOST:PORT``), with aiomqtt.

Publishes the node's status (retained) every ``interval_s`` and soon after a material change (a function
deployed, undeployed, loaded or evicted), and one event per session load / eviction; topics and JSON
schemas are documented in :mod:`faasmoe.proto.telemetry`. A Last Will marks the node offline when its
connection dies; a clean stop publishes the same record with reason "shutdown".

Serving never waits on the broker: runtime listeners only append to a bounded in-memory queue (the oldest
event is dropped when it is full, and counted); one background task connects, publishes and reconnects
with exponential backoff while the broker is away. Payloads are built from the node's aggregated state:
tenant ids, request ids and tensors never reach this module.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time

import aiomqtt

from faasmoe.proto import telemetry as tm
from faasmoe.proto.backoff import Backoff

log = logging.getLogger(__name__)
STATUS_INTERVAL_S = 10.0          # status republished at least this often
MIN_STATUS_GAP_S = 0.25           # ... and at most this often (changes in between are coalesced)
CHANGE_POLL_S = 1.0               # deploy / undeploy are noticed within this
MAX_EVENTS = 1000                 # queued events while the broker is away; the oldest are dropped
KEEPALIVE_S = 10                  # MQTT keepalive: a silent dead link triggers the Last Will in ~1.5x this
RECONNECT = Backoff(0.5, 30.0, jitter=0.2)   # reconnect delays: 0.5 s doubling up to 30 s
TIMEOUT_S = 5.0                   # connect / publish timeout
SHUTDOWN_S = 2.0                  # time allowed to publish the offline record on stop


class NodeTelemetry:
    """Async context manager (a node extension): ``async with NodeTelemetry(node, "mqtt://127.0.0.1:1883")``."""

    def __init__(self, node, broker: str | tm.BrokerAddress, interval_s: float = STATUS_INTERVAL_S,
                 max_events: int = MAX_EVENTS, keepalive_s: int = KEEPALIVE_S,
                 backoff: Backoff = RECONNECT):
        self.node, self.node_id = node, node.node_id
        self.broker = broker if isinstance(broker, tm.BrokerAddress) else tm.parse_broker_url(broker)
        self.interval_s, self.keepalive_s, self.backoff = interval_s, keepalive_s, backoff
        self.connected = False
        self.published_status = 0                 # status messages sent since start
        self.published_events = 0
        self.events_dropped = 0                   # oldest events dropped because the queue was full
        self._events: collections.deque[dict] = collections.deque(maxlen=max(1, max_events))
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._changed = True
        self._started_s = time.monotonic()

    async def __aenter__(self) -> NodeTelemetry:
        self.node.runtime.listeners.append(self._on_event)
        self._task = asyncio.create_task(self._run(), name=f"mqtt-{self.node_id}")
        return self

    async def __aexit__(self, *exc_info) -> None:
        with contextlib.suppress(ValueError):
            self.node.runtime.listeners.remove(self._on_event)
        self._stop.set()
        self._wake.set()
        if not self.connected:                    # nothing to say goodbye on: never wait for a dead broker
            self._task.cancel()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), SHUTDOWN_S + 1.0)
        except asyncio.TimeoutError:
            log.warning("node %s: telemetry did not stop in time; cancelled", self.node_id)
            self._task.cancel()
        except asyncio.CancelledError:
            if not self._task.cancelled():        # we are being cancelled ourselves
                raise
        await asyncio.gather(self._task, return_exceptions=True)

    # ---- runtime hook (event loop, never blocks)
    def _on_event(self, record: dict) -> None:
        if len(self._events) == self._events.maxlen:
            self.events_dropped += 1
        self._events.append({"schema": tm.EVENT_SCHEMA, "node_id": self.node_id, "ts": time.time(), **record})
        self._changed = True                      # a load / eviction is a material change: status follows
        self._wake.set()

    @property
    def queued_events(self) -> int:
        return len(self._events)

    # ---- payloads
    def status_payload(self) -> dict:
        st, counters = self.node.status(), self.node.runtime.counters
        return {
            "schema": tm.STATUS_SCHEMA, "node_id": st.node_id, "online": True, "ts": time.time(),
            "address": self.node.address, "version": st.version, "profile": st.profile,
            "uptime_s": round(time.monotonic() - self._started_s, 3),
            **{key: getattr(st, key) for key in ("memory_budget_bytes", "capacity_bytes", "deployed_bytes",
                                                 "loaded_bytes", "disk_budget_bytes", "disk_used_bytes",
                                                 "rss_bytes", "threads", "queue_depth")},
            "keep_alive_s": float(st.keep_alive_s), "heat_window_s": float(st.heat_window_s),
            "functions": [{"function_id": f.function_id, "layer": f.layer, "expert_ids": list(f.expert_ids),
                           "size_bytes": f.size_bytes, "loaded": f.loaded, "idle_s": round(f.idle_s, 3),
                           "resident_bytes": f.resident_bytes, "invocations": f.invocations,
                           "in_flight": f.in_flight, "expert_calls_window": list(f.expert_calls_window),
                           "precision": f.precision, "block_size": f.block_size}
                          for f in st.functions],
            "counters": {"loads": counters.loads, "cold_starts": counters.cold_starts,
                         "evictions_keep_alive": counters.evictions_keep_alive,
                         "evictions_memory": counters.evictions_memory, "backpressure": counters.backpressure,
                         "memory_waits": counters.memory_waits, "events_dropped": self.events_dropped},
        }

    def _fingerprint(self) -> tuple:
        rt = self.node.runtime
        return tuple((fid, fn.session is not None) for fid, fn in rt.deployed.items()) if rt else ()

    # ---- the background task
    def _client(self) -> aiomqtt.Client:
        b = self.broker
        lost = tm.offline_status(self.node_id, "connection_lost", None, self.node.address)
        will = aiomqtt.Will(tm.status_topic(self.node_id), tm.encode(lost), qos=1, retain=True)
        return aiomqtt.Client(b.host, b.port, username=b.username, password=b.password,
                              identifier=f"faasmoe-node-{self.node_id}", will=will, keepalive=self.keepalive_s,
                              timeout=TIMEOUT_S, tls_context=b.tls_context())

    async def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                async with self._client() as client:
                    self.connected, failures = True, 0
                    log.info("node %s: publishing telemetry to %s", self.node_id, self.broker)
                    await self._publish_loop(client)
                    offline = tm.offline_status(self.node_id, "shutdown", time.time(), self.node.address)
                    await client.publish(tm.status_topic(self.node_id), tm.encode(offline), qos=1, retain=True,
                                         timeout=SHUTDOWN_S)
                    return
            except aiomqtt.MqttError as err:
                delay_s = self.backoff.delay_s(failures)
                failures += 1
                log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                        "node %s: MQTT broker %s unavailable (%s); serving continues, retrying in %.1f s",
                        self.node_id, self.broker, err, delay_s)
            except Exception:  # noqa: BLE001 - a telemetry bug must not end telemetry (nor the node)
                delay_s = self.backoff.delay_s(failures)
                failures += 1
                log.exception("node %s: telemetry failed; retrying in %.1f s", self.node_id, delay_s)
            finally:
                self.connected = False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay_s)

    async def _publish_loop(self, client: aiomqtt.Client) -> None:
        last_status_s, last_fp = -float("inf"), None
        while not self._stop.is_set():
            while self._events:                      # oldest first; an event leaves the queue once sent
                event = self._events[0]
                await client.publish(tm.events_topic(self.node_id), tm.encode(event), qos=1)
                if self._events and self._events[0] is event:     # not dropped meanwhile by a full queue
                    self._events.popleft()
                self.published_events += 1
            now_s, fp = time.monotonic(), self._fingerprint()
            changed = self._changed or fp != last_fp
            due_s = last_status_s + (MIN_STATUS_GAP_S if changed else self.interval_s)
            if now_s >= due_s:
                self._changed = False
                await client.publish(tm.status_topic(self.node_id), tm.encode(self.status_payload()), qos=1,
                                     retain=True)
                self.published_status += 1
                last_status_s, last_fp = now_s, fp
                due_s = now_s + self.interval_s
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, min(due_s - now_s, CHANGE_POLL_S)))
            self._wake.clear()


def mqtt_extension(config):
    """What :func:`faasmoe.node.cli.default_extensions` adds for ``--mqtt URL`` (the URL is checked now)."""
    return functools.partial(NodeTelemetry, broker=tm.parse_broker_url(config.mqtt_url))
