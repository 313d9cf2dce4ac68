"""MQTT telemetry against a real mosquitto (127.0.0.1, free port): status and load/evict events of a real
node with their documented schema and no tenant data, reconnection when the broker comes late, the Last
Will of a SIGKILLed node process, and ``faasmoe-router status --mqtt``."""

from __future__ import annotations

import asyncio
import json

import aiomqtt
import numpy as np
import pytest

from faasmoe.node.cli import default_extensions
from faasmoe.node.telemetry import NodeTelemetry
from faasmoe.proto.backoff import Backoff
from faasmoe.proto import frames
from faasmoe.proto import telemetry as tm
from faasmoe.proto.errors import ConfigError
from faasmoe.router.cli import main as router_cli
from faasmoe.router.control.local_mesh import start_node
from faasmoe.router.observe.telemetry import TelemetryCollector
from mosquitto import broker, free_port, start_broker  # noqa: F401 - broker is a fixture
from node_fixtures import chunks_of, config, make_function, running_node, wait_until

TENANT, REQUEST = "tenant-7f3a9e-SECRET", "request-c0ffee-SECRET"
X = np.random.default_rng(7).standard_normal((4, 64), dtype=np.float32)


class Inbox:
    """Every message a real subscriber receives: (topic, payload bytes, retain flag)."""

    def __init__(self):
        self.messages: list[tuple[str, bytes, bool]] = []

    async def pump(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self.messages.append((str(message.topic), bytes(message.payload), bool(message.retain)))

    def decoded(self, kind: str) -> list[dict]:
        return [tm.decode(p) for t, p, _ in self.messages if t.endswith("/" + kind)]

    def events(self, name: str) -> list[dict]:
        return [e for e in self.decoded("events") if e["event"] == name]


async def subscribe(port: int, topic: str = "faasmoe/v1/nodes/#"):
    client = aiomqtt.Client("127.0.0.1", port)
    await client.__aenter__()
    await client.subscribe(topic, qos=1)
    inbox = Inbox()
    return client, inbox, asyncio.create_task(inbox.pump(client))


async def unsubscribe(client, task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await client.__aexit__(None, None, None)


@pytest.mark.asyncio
async def test_status_and_load_evict_events_follow_the_schema_and_carry_no_tenant_data(tmp_path, broker):
    fn = make_function(seed=1, n_experts=2)
    client, inbox, pump = await subscribe(broker.port)
    try:
        async with running_node(tmp_path, keep_alive_s=0, node_id="mqtt-node") as (node, stub):
            async with NodeTelemetry(node, broker.url, interval_s=30) as telemetry:
                await wait_until(lambda: inbox.decoded("status"), 5, "the first status")
                await stub.deploy(chunks_of(fn))
                await stub.invoke(frames.encode_request(REQUEST, TENANT, 0, X, [fn.call([0, 1, 3], [2, 1])]))
                await wait_until(lambda: inbox.events("evict"), 5, "the eviction event (keep-alive 0)")
                await wait_until(lambda: any(f["invocations"] == 1 and not f["loaded"] for s in inbox.decoded("status")
                                             if s["online"] for f in s["functions"]), 5, "a status after the call")
                assert telemetry.connected and telemetry.events_dropped == 0
            await wait_until(lambda: not inbox.decoded("status")[-1]["online"], 5, "the offline status on stop")
    finally:
        await unsubscribe(client, pump)

    for topic, payload, _ in inbox.messages:
        assert TENANT.encode() not in payload and REQUEST.encode() not in payload, topic
        assert topic in (tm.status_topic("mqtt-node"), tm.events_topic("mqtt-node"))
        (tm.validate_status if topic.endswith("/status") else tm.validate_event)(tm.decode(payload))
    (load,), (evict,) = inbox.events("load"), inbox.events("evict")
    assert load["node_id"] == "mqtt-node" and load["function_id"] == fn.function_id and load["layer"] == 0
    assert load["expert_ids"] == fn.expert_ids and load["cold_start"] and load["load_s"] > 0
    assert load["resident_bytes"] > load["size_bytes"] == len(fn.data)
    assert evict["reason"] == "keep_alive" and evict["resident_bytes"] == load["resident_bytes"]
    after = [s for s in inbox.decoded("status") if s["online"] and s["functions"]][-1]
    assert after["functions"][0]["expert_calls_window"] == [2, 1] and after["counters"]["evictions_keep_alive"] == 1
    assert after["address"] == node.address and after["heat_window_s"] == 60
    assert inbox.decoded("status")[-1] | {"ts": 0} == tm.offline_status("mqtt-node", "shutdown", 0, node.address)

    late, late_inbox, late_pump = await subscribe(broker.port, tm.status_topic("mqtt-node"))
    try:                                   # the offline record is retained for routers that come later
        await wait_until(lambda: late_inbox.messages, 5, "the retained status")
        assert late_inbox.messages[0][2] and not tm.decode(late_inbox.messages[0][1])["online"]
    finally:
        await unsubscribe(late, late_pump)


@pytest.mark.asyncio
async def test_serving_goes_on_without_a_broker_and_telemetry_catches_up_when_it_comes(tmp_path):
    fn, port = make_function(seed=2, n_experts=2), free_port()
    async with running_node(tmp_path, keep_alive_s=0, node_id="late-node") as (node, stub):
        async with NodeTelemetry(node, f"mqtt://127.0.0.1:{port}", max_events=3, backoff=Backoff(0.02, 0.1)) as tel:
            await stub.deploy(chunks_of(fn))
            for _ in range(3):                       # 3 cold starts: 6 events for a queue of 3
                head, (out,) = frames.decode_reply(await stub.invoke(frames.encode_request(
                    REQUEST, TENANT, 0, X, [fn.call([0, 1], [1, 1])])))
                np.testing.assert_allclose(out, fn.reference(X, [0, 1], [1, 1]), atol=1e-4)
            assert not tel.connected and tel.queued_events == 3 and tel.events_dropped == 3
            late = start_broker(tmp_path / "broker", port=port)
            try:
                await wait_until(lambda: tel.queued_events == 0 and tel.published_events == 3, 10,
                                 "the queued events to be published after reconnecting")
                client, inbox, pump = await subscribe(port, tm.status_topic("late-node"))
                try:
                    await wait_until(lambda: inbox.messages, 5, "the retained status")
                    status = tm.validate_status(tm.decode(inbox.messages[-1][1]))
                    assert status["online"] and status["counters"]["events_dropped"] == 3
                    assert status["counters"]["cold_starts"] == 3
                finally:
                    await unsubscribe(client, pump)
            finally:
                late.stop()


def test_last_will_marks_a_killed_node_offline_and_router_status_shows_it(tmp_path, broker, capsys):
    doomed = start_node(tmp_path / "a", extra_args=["--node-id", "doomed-node", "--mqtt", broker.url])
    alive = start_node(tmp_path / "b", extra_args=["--node-id", "alive-node", "--mqtt", broker.url])
    try:
        with TelemetryCollector(broker.url) as tc:
            assert tc.wait_for(lambda c: all(c.nodes().get(n, {}).get("online") for n in ("doomed-node", "alive-node")),
                               10), tc.nodes()
            doomed.kill()                            # SIGKILL: no goodbye, the broker sends the Last Will
            assert tc.wait_for(lambda c: not c.nodes()["doomed-node"]["online"], 10), tc.nodes()
            will = tc.nodes()["doomed-node"]["status"]
            assert will == tm.offline_status("doomed-node", "connection_lost", None, doomed.address)

        assert router_cli.main(["status", "--mqtt", broker.url, "--mqtt-wait-s", "3"]) == 0
        rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if "-node" in line}
        assert rows["doomed-node"][1:3] == [doomed.address, "offline"]
        assert rows["alive-node"][1:3] == [alive.address, "mqtt"]

        assert router_cli.main(["status", "--nodes", alive.address, "--mqtt", broker.url, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        by_id = {n["node_id"]: n for n in report["nodes"]}
        assert by_id["alive-node"]["source"] == "grpc" and by_id["alive-node"]["mqtt"]["online"]
        assert by_id["doomed-node"]["source"] == "mqtt" and not by_id["doomed-node"]["healthy"]
        assert report["mqtt"]["subscribed"] and report["mqtt"]["error"] is None
    finally:
        alive.stop()
        doomed.kill()
    with TelemetryCollector(broker.url) as tc:       # a clean stop replaces the retained status too
        assert tc.wait_for(lambda c: c.nodes().get("alive-node", {}).get("status", {}).get("reason") == "shutdown", 5)


@pytest.mark.parametrize("url, expected", [
    ("mqtt://127.0.0.1:1884", tm.BrokerAddress("127.0.0.1", 1884)),
    ("broker.local", tm.BrokerAddress("broker.local", 1883)),
    ("mqtts://u:p%40ss@h", tm.BrokerAddress("h", 8883, True, "u", "p@ss")),
])
def test_broker_urls(url, expected):
    assert tm.parse_broker_url(url) == expected
    assert "p@ss" not in str(tm.parse_broker_url(url))


@pytest.mark.parametrize("url", ["http://h:1", "mqtt://h:99999", "mqtt://", "mqtt://h/path"])
def test_bad_broker_url_is_a_config_error_at_startup(tmp_path, url):
    with pytest.raises(ConfigError, match="MQTT URL"):
        default_extensions(config(tmp_path, mqtt_url=url))


def test_schema_rejects_tenant_data():
    event = {"schema": tm.EVENT_SCHEMA, "node_id": "n", "ts": 1.0, "event": "evict", "function_id": "f", "layer": 0,
             "expert_ids": [1], "size_bytes": 1, "resident_bytes": 2, "reason": "memory", "idle_s": 0.5}
    assert tm.validate_event(dict(event)) == event
    with pytest.raises(ValueError, match="forbidden"):
        tm.validate_event(event | {"tenant_id": "t"})
    with pytest.raises(ValueError, match="reason"):
        tm.validate_event(event | {"reason": "bored"})


def test_status_of_a_node_before_precisions_is_still_valid_and_reads_as_fp32():
    """``precision`` and ``block_size`` are optional in status/1: older nodes send neither (and mean fp32)."""
    from faasmoe.router.observe.status import _function
    fn = {"function_id": "ab" * 32, "layer": 0, "expert_ids": [1, 2], "size_bytes": 10, "loaded": True, "idle_s": 1.0,
          "resident_bytes": 12, "invocations": 3, "in_flight": 0, "expert_calls_window": [1, 0]}
    status = {"schema": tm.STATUS_SCHEMA, "node_id": "n", "online": True, "ts": 1.0, "address": "h:1", "version": "0",
              "profile": "", "uptime_s": 1.0, "memory_budget_bytes": 1, "capacity_bytes": 1, "deployed_bytes": 1,
              "loaded_bytes": 1, "disk_budget_bytes": 1, "disk_used_bytes": 1, "rss_bytes": 1, "threads": 1,
              "keep_alive_s": 1.0, "queue_depth": 0, "heat_window_s": 60.0, "functions": [fn],
              "counters": {k: 0 for k in tm.COUNTER_KEYS}}
    assert tm.validate_status(dict(status)) == status
    assert _function(fn, {})["precision"] == "fp32"
    assert _function(fn | {"precision": "int4", "block_size": 32}, {})["precision"] == "int4-b32"
    with pytest.raises(ValueError, match="block_size"):
        tm.validate_status(status | {"functions": [fn | {"precision": "int4", "block_size": "32"}]})
