"""Cluster identity end to end: init-cluster, a real HTTPS enrolment endpoint, nodes that join with a token and
serve mutual-TLS gRPC, routers that verify them, and every way in that must stay shut."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from faasmoe.node.identity import enroll
from faasmoe.proto import credentials as cr
from faasmoe.proto import faasmoe_pb2 as pb
from faasmoe.proto import frames
from faasmoe.proto.errors import ConfigError, Forbidden
from faasmoe.router.control.cluster import Cluster
from faasmoe.router.control.enroll_server import EnrollThread
from faasmoe.router.control.client import NodeClient
from faasmoe.router.mesh.channel import make_channel
from faasmoe.router.control.probe import probe
from node_fixtures import REPO, NodeProcess, Stub, chunks_of, frame, make_function, node_env


@pytest.fixture()
def cluster(tmp_path):
    """A cluster with its enrolment endpoint on 127.0.0.1 (port 0): yields (cluster, join token text)."""
    c = Cluster.init(tmp_path / "cluster", "127.0.0.1:1")
    with EnrollThread(c) as server:
        c.set_address(f"127.0.0.1:{server.port}")
        yield c, c.create_token(3600).encode()


def node_args(tmp_path, name: str, *extra: str) -> list[str]:
    return ["--port", "0", "--store-dir", str(tmp_path / name), "--no-mdns", "--threads", "1", "--node-id", name,
            *extra]


def tls_of(material_dir: Path) -> cr.TlsMaterial:
    d = material_dir / "identity"
    return cr.TlsMaterial((d / "ca.crt").read_bytes(), (d / "node.key").read_bytes(), (d / "node.crt").read_bytes())


def test_enrolled_node_serves_mutual_tls_only(cluster, tmp_path):
    c, token = cluster
    fn = make_function(seed=1)
    with NodeProcess(*node_args(tmp_path, "n1", "--join", token), env=node_env()) as node:
        assert node.ready["tls"] and node.ready["cert"]
        assert "n1" in c.nodes()
        router = NodeClient(node.address, tls=c.router_tls)
        reply = Stub(router.channel).deploy(chunks_of(fn), timeout=30)
        assert reply.deployed_bytes > 0
        hidden = np.random.default_rng(0).standard_normal((3, 64), dtype=np.float32)
        head, (out,) = frames.decode_reply(Stub(router.channel).invoke(frame(hidden, [fn.call([0, 1, 2], [2, 1])]),
                                                                        timeout=30))
        np.testing.assert_allclose(out, fn.reference(hidden, [0, 1, 2], [2, 1]), atol=1e-4)

        # plaintext, and a client of another cluster: every call fails
        foreign = Cluster.init(tmp_path / "foreign", "127.0.0.1:1")
        for channel in (grpc.insecure_channel(node.address), make_channel(node.address, tls=foreign.router_tls)):
            for call in (lambda s: s.status(pb.StatusRequest(), timeout=5),
                         lambda s: s.deploy(chunks_of(fn), timeout=5),
                         lambda s: s.invoke(frame(hidden, [fn.call([0], [1, 0])]), timeout=5)):
                with pytest.raises(grpc.RpcError) as info:
                    call(Stub(channel))
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            channel.close()

        # a node identity of this cluster may ask for status, never deploy, undeploy or invoke
        peer = make_channel(node.address, tls=tls_of(tmp_path / "n1"))
        assert Stub(peer).status(pb.StatusRequest(), timeout=5).node_id == "n1"
        for call in (lambda s: s.deploy(chunks_of(fn), timeout=5),
                     lambda s: s.undeploy(pb.UndeployRequest(function_id=fn.function_id), timeout=5),
                     lambda s: s.invoke(frame(hidden, [fn.call([0], [1, 0])]), timeout=5)):
            with pytest.raises(grpc.RpcError) as info:
                call(Stub(peer))
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value.details()
            assert "router" in info.value.details()
        peer.close()

        # the router's probe sees the advertised certificate, and refuses another fingerprint
        assert probe(node.address, c.router_tls, node.ready["cert"], 5).node_id == "n1"
        with pytest.raises(Forbidden, match="not the advertised"):
            probe(node.address, c.router_tls, "0" * 64, 5)
        with pytest.raises(Forbidden):
            probe(node.address, foreign.router_tls, None, 5)
        router.close()

    # restarted without --join: the identity in the store is kept, and it is mutual TLS again
    with NodeProcess(*node_args(tmp_path, "n1"), env=node_env()) as node:
        assert node.ready["tls"] and node.ready["cert"]
        with pytest.raises(grpc.RpcError):
            Stub(grpc.insecure_channel(node.address)).status(pb.StatusRequest(), timeout=5)


def test_tokens_expire_and_are_revoked(cluster, tmp_path):
    c, token = cluster
    expired = c.create_token(-1.0)          # expired a second ago
    with pytest.raises(ConfigError, match="expired"):
        enroll(expired.encode(), "late", tmp_path / "late")
    revoked = c.create_token(3600)
    c.revoke(revoked.token_id)
    with pytest.raises(ConfigError, match="revoked"):
        enroll(revoked.encode(), "gone", tmp_path / "gone")
    bad_secret = cr.JoinToken.decode(token)
    forged = cr.JoinToken(bad_secret.ca_sha256, bad_secret.address, bad_secret.token_id, "x" * 43, bad_secret.expires)
    with pytest.raises(ConfigError, match="unknown join token"):
        enroll(forged.encode(), "forged", tmp_path / "forged")
    assert set(c.nodes()) == set()

    # a token that pins another CA: the node refuses before it sends anything
    other = cr.JoinToken("ab" * 32, bad_secret.address, bad_secret.token_id, bad_secret.secret, bad_secret.expires)
    with pytest.raises(ConfigError, match="not the one the join token pins"):
        enroll(other.encode(), "pinned", tmp_path / "pinned")
    assert set(c.nodes()) == set() and not (tmp_path / "pinned" / "identity").exists()

    # renewal with the secret from enrolment; revoking the node's token stops its renewals
    from faasmoe.node.identity import renew
    ident = enroll(token, "renewer", tmp_path / "renewer")
    fresh = renew(ident, tmp_path / "renewer")
    assert fresh.fingerprint != ident.fingerprint and cr.cert_role(cr.load_cert(fresh.cert_pem)) == ("node", "renewer")
    c.revoke(cr.JoinToken.decode(token).token_id)
    with pytest.raises(ConfigError, match="revoked"):
        renew(fresh, tmp_path / "renewer")


def test_plaintext_needs_loopback_or_insecure(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "faasmoe.node", *node_args(tmp_path, "open", "--host", "0.0.0.0")],
                          capture_output=True, text=True, env=node_env(), cwd=REPO, timeout=60)
    assert proc.returncode == 2 and "refusing plaintext gRPC on 0.0.0.0" in proc.stderr, proc.stderr
    assert [line for line in proc.stderr.splitlines() if "error" in line.lower()] == proc.stderr.splitlines()[-1:]
    with NodeProcess(*node_args(tmp_path, "dev"), env=node_env()) as node:
        assert node.ready["tls"] is False
        assert any("plaintext gRPC on 127.0.0.1" in line for line in node.stderr_lines)


def test_cli_init_cluster_and_tokens(tmp_path):
    def router(*args):
        return subprocess.run([sys.executable, "-m", "faasmoe.router", *args], capture_output=True, text=True,
                              cwd=REPO, timeout=60)
    out = router("init-cluster", "--dir", str(tmp_path / "c"), "--enroll-address", "10.0.0.1:7443")
    assert out.returncode == 0, out.stderr
    token = next(line for line in out.stdout.splitlines() if line.startswith(cr.TOKEN_PREFIX))
    decoded = cr.JoinToken.decode(token)
    assert decoded.address == "10.0.0.1:7443"
    assert decoded.ca_sha256 == cr.fingerprint(cr.load_cert((tmp_path / "c" / "ca.crt").read_bytes()))
    assert (tmp_path / "c" / "ca.key").stat().st_mode & 0o077 == 0
    assert router("init-cluster", "--dir", str(tmp_path / "c"), "--enroll-address", "10.0.0.1:7443").returncode == 2
    assert router("tokens", "revoke", decoded.token_id, "--dir", str(tmp_path / "c")).returncode == 0
    listing = json.loads(router("tokens", "list", "--json", "--dir", str(tmp_path / "c")).stdout)
    assert listing["tokens"][decoded.token_id]["revoked"] is True
    assert "secret" not in json.dumps(listing) and decoded.secret not in json.dumps(listing)
    missing = router("tokens", "list", "--dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no cluster here" in missing.stderr
    # --if-missing keeps the CA and issues a new token, written to --token-file (0600) for --join @FILE
    ca_before = (tmp_path / "c" / "ca.crt").read_bytes()
    again = router("init-cluster", "--dir", str(tmp_path / "c"), "--enroll-address", "10.0.0.1:7443", "--if-missing",
                   "--token-file", str(tmp_path / "join" / "token"))
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "c" / "ca.crt").read_bytes() == ca_before
    written = (tmp_path / "join" / "token").read_text().strip()
    assert written in again.stdout and cr.JoinToken.decode(written).token_id != decoded.token_id
    assert (tmp_path / "join" / "token").stat().st_mode & 0o077 == 0


def test_damaged_tokens_are_one_line_errors(tmp_path):
    (tmp_path / "empty").write_text("")
    for text in ("hello", "fmj1.!!!!", "fmj1." + "e30", f"@{tmp_path / 'nothing-here'}", f"@{tmp_path / 'empty'}"):
        proc = subprocess.run([sys.executable, "-m", "faasmoe.node", *node_args(tmp_path, "x", "--join", text)],
                              capture_output=True, text=True, env=node_env(), cwd=REPO, timeout=60)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2 and len(errors) == 1 and "token" in errors[0], proc.stderr



class CountingServer:
    """A real gRPC server that says SERVING and counts every call it gets (plaintext, or TLS with ``tls``)."""

    def __init__(self, tls: cr.TlsMaterial | None = None):
        from concurrent import futures

        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        self.calls = 0
        outer = self

        class Count(grpc.ServerInterceptor):
            def intercept_service(self, continuation, details):
                outer.calls += 1
                return continuation(details)

        self.server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[Count()])
        servicer = health.HealthServicer()
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, self.server)
        if tls is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            creds = grpc.ssl_server_credentials([(tls.key_pem, tls.cert_pem)], tls.ca_pem, True)
            self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        self.server.start()


def advertise(zc, instance: str, port: int, txt: dict):
    from zeroconf import ServiceInfo

    from faasmoe.proto.discovery import SERVICE_TYPE
    info = ServiceInfo(SERVICE_TYPE, f"{instance}.{SERVICE_TYPE}", addresses=[bytes([127, 0, 0, 1])], port=port,
                       properties=txt, server=f"{instance}.local.")
    zc.register_service(info)
    return info


def goodbye(zc, name: str) -> None:
    """A forged mDNS goodbye (PTR with TTL 0) for someone else's service name."""
    from zeroconf import DNSOutgoing, DNSPointer, const

    from faasmoe.proto.discovery import SERVICE_TYPE
    out = DNSOutgoing(const._FLAGS_QR_RESPONSE | const._FLAGS_AA)
    out.add_answer_at_time(DNSPointer(SERVICE_TYPE, const._TYPE_PTR, const._CLASS_IN, 0, name), 0)
    zc.send(out)


