"""Multi-host mesh on network namespaces: three nodes and a router, each in its own namespace on one bridge,
discovery by mDNS only (no static node list), real ``faasmoe-node`` / ``faasmoe-router`` processes.

* mDNS works across the namespaces: the router side's directory finds every node at its namespace address;
* ``place --discover`` uses all three nodes, keeps every node within its budget and places every function;
  ``generate --discover`` is token-identical to transformers' greedy ``generate`` (fp32, computed here);
* kill -9 of a node mid-generation: the survivors take its functions and the tokens stay identical, or, when
  they cannot hold them, the router fails at once with a one-line "cannot hold" error (never a hang, never
  wrong tokens);
* under ``faasmoe-router serve`` a killed node's functions are on the survivors within 5 s, and a node that
  comes back (same id, same store) gets functions again.

The test process stays in the root namespace; it watches the mesh through an agent process in the router
namespace (tests/netns.py). Every wait is on a condition with a timeout.

Budgets: each node's ``--memory-budget-mb`` is a fraction of the memory the model's functions hold when
loaded (what placement and deploy admission count, ``function_abi.resident_estimate_bytes``), so no node can
hold the model alone and every node can keep what it holds loaded.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from faasmoe.proto.function_abi import resident_estimate_bytes
from types import SimpleNamespace

import pytest

import netns
from conftest import skip_or_fail
from model_factory import make_checkpoint

pytestmark = pytest.mark.netns

PROMPT = "hello mesh"
NODE_ROLES = ("node0", "node1", "node2")
NODE_PORT = 50051
ROUTER = [sys.executable, "-m", "faasmoe.router"]


# --------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def topo():
    reason = netns.unavailable_reason()
    if reason:
        skip_or_fail(reason)
    with netns.Topology(("router", *NODE_ROLES)) as t:
        yield t


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multihost-logs")


@pytest.fixture(scope="module")
def agent(topo, logs):
    """A NodeDirectory (mDNS + gRPC health) and a Status client, inside the router namespace."""
    with netns.Agent(topo["router"], log_path=logs / "agent.log") as a:
        yield a


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The checkpoint, its store (group size 4: 4 layers x 4 functions) and a reference generator."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from faasmoe.router.store.manifest import load_manifest
    from faasmoe.router.store.split import split_checkpoint

    root = tmp_path_factory.mktemp("multihost-model")
    model_dir = make_checkpoint(root / "model", num_layers=4, hidden_size=64, num_experts=16, top_k=4,
                                moe_intermediate_size=64, vocab_size=260, seed=5)
    store = root / "store"
    split_checkpoint(model_dir, store, group_size=4, progress=False)
    manifest = load_manifest(store)
    tok = AutoTokenizer.from_pretrained(str(store))
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    cache: dict[int, list[int]] = {}

    def expected(max_new_tokens: int) -> list[int]:
        """transformers' greedy generate, fp32, in this process: the generated token ids."""
        if max_new_tokens not in cache:
            enc = tok(PROMPT, return_tensors="pt")
            with torch.inference_mode():
                out = ref.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                   top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
            ids = out[0, enc["input_ids"].shape[1]:].tolist()
            assert len(ids) == max_new_tokens, "the reference stopped at EOS early: pick another prompt or seed"
            cache[max_new_tokens] = ids
        return cache[max_new_tokens]

    total_bytes = sum(resident_estimate_bytes(f.bytes) for f in manifest.functions)   # as placement counts
    return SimpleNamespace(store=store, expected=expected, function_ids={f.function_id for f in manifest.functions},
                           total_bytes=total_bytes, total_mb=total_bytes / 2**20)


