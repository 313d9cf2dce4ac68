"""MQTT telemetry of faasmoe nodes: topics, JSON payloads and broker URLs (shared by node and router).

Nodes publish only when started with ``--mqtt URL``; nothing needs a broker otherwise. Payloads are UTF-8
JSON objects, aggregated per node and per function: never a tenant id, request id, prompt or tensor.

Topics (``<node_id>`` is the node's ``--node-id``)::

    faasmoe/v1/nodes/<node_id>/status   retained, QoS 1: the node's latest state; replaced every 10 s
                                        and within ~1 s of a material change (a function deployed,
                                        undeployed, loaded or evicted; at most 4 per second). The Last
                                        Will and a clean shutdown both replace it with an offline record.
    faasmoe/v1/nodes/<node_id>/events   not retained, QoS 1: one record per session load or eviction.

Status (``"online": true``)::

    {"schema": "faasmoe.node.status/1", "node_id": str, "online": true, "ts": float (unix s),
     "address": "HOST:PORT" (gRPC), "version": str, "profile": str, "uptime_s": float,
     "memory_budget_bytes": int, "capacity_bytes": int, "deployed_bytes": int, "loaded_bytes": int,
     "disk_budget_bytes": int, "disk_used_bytes": int, "rss_bytes": int, "threads": int,
     "keep_alive_s": float (-1 = never evict), "queue_depth": int, "heat_window_s": float,
     "functions": [{"function_id": str (sha256), "layer": int, "expert_ids": [int], "size_bytes": int,
                    "loaded": bool, "idle_s": float, "resident_bytes": int, "invocations": int,
                    "in_flight": int, "expert_calls_window": [int] (rows per expert in the heat window),
                    "precision": "fp32" | "int8" | "int4", "block_size": int (0 for fp32); these two
                    optional: older nodes send neither, which means fp32}],
     "counters": {"loads", "cold_starts", "evictions_keep_alive", "evictions_memory", "backpressure",
                  "memory_waits", "events_dropped": int}}

``expert_calls_window`` (also in gRPC ``FunctionStatus``) counts rows per expert over the heat window: 60 s
in 10 s buckets, i.e. the current bucket and the five before it.

Offline status (Last Will, ``reason`` "connection_lost", or clean stop, ``reason`` "shutdown"; retained)::

    {"schema": "faasmoe.node.status/1", "node_id": str, "online": false, "reason": str,
     "ts": float | null (null in the Last Will: the broker sends it later), "address": "HOST:PORT"}

Event::

    {"schema": "faasmoe.node.event/1", "node_id": str, "ts": float (unix s), "event": "load" | "evict",
     "function_id": str, "layer": int, "expert_ids": [int], "size_bytes": int, "resident_bytes": int,
     load:  "load_s": float, "cold_start": bool (caused by a call rather than a prefetch)
     evict: "reason": "keep_alive" | "memory" | "undeploy" | "shutdown", "idle_s": float}

Broker URLs: ``mqtt://[user[:password]@]host[:port]`` (default port 1883), ``mqtts://...`` (TLS, 8883), or
a bare ``host[:port]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
import os
import ssl
from urllib.parse import unquote, urlsplit

from faasmoe.proto.errors import ConfigError

ROOT = "faasmoe/v1/nodes"
STATUS_SCHEMA = "faasmoe.node.status/1"
EVENT_SCHEMA = "faasmoe.node.event/1"
STATUS_WILDCARD = f"{ROOT}/+/status"
EVENTS_WILDCARD = f"{ROOT}/+/events"
EVENT_KINDS = ("load", "evict")
EVICT_REASONS = ("keep_alive", "memory", "undeploy", "shutdown")
# Never part of any payload: the one place that says so (tests check every message against it).
FORBIDDEN_KEYS = frozenset({"tenant_id", "tenant", "request_id", "rows", "hidden", "prompt"})

STATUS_KEYS = {"schema": str, "node_id": str, "online": bool, "ts": float, "address": str, "version": str,
               "profile": str, "uptime_s": float, "memory_budget_bytes": int, "capacity_bytes": int,
               "deployed_bytes": int, "loaded_bytes": int, "disk_budget_bytes": int, "disk_used_bytes": int,
               "rss_bytes": int, "threads": int, "keep_alive_s": float, "queue_depth": int,
               "heat_window_s": float, "functions": list, "counters": dict}
FUNCTION_KEYS = {"function_id": str, "layer": int, "expert_ids": list, "size_bytes": int, "loaded": bool,
                 "idle_s": float, "resident_bytes": int, "invocations": int, "in_flight": int,
                 "expert_calls_window": list}
FUNCTION_OPTIONAL_KEYS = {"precision": str, "block_size": int}     # nodes before int8 / int4 functions send neither
COUNTER_KEYS = ("loads", "cold_starts", "evictions_keep_alive", "evictions_memory", "backpressure",
                "memory_waits", "events_dropped")
OFFLINE_KEYS = {"schema": str, "node_id": str, "online": bool, "reason": str}
EVENT_KEYS = {"schema": str, "node_id": str, "ts": float, "event": str, "function_id": str, "layer": int,
              "expert_ids": list, "size_bytes": int, "resident_bytes": int}
LOAD_KEYS = {"load_s": float, "cold_start": bool}
EVICT_KEYS = {"reason": str, "idle_s": float}


def status_topic(node_id: str) -> str:
    return f"{ROOT}/{node_id}/status"


def events_topic(node_id: str) -> str:
    return f"{ROOT}/{node_id}/events"


def parse_topic(topic: str) -> tuple[str, str] | None:
    """``(node_id, "status" | "events")`` for a telemetry topic, else None."""
    parts = topic.split("/")
    if len(parts) == 5 and "/".join(parts[:3]) == ROOT and parts[4] in ("status", "events"):
        return parts[3], parts[4]
    return None


def encode(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def decode(data: bytes | str) -> dict:
    """A payload as a dict; ValueError when it is not a JSON object."""
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("telemetry payload is not a JSON object")
    return value


def offline_status(node_id: str, reason: str, ts: float | None, address: str = "") -> dict:
    return {"schema": STATUS_SCHEMA, "node_id": node_id, "online": False, "reason": reason, "ts": ts,
            "address": address}


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None       # mqtts: the CA that signed the broker's certificate (default: the system's)

    def __str__(self) -> str:    # no password in logs
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context of an mqtts:// broker (certificate and host name checked), None for mqtt://."""
        if not self.tls:
            return None
        try:
            return ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"MQTT CA file {self.ca_file}: {exc}") from None


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://HOST[:PORT]`` or ``mqtts://[USER[:PASSWORD]@]HOST[:PORT][?ca=CA.pem]``. A user without a
    password in the URL takes it from ``$FAASMOE_MQTT_PASSWORD`` (keeps it out of process listings)."""
    text = url.strip()
    parts = urlsplit(text if "://" in text else f"mqtt://{text}")
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigError(f"MQTT URL {url!r}: scheme {parts.scheme!r} is not mqtt:// or mqtts://")
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError(f"MQTT URL {url!r}: the port is not a number in 1..65535") from None
    if not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(f"MQTT URL {url!r}: expected mqtt://HOST[:PORT] (e.g. mqtt://127.0.0.1:1883)")
    query: dict[str, list[str]] = {}
    for item in filter(None, parts.query.split("&")):      # unquote only: a "+" in a path stays a "+"
        key, _, value = item.partition("=")
        query.setdefault(unquote(key), []).append(unquote(value))
    if set(query) - {"ca"} or len(query.get("ca", [])) > 1:
        raise ConfigError(f"MQTT URL {url!r}: the only option is ?ca=FILE (the broker's CA, mqtts:// only)")
    ca_file = query["ca"][0] if "ca" in query else None
    if ca_file is not None and not tls:
        raise ConfigError(f"MQTT URL {url!r}: ?ca= needs mqtts://")
    if ca_file is not None and not os.path.isfile(ca_file):
        raise ConfigError(f"MQTT URL {url!r}: CA file {ca_file} does not exist")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if username and password is None:
        password = os.environ.get("FAASMOE_MQTT_PASSWORD")
    if (username or password) and not tls:
        raise ConfigError(f"MQTT URL {url!r}: a user name and password would travel in cleartext over mqtt://; "
                          "use mqtts://")
    return BrokerAddress(parts.hostname, port, tls, username, password, ca_file)


def _check_types(payload: dict, keys: dict, what: str, optional: bool = False) -> None:
    for key, kind in keys.items():
        if key not in payload:
            if optional:
                continue
            raise ValueError(f"{what}: missing {key!r}")
        value = payload[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else \
            isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not ok:
            raise ValueError(f"{what}: {key!r} is {type(value).__name__}, expected {kind.__name__}")


def forbidden_keys(value) -> set[str]:
    """Keys of FORBIDDEN_KEYS anywhere inside ``value`` (nested dicts and lists)."""
    if isinstance(value, dict):
        return (set(value) & FORBIDDEN_KEYS).union(*(forbidden_keys(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(forbidden_keys(v) for v in value))
    return set()


def validate_status(payload: dict) -> dict:
    """Check a status payload against the schema above; returns it, raises ValueError."""
    if payload.get("schema") != STATUS_SCHEMA:
        raise ValueError(f"status: schema {payload.get('schema')!r} is not {STATUS_SCHEMA}")
    if payload.get("online") is False:
        _check_types(payload, OFFLINE_KEYS, "offline status")
    else:
        _check_types(payload, STATUS_KEYS, "status")
        for fn in payload["functions"]:
            _check_types(fn, FUNCTION_KEYS, "status.functions[]")
            _check_types(fn, FUNCTION_OPTIONAL_KEYS, "status.functions[]", optional=True)
        missing = [k for k in COUNTER_KEYS if not isinstance(payload["counters"].get(k), int)]
        if missing:
            raise ValueError(f"status.counters: missing or not int: {missing}")
    if bad := forbidden_keys(payload):
        raise ValueError(f"status carries forbidden keys {sorted(bad)}")
    return payload


def validate_event(payload: dict) -> dict:
    """Check an event payload against the schema above; returns it, raises ValueError."""
    if payload.get("schema") != EVENT_SCHEMA:
        raise ValueError(f"event: schema {payload.get('schema')!r} is not {EVENT_SCHEMA}")
    _check_types(payload, EVENT_KEYS, "event")
    if payload["event"] not in EVENT_KINDS:
        raise ValueError(f"event: kind {payload['event']!r} is not one of {EVENT_KINDS}")
    _check_types(payload, LOAD_KEYS if payload["event"] == "load" else EVICT_KEYS, f"{payload['event']} event")
    if payload["event"] == "evict" and payload["reason"] not in EVICT_REASONS:
        raise ValueError(f"evict event: reason {payload['reason']!r} is not one of {EVICT_REASONS}")
    if bad := forbidden_keys(payload):
        raise ValueError(f"event carries forbidden keys {sorted(bad)}")
    return payload