def test_spoofed_adverts_get_no_calls_and_spoofed_goodbyes_remove_nothing(cluster, tmp_path):
    import uuid

    from zeroconf import Zeroconf

    from faasmoe.router.control.directory import NodeDirectory
    c, token = cluster
    real_id = f"real-{uuid.uuid4().hex[:8]}"
    foreign = Cluster.init(tmp_path / "foreign", "127.0.0.1:1")
    with EnrollThread(foreign) as fserver:
        foreign.set_address(f"127.0.0.1:{fserver.port}")
        foreign_ident = enroll(foreign.create_token(60).encode(), "spoof-2", tmp_path / "spoof-2")
    plain = CountingServer()
    foreign_tls = CountingServer(cr.TlsMaterial(foreign_ident.ca_pem, foreign_ident.key_pem, foreign_ident.cert_pem))
    args = ["--port", "0", "--store-dir", str(tmp_path / "real"), "--threads", "1", "--node-id", real_id,
            "--mdns-interface", "127.0.0.1", "--join", token]
    zc = Zeroconf(interfaces=["127.0.0.1"])
    try:
        with NodeProcess(*args, env=node_env()) as node, \
                NodeDirectory(mdns_interfaces=["127.0.0.1"], tls=c.router_tls, health_interval_s=0.5) as directory:
            base = dict(memory_budget_bytes="1073741824", free_bytes="1073741824", threads="1", profile="x",
                        version="0.1.0", max_message_bytes="67108864")
            # the real node's id and fingerprint, at a plaintext server; a foreign cluster's node, its own fingerprint
            advertise(zc, f"spoof1-{real_id}", plain.port, base | {"node_id": real_id, "port": str(plain.port),
                                                                      "cert": node.ready["cert"]})
            advertise(zc, f"spoof2-{real_id}", foreign_tls.port, base | {"node_id": f"spoof2-{real_id}",
                                                                           "port": str(foreign_tls.port),
                                                                           "cert": foreign_ident.fingerprint})
            spoofed = {f"127.0.0.1:{plain.port}", f"127.0.0.1:{foreign_tls.port}"}

            def settled(nodes):
                real = [n for n in nodes if n.address == node.address]
                fails = {n.address: n.consecutive_failures for n in nodes if n.address in spoofed}
                return (len(real) == 1 and real[0].up and real[0].fingerprint == node.ready["cert"]
                        and set(fails) == spoofed and min(fails.values()) >= 2)
            assert directory.wait_for(settled, 20.0), directory.snapshot()
            assert [n.address for n in directory.up_nodes()] == [node.address]
            assert (plain.calls, foreign_tls.calls) == (0, 0)
            (real,) = [n for n in directory.snapshot() if n.address == node.address]
            assert real.doubted.startswith("advertised again at")       # the spoof made us look, and it answered

            goodbye(zc, f"{real_id}._faasmoe._tcp.local.")
            assert directory.wait_for(lambda nodes: any(n.address == node.address and n.doubted == "said goodbye"
                                                        for n in nodes), 10.0)
            seen_s = time.monotonic()
            assert directory.wait_for(lambda nodes: any(
                n.address == node.address and n.up and n.last_ok_s_ago is not None
                and n.last_ok_s_ago < time.monotonic() - seen_s for n in nodes), 5.0)
            assert [n.address for n in directory.up_nodes()] == [node.address]
            assert (plain.calls, foreign_tls.calls) == (0, 0)

            node.stop()      # a real death after the goodbye: now it goes
            assert directory.wait_for(lambda nodes: all(n.address != node.address for n in nodes), 10.0)
    finally:
        zc.close()
        plain.server.stop(0)
        foreign_tls.server.stop(0)


