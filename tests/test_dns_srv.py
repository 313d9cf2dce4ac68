"""DNS SRV discovery (``--discover dns-srv:NAME``) against a real dnsmasq on loopback: the records Kubernetes
publishes for a headless service's named port, served by a real DNS server to real gRPC servers and real
enrolled nodes. Nodes appear, leave the answer, and move to another port; discovery stays a hint (mutual TLS
decides who counts)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading

import pytest

from dnsmasq import DnsServer
from faasmoe.proto.errors import ConfigError
from faasmoe.router.control.directory import NodeDirectory
from faasmoe.router.control.discovery import NodeRecord
from faasmoe.router.control.dns_srv import SrvBrowser, parse_spec
from node_fixtures import NodeProcess, node_env
from polling import wait_for
from test_directory import health_server

NAME = "_grpc._tcp.faasmoe-nodes.faasmoe.svc.cluster.local"
INTERVAL_S = 0.2
TIMEOUT_S = 15.0


@pytest.fixture
def dns(tmp_path):
    server = DnsServer(tmp_path)
    yield server
    server.stop()


# ------------------------------------------------------------------------------------------------ the spec


@pytest.mark.parametrize("text, name, server, port", [
    (f"dns-srv:{NAME}", NAME + ".", None, 53),
    (f"{NAME}.", NAME + ".", None, 53),
    (f"dns-srv:{NAME}@127.0.0.1:5353", NAME + ".", "127.0.0.1", 5353),
    (f"dns-srv:{NAME}@10.96.0.10", NAME + ".", "10.96.0.10", 53),
    (f"dns-srv:{NAME}@[::1]:53", NAME + ".", "::1", 53),
])
def test_spec_parses(text, name, server, port):
    spec = parse_spec(text)
    assert (spec.name, spec.nameserver, spec.nameserver_port) == (name, server, port)
    assert parse_spec(str(spec)) == spec


@pytest.mark.parametrize("text, says", [
    ("dns-srv:faasmoe-nodes.faasmoe.svc.cluster.local", "_PORTNAME._tcp"),
    ("dns-srv:_grpc._xyz.faasmoe-nodes", "_PORTNAME._tcp"),
    ("dns-srv:_grpc._tcp", "_PORTNAME._tcp"),
    (f"dns-srv:{NAME}@dns.example", "must be an IP address"),
    (f"dns-srv:{NAME}@127.0.0.1:99999", "not a port number"),
])
def test_bad_spec_is_one_clear_error(text, says):
    with pytest.raises(ConfigError, match=says):
        parse_spec(text)


# ----------------------------------------------------------------------------------------- the browser


class Seen:
    """What the browser reported last for each key, waited on with a condition (no sleeps)."""

    def __init__(self):
        self.records: dict[str, NodeRecord] = {}
        self.log: list[tuple[str, NodeRecord | None]] = []
        self.cond = threading.Condition()

    def __call__(self, key: str, record: NodeRecord | None) -> None:
        with self.cond:
            self.log.append((key, record))
            if record is None:
                self.records.pop(key, None)
            else:
                self.records[key] = record
            self.cond.notify_all()

    def addresses(self) -> dict[str, str]:
        with self.cond:
            return {key: record.address for key, record in self.records.items()}


def test_browser_sees_nodes_appear_move_and_leave(dns):
    hosts = {"node-a.test": "127.0.0.1", "node-b.test": "127.0.0.2"}
    dns.serve({NAME: [("node-a.test", 5001)]}, hosts)
    seen = Seen()
    with SrvBrowser(dns.spec(NAME), seen, interval_s=INTERVAL_S):
        wait_for(lambda: seen.addresses() == {"node-a.test": "127.0.0.1:5001"}, TIMEOUT_S, "node a")
        record = seen.records["node-a.test"]
        assert (record.source, record.cert, record.node_id) == ("dns-srv", "", "node-a.test")

        dns.serve({NAME: [("node-a.test", 5001), ("node-b.test", 5002)]}, hosts)          # appears
        wait_for(lambda: seen.addresses() == {"node-a.test": "127.0.0.1:5001", "node-b.test": "127.0.0.2:5002"},
                 TIMEOUT_S, "node b to appear")

        dns.serve({NAME: [("node-a.test", 6001), ("node-b.test", 5002)]}, hosts)          # a moves
        wait_for(lambda: seen.addresses().get("node-a.test") == "127.0.0.1:6001", TIMEOUT_S, "node a to move")
        assert ("node-a.test", None) not in seen.log, "a port change is a move, not a goodbye"

        dns.serve({NAME: [("node-b.test", 5002)]}, hosts)                                  # a leaves
        wait_for(lambda: seen.addresses() == {"node-b.test": "127.0.0.2:5002"}, TIMEOUT_S, "node a to leave")

        dns.serve({}, hosts)                                     # no endpoint at all: NXDOMAIN, everyone leaves
        wait_for(lambda: seen.addresses() == {}, TIMEOUT_S, "the last node to leave")


def test_a_dns_outage_keeps_what_was_known(dns, tmp_path):
    dns.serve({NAME: [("node-a.test", 5001)]}, {"node-a.test": "127.0.0.1"})
    seen = Seen()
    with SrvBrowser(dns.spec(NAME), seen, interval_s=INTERVAL_S, timeout_s=0.3) as browser:
        wait_for(lambda: seen.addresses() == {"node-a.test": "127.0.0.1:5001"}, TIMEOUT_S, "node a")
        dns.stop()
        failed = threading.Event()

        class Watch(logging.Handler):
            def emit(self, rec):
                if "lookup of" in rec.getMessage() and "failed" in rec.getMessage():
                    failed.set()

        watch = Watch()
        logging.getLogger("faasmoe.router.control.dns_srv").addHandler(watch)
        try:
            browser.refresh()
            assert failed.wait(TIMEOUT_S), "the lookup never failed with the server stopped"
        finally:
            logging.getLogger("faasmoe.router.control.dns_srv").removeHandler(watch)
        assert seen.addresses() == {"node-a.test": "127.0.0.1:5001"}, "a failed lookup must not drop nodes"
        assert [k for k, r in seen.log if r is None] == []


def test_several_ports_on_one_host(dns):
    dns.serve({NAME: [("node-a.test", 5001), ("node-a.test", 5002)]}, {"node-a.test": "127.0.0.1"})
    seen = Seen()
    with SrvBrowser(dns.spec(NAME), seen, interval_s=INTERVAL_S):
        wait_for(lambda: sorted(seen.addresses().values()) == ["127.0.0.1:5001", "127.0.0.1:5002"], TIMEOUT_S,
                 "both ports")


# --------------------------------------------------------------------------------------- the directory


def up_addresses(directory: NodeDirectory) -> set[str]:
    return {state.address for state in directory.up_nodes()}


def test_directory_follows_srv_records_to_live_servers(dns):
    """Plaintext health servers behind SRV records: up when listed and answering; a node whose port changes is
    followed to the new port and its old entry removed once that fails; a node that leaves the answer and
    stops is removed."""
    a, port_a = health_server()
    b, port_b = health_server()
    a2, port_a2 = health_server()
    hosts = {"node-a.test": "127.0.0.1", "node-b.test": "127.0.0.1"}
    try:
        dns.serve({NAME: [("node-a.test", port_a)]}, hosts)
        with NodeDirectory(dns_srv=dns.spec(NAME), dns_srv_interval_s=INTERVAL_S, health_interval_s=0.2,
                           health_timeout_s=0.5) as directory:
            addr = lambda port: f"127.0.0.1:{port}"   # noqa: E731
            assert directory.wait_for(lambda nodes: {n.address for n in nodes if n.up} == {addr(port_a)}, TIMEOUT_S)
            (state,) = directory.up_nodes()
            assert state.record.source == "dns-srv" and not state.static

            dns.serve({NAME: [("node-a.test", port_a), ("node-b.test", port_b)]}, hosts)
            assert directory.wait_for(
                lambda nodes: {n.address for n in nodes if n.up} == {addr(port_a), addr(port_b)}, TIMEOUT_S)

            dns.serve({NAME: [("node-a.test", port_a2), ("node-b.test", port_b)]}, hosts)   # a moves...
            a.stop(0)                                                                          # ...off its old port
            assert directory.wait_for(lambda nodes: {n.address for n in nodes} == {addr(port_a2), addr(port_b)}
                                      and all(n.up for n in nodes), TIMEOUT_S), directory.snapshot()

            dns.serve({NAME: [("node-a.test", port_a2)]}, hosts)                               # b leaves and stops
            b.stop(0)
            assert directory.wait_for(lambda nodes: {n.address for n in nodes} == {addr(port_a2)}, TIMEOUT_S), \
                directory.snapshot()
    finally:
        for server in (a, b, a2):
            server.stop(0)


def test_srv_nodes_still_need_the_cluster_certificate(dns, tmp_path):
    """With cluster credentials an SRV-listed address counts only once a node certificate of the cluster answers
    there: an enrolled node comes up under its certificate's id; a plaintext server listed next to it never does."""
    from faasmoe.router.control.cluster import Cluster
    from faasmoe.router.control.enroll_server import EnrollThread

    cluster = Cluster.init(tmp_path / "cluster", "127.0.0.1:1")
    impostor, impostor_port = health_server()
    try:
        with EnrollThread(cluster) as enroll:
            cluster.set_address(f"127.0.0.1:{enroll.port}")
            token = cluster.create_token(600).encode()
            with NodeProcess("--port", "0", "--store-dir", str(tmp_path / "store"), "--no-mdns", "--threads", "1",
                             "--memory-budget-mb", "64", "--node-id", "srv-node", "--join", token,
                             env=node_env()) as node:
                assert node.ready["tls"]
                port = int(node.address.rsplit(":", 1)[1])
                dns.serve({NAME: [("node-0.test", port), ("impostor.test", impostor_port)]},
                          {"node-0.test": "127.0.0.1", "impostor.test": "127.0.0.1"})
                with NodeDirectory(dns_srv=dns.spec(NAME), dns_srv_interval_s=INTERVAL_S, health_interval_s=0.2,
                                   health_timeout_s=1.0, tls=cluster.router_tls) as directory:
                    assert directory.wait_for(lambda nodes: any(n.up for n in nodes), TIMEOUT_S)
                    assert directory.wait_for(lambda nodes: len(nodes) == 2 and all(
                        n.consecutive_failures >= 2 for n in nodes if n.address.endswith(f":{impostor_port}")),
                        TIMEOUT_S), directory.snapshot()
                    (up,) = directory.up_nodes()
                    assert up.address == f"127.0.0.1:{port}" and up.node_id == "srv-node" and up.fingerprint
    finally:
        impostor.stop(0)


