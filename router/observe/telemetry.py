"""Read node telemetry from MQTT on the router: the latest status per node and recent load/evict events.

A :class:`TelemetryCollector` subscribes to ``faasmoe/v1/nodes/+/status`` (retained, so every node that
ever announced itself, including offline ones from their Last Will, arrives right after subscribing) and
``faasmoe/v1/nodes/+/events``; paho runs the connection in its own thread and reconnects by itself.
Payloads that do not follow :mod:`faasmoe.proto.telemetry` are skipped (and logged at debug level).

    with TelemetryCollector("mqtt://127.0.0.1:1883") as tc:
        tc.wait_settled(2.0)
        tc.nodes()      # {node_id: {"online": bool, "status": payload, "received_ts": unix s}}
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid

import paho.mqtt.client as mqtt

from faasmoe.proto import telemetry as tm

log = logging.getLogger(__name__)
MAX_EVENTS = 500
QUIET_S = 0.3           # wait_settled: no new message for this long after subscribing


class TelemetryCollector:
    def __init__(self, broker: str | tm.BrokerAddress, max_events: int = MAX_EVENTS, keepalive_s: int = 30):
        self.broker = broker if isinstance(broker, tm.BrokerAddress) else tm.parse_broker_url(broker)
        self.keepalive_s = keepalive_s
        self.events_received = 0
        self.last_error: str | None = None
        self._nodes: dict[str, dict] = {}
        self._events: collections.deque[dict] = collections.deque(maxlen=max_events)
        self._subscribed = False
        self._last_message_s = 0.0
        self._cond = threading.Condition()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"faasmoe-router-{uuid.uuid4().hex[:8]}",
                                   clean_session=True)
        if self.broker.username:
            self._client.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls:
            self._client.tls_set_context(self.broker.tls_context())
        self._client.reconnect_delay_set(1, 30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_connect_fail = self._on_connect_fail

    # ---- lifecycle
    def start(self) -> TelemetryCollector:
        self._client.connect_async(self.broker.host, self.broker.port, self.keepalive_s)
        self._client.loop_start()
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> TelemetryCollector:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- reading
    def nodes(self) -> dict[str, dict]:
        with self._cond:
            return {node_id: dict(entry) for node_id, entry in self._nodes.items()}

    def events(self) -> list[dict]:
        with self._cond:
            return list(self._events)

    @property
    def subscribed(self) -> bool:
        return self._subscribed

    def wait_for(self, predicate, timeout_s: float) -> bool:
        """Wait until ``predicate(collector)`` holds (re-checked on every message); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def wait_settled(self, timeout_s: float = 2.0, quiet_s: float = QUIET_S) -> bool:
        """Wait for the subscription and the retained statuses (no message for ``quiet_s``)."""
        return self.wait_for(lambda c: c._subscribed and time.monotonic() - c._last_message_s >= quiet_s,
                             timeout_s)

    # ---- paho callbacks (its network thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code}"
            return
        self.last_error = None
        client.subscribe([(tm.STATUS_WILDCARD, 1), (tm.EVENTS_WILDCARD, 1)])

    def _on_connect_fail(self, client, userdata) -> None:
        self.last_error = f"cannot connect to {self.broker}"

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            self._subscribed = False
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._cond:
            self._subscribed, self._last_message_s = True, time.monotonic()
            self._cond.notify_all()

    def _on_message(self, client, userdata, message) -> None:
        where = tm.parse_topic(message.topic)
        if where is None:
            return
        node_id, kind = where
        if kind == "status" and not message.payload:     # retained status cleared: forget the node
            with self._cond:
                self._nodes.pop(node_id, None)
            return
        try:
            payload = tm.decode(message.payload)
            (tm.validate_status if kind == "status" else tm.validate_event)(payload)
        except ValueError as err:
            log.debug("skipping %s: %s", message.topic, err)
            return
        with self._cond:
            self._last_message_s = time.monotonic()
            if kind == "status":
                self._nodes[node_id] = {"online": bool(payload["online"]), "status": payload,
                                        "received_ts": time.time()}
            else:
                self._events.append(payload)
                self.events_received += 1
            self._cond.notify_all()