def test_node_ids_cannot_be_taken_over_and_a_lost_renewal_reply_is_survivable(tmp_path):
    from faasmoe.proto.errors import Unauthorized

    c = Cluster.init(tmp_path / "cluster", "127.0.0.1:1")
    token = c.create_token(600)

    def csr(name: str) -> bytes:
        return cr.csr_pem(cr.new_csr(cr.new_key(), "node", name))

    _, first = c.enroll(token.token_id, token.secret, "edge-1", csr("edge-1"))
    with pytest.raises(Unauthorized, match="enrolled already"):
        c.enroll(token.token_id, token.secret, "edge-1", csr("edge-1"))      # another holder of the token
    _, second = c.renew("edge-1", first, csr("edge-1"))
    _, third = c.renew("edge-1", first, csr("edge-1"))       # the reply with `second` was lost: still renews
    with pytest.raises(Unauthorized):
        c.renew("edge-1", "made-up", csr("edge-1"))
    c.renew("edge-1", third, csr("edge-1"))                  # the newest works; now `first` is too old
    with pytest.raises(Unauthorized):
        c.renew("edge-1", first, csr("edge-1"))
    c.forget_node("edge-1")
    with pytest.raises(Unauthorized):
        c.renew("edge-1", third, csr("edge-1"))
    c.enroll(token.token_id, token.secret, "edge-1", csr("edge-1"))         # the id is free again