# ------------------------------------------------------------------------------------------------- the CLI


def router(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "faasmoe.router.cli.main", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_status_discovers_over_dns_srv(dns, tmp_path):
    with NodeProcess("--port", "0", "--store-dir", str(tmp_path / "store"), "--no-mdns", "--threads", "1",
                     "--memory-budget-mb", "64", "--node-id", "srv-status", env=node_env()) as node:
        port = int(node.address.rsplit(":", 1)[1])
        dns.serve({NAME: [("node-0.test", port)]}, {"node-0.test": "127.0.0.1"})
        result = router("status", "--discover", dns.spec(NAME), "--discover-wait-s", "2", "--json")
        assert result.returncode == 0, result.stderr
        (found,) = json.loads(result.stdout)["nodes"]
        assert (found["address"], found["healthy"], found["node_id"]) == (node.address, True, "srv-status")


@pytest.mark.parametrize("argv, says", [
    (["status", "--discover", "dns-srv:nodes.example"], "_PORTNAME._tcp"),
    (["status", "--discover", "consul"], "dns-srv:SRV-NAME"),
    (["status", "--discover", f"dns-srv:{NAME}", "--dns-srv-interval-s", "0"], "must be > 0"),
])
def test_bad_discover_flag_is_one_line(argv, says):
    result = router(*argv)
    assert result.returncode == 2, result
    assert result.stderr.startswith("error: ") and says in result.stderr and result.stderr.count("\n") == 1, \
        result.stderr


def test_discover_values_and_environment(monkeypatch):
    from faasmoe.router.cli import main as router_cli
    parse = lambda *argv: router_cli.build_parser().parse_args(["status", *argv])   # noqa: E731
    assert parse().discover is None
    assert parse("--discover").discover == "mdns"
    assert parse("--discover", "--json").discover == "mdns"
    assert parse("--discover", f"dns-srv:{NAME}").discover == f"dns-srv:{NAME}."
    for text, mode in (("1", "mdns"), ("true", "mdns"), ("0", None), (f"dns-srv:{NAME}", f"dns-srv:{NAME}.")):
        monkeypatch.setenv("FAASMOE_ROUTER_DISCOVER", text)
        parser = router_cli.build_parser()
        router_cli.apply_env_defaults(parser)
        assert parser.parse_args(["status"]).discover == mode, text
