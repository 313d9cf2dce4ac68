"""NodeDirectory against real gRPC health servers on 127.0.0.1 and real mDNS on loopback (no mocks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from faasmoe.proto.errors import ConfigError
from faasmoe.router.control.directory import DirectoryEvent, NodeDirectory

KILL_TO_DOWN_LIMIT_S = 5.0


def health_server(port: int = 0) -> tuple[grpc.Server, int]:
    """A tiny real gRPC server whose health service says SERVING."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if bound == 0:
        raise RuntimeError(f"could not bind 127.0.0.1:{port}")
    server.start()
    return server, bound


def node_is(address: str, up: bool):
    return lambda nodes: any(n.address == address and n.up is up for n in nodes)


def test_static_node_goes_down_and_comes_back():
    server, port = health_server()
    address = f"127.0.0.1:{port}"
    events: list[DirectoryEvent] = []
    with NodeDirectory(static=[address], health_interval_s=1.0, health_timeout_s=1.0) as directory:
        directory.subscribe(events.append)
        assert directory.wait_for(node_is(address, True), timeout_s=5.0)
        (state,) = directory.up_nodes()
        assert (state.node_id, state.record, state.static) == (address, None, True)
        assert state.last_ok_s_ago is not None and state.consecutive_failures == 0

        stopped_s = time.monotonic()
        server.stop(0)
        assert directory.wait_for(node_is(address, False), timeout_s=KILL_TO_DOWN_LIMIT_S)
        print(f"static server stopped -> down: {time.monotonic() - stopped_s:.2f} s")
        assert directory.up_nodes() == []

        server, _ = health_server(port)
        restarted_s = time.monotonic()
        assert directory.wait_for(node_is(address, True), timeout_s=5.0)
        print(f"restarted -> up: {time.monotonic() - restarted_s:.2f} s")
        assert directory.wait_for(lambda nodes: [e.kind for e in events][-2:] == ["down", "up"], 2.0)
    server.stop(0)


def test_mark_down_is_immediate_and_health_brings_it_back():
    server, port = health_server()
    address = f"127.0.0.1:{port}"
    seen = threading.Condition()
    kinds: list[str] = []

    def on_event(event: DirectoryEvent) -> None:
        with seen:
            kinds.append(event.kind)
            seen.notify_all()

    try:
        with NodeDirectory(static=[address], health_interval_s=30.0) as directory:
            directory.subscribe(on_event)
            assert directory.wait_for(node_is(address, True), timeout_s=5.0)
            directory.mark_down(address)
            assert directory.up_nodes() == []  # at once, not at the next interval
            # mark_down wakes the checker: the node answers, so it is up again long before 30 s
            assert directory.wait_for(node_is(address, True), timeout_s=5.0)
            with seen:
                assert seen.wait_for(lambda: kinds[-2:] == ["down", "up"], 2.0)
    finally:
        server.stop(0)


def test_bad_static_address_is_a_config_error():
    with pytest.raises(ConfigError, match="host:port"):
        NodeDirectory(static=["no-port-here"])


NODE_SCRIPT = r"""
import asyncio, signal, sys
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from faasmoe.node.mdns import NodeAdvertiser

async def main(node_id):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    txt = lambda: dict(memory_budget_bytes="1073741824", free_bytes="1073741824", threads="1",
                       profile="test", version="0.1.0")
    advertiser = NodeAdvertiser(node_id, port, ["127.0.0.1"], txt)
    await advertiser.start()
    print(port, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await advertiser.stop()  # goodbye
    server.stop(0)

asyncio.run(main(sys.argv[1]))
"""


def start_node_process(node_id: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", NODE_SCRIPT, node_id], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"node process failed to start (exit {proc.wait()})")
    return proc, int(line)


def node_id_is(node_id: str, up: bool):
    return lambda nodes: any(n.node_id == node_id and n.up is up for n in nodes)


def test_mdns_node_killed_without_goodbye_goes_down():
    node_id = f"killed-{uuid.uuid4().hex[:8]}"
    with NodeDirectory(mdns_interfaces=["127.0.0.1"]) as directory:
        proc, port = start_node_process(node_id)
        try:
            assert directory.wait_for(node_id_is(node_id, True), timeout_s=10.0)
            (state,) = [n for n in directory.snapshot() if n.node_id == node_id]
            assert state.address == f"127.0.0.1:{port}" and state.record.source == "mdns"
            assert (state.record.memory_budget_bytes, state.record.profile) == (1073741824, "test")

            # a hung node (no TCP reset): the health check times out
            stopped_s = time.monotonic()
            os.kill(proc.pid, signal.SIGSTOP)
            assert directory.wait_for(node_id_is(node_id, False), timeout_s=KILL_TO_DOWN_LIMIT_S)
            print(f"SIGSTOP -> down: {time.monotonic() - stopped_s:.2f} s")
            os.kill(proc.pid, signal.SIGCONT)
            assert directory.wait_for(node_id_is(node_id, True), timeout_s=5.0)

            killed_s = time.monotonic()
            os.kill(proc.pid, signal.SIGKILL)
            assert directory.wait_for(node_id_is(node_id, False), timeout_s=KILL_TO_DOWN_LIMIT_S)
            print(f"kill -9 -> down: {time.monotonic() - killed_s:.3f} s")
            # still listed: mDNS never heard a goodbye, only the health checks know it is dead
            assert [n.record is not None for n in directory.snapshot() if n.node_id == node_id] == [True]
        finally:
            proc.kill()
            proc.wait()


def test_mdns_node_goodbye_removes_it():
    node_id = f"bye-{uuid.uuid4().hex[:8]}"
    with NodeDirectory(mdns_interfaces=["127.0.0.1"]) as directory:
        proc, _ = start_node_process(node_id)
        try:
            assert directory.wait_for(node_id_is(node_id, True), timeout_s=10.0)
            terminated_s = time.monotonic()
            proc.terminate()  # the node unregisters: goodbye
            assert directory.wait_for(lambda nodes: all(n.node_id != node_id for n in nodes), 5.0)
            print(f"goodbye -> removed from directory: {time.monotonic() - terminated_s:.3f} s")
            assert proc.wait(timeout=5.0) == 0
        finally:
            proc.kill()
            proc.wait()


def test_static_address_also_advertised_is_one_node():
    node_id = f"both-{uuid.uuid4().hex[:8]}"
    proc, port = start_node_process(node_id)
    address = f"127.0.0.1:{port}"
    try:
        with NodeDirectory(static=[address], mdns_interfaces=["127.0.0.1"]) as directory:
            # mDNS reveals the static node's id; it stays one entry
            assert directory.wait_for(node_id_is(node_id, True), timeout_s=10.0)
            (state,) = directory.snapshot()
            assert (state.address, state.static, state.record.node_id) == (address, True, node_id)

            proc.terminate()  # goodbye: the static entry stays, known by its address again, and goes down
            assert directory.wait_for(
                lambda nodes: [(n.node_id, n.record, n.up) for n in nodes] == [(address, None, False)], 5.0
            )
    finally:
        proc.kill()
        proc.wait()