def test_a_node_without_enrolment_gets_no_deploy(cluster, tmp_path):
    """A router with the cluster's identity places on an enrolled node and a plaintext (unenrolled) one: every
    function lands on the enrolled node, the plaintext node receives nothing, and a router certificate cannot
    pose as a node (its name is router.faasmoe, the router dials node.faasmoe)."""
    from faasmoe.router.control.session import RouterSession
    from faasmoe.router.store.split import split_checkpoint
    from model_factory import make_checkpoint

    c, token = cluster
    split_checkpoint(make_checkpoint(tmp_path / "model", num_layers=2), tmp_path / "store", group_size=4,
                     progress=False)
    with NodeProcess(*node_args(tmp_path, "enrolled", "--join", token), env=node_env()) as enrolled, \
            NodeProcess(*node_args(tmp_path, "open"), env=node_env()) as open_node:
        session = RouterSession(tmp_path / "store", tls=c.router_tls, status_timeout_s=2.0)
        try:
            session.place_and_deploy([enrolled.address, open_node.address])
            assert {n for nodes in session.placement.values() for n in nodes} == {enrolled.address}
            assert open_node.address in session.unreachable
        finally:
            session.close()
        plain = NodeClient(open_node.address)
        assert len(plain.status().functions) == 0                 # nothing was deployed there
        plain.close()
    from faasmoe.proto.errors import MeshError
    router_as_node = CountingServer(c.router_tls)
    try:
        with pytest.raises(MeshError):
            NodeClient(f"127.0.0.1:{router_as_node.port}", tls=c.router_tls).status(timeout_s=2.0)
        assert router_as_node.calls == 0
    finally:
        router_as_node.server.stop(0)
