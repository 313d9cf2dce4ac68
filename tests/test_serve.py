"""``faasmoe-router serve`` keeps a store placed while nodes leave and come back, and serves health and
metrics over its HTTP API."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

from faasmoe.proto.ready import ROUTER_READY, parse_ready
from faasmoe.router.control.client import NodeClient
from faasmoe.router.control.local_mesh import start_node
from faasmoe.router.store.manifest import load_manifest
from faasmoe.router.store.split import split_checkpoint
from model_factory import make_checkpoint
from polling import wait_for


def wait_until(predicate, timeout_s: float) -> bool:
    try:
        return bool(wait_for(predicate, timeout_s, "a condition", interval_s=0.05))
    except AssertionError:
        return False


def held(address: str) -> set[str]:
    client = NodeClient(address)
    try:
        return {f.function_id for f in client.status(2.0).functions}
    except Exception:
        return set()
    finally:
        client.close()


def test_serve_replaces_on_leave_and_rejoin(tmp_path):
    model_dir = make_checkpoint(tmp_path / "model", num_experts=8, top_k=2)
    store = tmp_path / "store"
    split_checkpoint(model_dir, store, group_size=1, progress=False)
    everything = {f.function_id for f in load_manifest(store).functions}
    nodes = [start_node(tmp_path / f"n{i}", memory_budget_mb=64, extra_args=["--node-id", f"n{i}"]) for i in range(2)]
    serve = subprocess.Popen([sys.executable, "-m", "faasmoe.router", "serve", "--store", str(store),
                              "--nodes", ",".join(n.address for n in nodes), "--settle-s", "0.2",
                              "--port", "0", "--no-replicas"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = serve.stdout.readline()
        info = parse_ready(banner, ROUTER_READY)
        assert info is not None, banner
        url = info["url"]
        a, b = nodes
        assert wait_until(lambda: held(a.address) | held(b.address) == everything, 30)
        assert held(a.address) and held(b.address)                 # spread over both nodes
        port_b = b.address.rsplit(":", 1)[1]
        b.kill()                                                   # leaves without a word
        assert wait_until(lambda: held(a.address) == everything, 15), "survivor never took over"
        b2 = start_node(tmp_path / "n1", memory_budget_mb=64,
                        extra_args=["--node-id", "n1", "--host", "127.0.0.1", "--port", port_b])
        nodes.append(b2)
        assert wait_until(lambda: len(held(b2.address)) > 0, 30), "returning node never used again"
        assert held(a.address) | held(b2.address) == everything
        text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
        assert "faasmoe_router" in text
        assert json.loads(urllib.request.urlopen(f"{url}/health", timeout=5).read())["status"] == "ok"
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0, serve.stderr.read()
        for n in nodes:
            n.stop()