class Mesh:
    """Three nodes, one per node namespace, started in parallel; all stopped (or killed) at teardown."""

    def __init__(self, topo, agent, model, root: Path, logs: Path, capacity_fraction: float):
        self.topo, self.agent, self.root, self.logs = topo, agent, root, logs
        self.budget_mb = capacity_fraction * model.total_mb
        self.extra = ["--profile", "rpi4-4gb", "--threads", "1"]
        self.nodes: dict[str, object] = {}
        with ThreadPoolExecutor(len(NODE_ROLES)) as pool:
            futures = {role: pool.submit(self._start, role) for role in NODE_ROLES}
        failed = [f.exception() for f in futures.values() if f.exception() is not None]
        self.nodes = {role: f.result() for role, f in futures.items() if f.exception() is None}
        if failed:
            self.stop()
            raise failed[0]
        try:     # mDNS + health across namespaces: the router-side directory sees every node up at its address
            netns.wait_until(lambda: self.addresses <= {s["address"] for s in agent.snapshot() if s["up"]}, 30,
                             "the router namespace's directory to see all nodes up")
        except BaseException:
            self.stop()
            raise

    def _start(self, role: str):
        host = self.topo[role]
        return netns.start_node_in(host, self.root / role, f"node-{role[-1]}", memory_budget_mb=self.budget_mb,
                                   port=NODE_PORT, extra_args=self.extra, log_path=self.logs / f"{role}.log")

    def restart(self, role: str):
        self.nodes[role] = self._start(role)
        return self.nodes[role]

    @property
    def addresses(self) -> set[str]:
        return {n.address for n in self.nodes.values()}

    def address(self, role: str) -> str:
        return f"{self.topo[role].ip}:{NODE_PORT}"

    def held(self, role: str) -> set[str] | None:
        st = self.agent.status(self.address(role))
        return None if st is None else {f["function_id"] for f in st["functions"]}

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop(timeout_s=10)


@pytest.fixture
def make_mesh(topo, agent, model, tmp_path, logs):
    meshes = []

    def make(capacity_fraction: float) -> Mesh:
        mesh = Mesh(topo, agent, model, tmp_path / "nodes", logs, capacity_fraction)
        meshes.append(mesh)
        return mesh

    yield make
    for mesh in meshes:
        mesh.stop()


def router_cmd(topo, model, command: str, *args: str) -> list[str]:
    return [*ROUTER, command, "--store", str(model.store), "--discover", "--mdns-interface", topo["router"].ip,
            *args]


def invocations(status: dict | None) -> int:
    return 0 if status is None else sum(f["invocations"] for f in status["functions"])


# --------------------------------------------------------------------------------------------- tests

def test_mdns_finds_every_node_across_namespaces(make_mesh, topo, logs):
    mesh = make_mesh(0.6)
    # a fresh directory in the router namespace: it learns of the nodes only from mDNS over the bridge
    with netns.Agent(topo["router"], log_path=logs / "agent-mdns.log") as fresh:
        for role in NODE_ROLES:
            node_id = f"node-{role[-1]}"
            added = fresh.wait_event(lambda e: e["kind"] == "added" and e["node_id"] == node_id, 10,
                                     f"an mDNS record of {node_id}")
            assert added["address"] == mesh.address(role)            # the address in its own namespace
            fresh.wait_event(lambda e: e["kind"] == "up" and e["node_id"] == node_id, 10,
                             f"{node_id} to answer health checks")


def test_discover_place_within_budgets_and_generate_exact(make_mesh, agent, topo, model):
    mesh = make_mesh(0.6)       # one node holds 60 % of the functions: placement needs at least two
    router = topo["router"]
    proc = router.run(router_cmd(topo, model, "place", "--json"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    rows = {r["node_id"]: r for r in plan["nodes"]}
    assert set(rows) == mesh.addresses                                     # all three found by mDNS alone
    assert plan["applied"] and plan["deployed"] >= len(model.function_ids)
    assert set(plan["placement"]) == model.function_ids
    assert all(nodes for nodes in plan["placement"].values())               # every function placed
    for address, row in rows.items():
        assert row["capacity_bytes"] < model.total_bytes                    # no node could hold the model
        assert row["used_bytes"] <= row["capacity_bytes"]                   # every budget respected
        assert row["functions"] > 0
    for role in NODE_ROLES:                                                 # and the nodes agree
        st = agent.status(mesh.address(role))
        assert {f["function_id"] for f in st["functions"]} == set(rows[mesh.address(role)]["function_ids"])
        assert st["deployed_bytes"] <= st["capacity_bytes"]

    proc = router.run(router_cmd(topo, model, "generate", "--prompt", PROMPT, "--max-new-tokens", "12", "--json"),
                      capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["token_ids"] == model.expected(12)
    assert out["rpcs"] > 0
    assert all(invocations(agent.status(mesh.address(role))) > 0 for role in NODE_ROLES)   # really spread


def _generate_and_kill(topo, agent, model, mesh, tmp_path, victim: str, max_new_tokens: int):
    """Start a generation in the router namespace, kill -9 ``victim`` once it has served calls of it;
    returns (returncode, stdout, stderr, seconds from the kill to the router's exit)."""
    out_path, err_path = tmp_path / "generate.out", tmp_path / "generate.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = topo["router"].popen(router_cmd(topo, model, "generate", "--prompt", PROMPT, "--max-new-tokens",
                                               str(max_new_tokens), "--step-timeout-s", "10", "--json"),
                                    stdout=out, stderr=err, text=True)
    try:
        netns.wait_until(lambda: invocations(agent.status(mesh.address(victim), timeout_s=1.0)) > 0
                         or proc.poll() is not None, 90, f"{victim} to serve calls of the generation")
        assert proc.poll() is None, f"the generation ended before the kill: {err_path.read_text()[-2000:]}"
        mesh.nodes[victim].kill()
        killed = time.monotonic()
        proc.wait(60)
        elapsed = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out_path.read_text(), err_path.read_text(), elapsed


def test_kill_mid_generation_survivors_take_over_same_tokens(make_mesh, agent, topo, model, tmp_path):
    mesh = make_mesh(0.6)       # two survivors hold 120 % of the functions
    victim = "node1"
    code, out, err, _ = _generate_and_kill(topo, agent, model, mesh, tmp_path, victim, 96)
    assert code == 0, err
    assert f"{mesh.address(victim)} failed" in err, f"the router never saw the kill: {err}"
    assert json.loads(out)["token_ids"] == model.expected(96)
    survivors = [r for r in NODE_ROLES if r != victim]
    assert set().union(*(mesh.held(r) for r in survivors)) == model.function_ids
    for role in survivors:
        st = agent.status(mesh.address(role))
        assert st["deployed_bytes"] <= st["capacity_bytes"]


def test_kill_mid_generation_without_room_fails_in_one_line(make_mesh, agent, topo, model, tmp_path):
    mesh = make_mesh(0.42)      # three nodes hold 126 % of the functions, two only 84 %
    code, out, err, elapsed = _generate_and_kill(topo, agent, model, mesh, tmp_path, "node2", 96)
    assert code != 0
    assert out.strip() == ""                                              # no tokens at all, so none wrong
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "cannot hold" in last, err
    assert mesh.address("node2") in last
    assert elapsed < 15, f"the router took {elapsed:.1f} s to give up after the kill"


def test_serve_moves_functions_off_a_killed_node_and_back_onto_it(make_mesh, agent, topo, model, tmp_path):
    mesh = make_mesh(0.6)
    router = topo["router"]
    with open(tmp_path / "serve.out", "w") as out, open(tmp_path / "serve.err", "w") as err:
        serve = router.popen(router_cmd(topo, model, "serve", "--settle-s", "0.5"), stdout=out, stderr=err,
                             text=True)
    try:
        def placed(roles):
            held = [mesh.held(r) for r in roles]
            return None not in held and set().union(*held) == model.function_ids and held

        held = netns.wait_until(lambda: (h := placed(NODE_ROLES)) and all(h) and h, 30,
                                "serve to place every function, on all three nodes")
        victim, survivors = "node0", ("node1", "node2")
        assert held[0], "the victim holds nothing"
        mesh.nodes[victim].kill()
        killed = time.monotonic()
        netns.wait_until(lambda: placed(survivors), 10, "the survivors to hold every function")
        took = time.monotonic() - killed
        assert took <= 5.0, f"the killed node's functions took {took:.1f} s to move to the survivors"
        assert serve.poll() is None

        mesh.restart(victim)                               # same id, same store dir, same address
        netns.wait_until(lambda: mesh.held(victim), 20, "serve to place functions on the returned node")
        assert placed(NODE_ROLES)
        for role in NODE_ROLES:
            st = agent.status(mesh.address(role))
            assert st["deployed_bytes"] <= st["capacity_bytes"]
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(20)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait()
    assert serve.returncode == 0, (tmp_path / "serve.err").read_text()
