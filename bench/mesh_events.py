"""Mesh events timed on network namespaces (root needed): three nodes and a router, each in its own namespace
on one bridge, discovery by mDNS (the same fixtures as tests/test_multihost.py, tests/netns.py).

    sudo python bench/mesh_events.py [--reps 7]

Per repetition (median and max over ``--reps``):

* discovery: node process spawned -> its READY line, -> the router namespace's NodeDirectory has its mDNS
  record ("added"), -> the directory reports it up (gRPC health);
* kill -9 mid-generation (a generation of ``--tokens`` tokens running in a router process in its namespace):
  kill -> the last call sent to the dead node (<= 0: the call in flight at the kill was the last one),
  kill -> the router marks it down (recovery starts), kill -> recovery finished (functions re-placed and
  deployed on the survivors; the generation goes on), kill -> the directory's health checks report it down;
  the tokens are checked against transformers;
* re-place under ``serve`` (NodeDirectory + PlacementController, settle ``--settle-s``): kill -> directory
  down, the controller's ``last_replace_s`` (re-place + deploy), kill -> the survivors hold every function
  (Status polled every 20 ms from the router namespace), and node restart -> functions placed on it again.

Clocks: ``time.time()`` in every process (one host, one clock). Results: a table, and bench/out/mesh_events.json;
a failed recovery or re-placement is listed as FAILED (exit 1), with the logs kept.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
sys.path.insert(0, str(REPO / "tests"))

MODEL = dict(num_layers=4, hidden_size=64, num_experts=16, top_k=4, moe_intermediate_size=64, vocab_size=260,
             seed=5)
PROMPT = "hello mesh"
NODE_ROLES = ("node0", "node1", "node2")
CAPACITY_FRACTION = 0.6      # of the model's function bytes per node: two nodes hold it, one cannot
PORT = 50051


# --------------------------------------------------------------------------------------------- router helper
# ``python bench/mesh_events.py _router ...`` runs inside the router namespace: a NodeDirectory (mDNS), a
# RouterSession, and either generations on request (mode "generate") or a PlacementController ("serve").
# JSON lines: requests on stdin, replies and timestamped events on stdout.

def router_helper(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mesh_events.py _router")
    p.add_argument("--store", required=True)
    p.add_argument("--mdns-interface", required=True)
    p.add_argument("--mode", choices=("generate", "serve"), required=True)
    p.add_argument("--settle-s", type=float, default=0.5)
    args = p.parse_args(argv)
    return asyncio.run(_router_helper(args))


async def _router_helper(args) -> int:
    from faasmoe.router.control.controller import PlacementController
    from faasmoe.router.control.directory import NodeDirectory
    from faasmoe.router.control.session import RouterSession
    from faasmoe.router.engine.engine import EngineConfig
    from faasmoe.router.engine.generate import generate
    from faasmoe.router.engine.serving import start_serving
    from faasmoe.router.mesh import transport as transport_module

    import netns
    emit = netns.json_line_writer()

    # every layer step's fan-out: the time the last frame to each node was handed to its stream
    last_send: dict[str, float] = {}
    original_send = transport_module.NodeStream.send

    def send(self, frame):
        last_send[self.node] = time.time()
        return original_send(self, frame)

    transport_module.NodeStream.send = send

    session = RouterSession(args.store)
    config = EngineConfig(step_timeout_s=10.0)
    recoveries: list[dict] = []
    original_recover = session.recover

    def recover(address, err):          # the engine's SessionControl runs it in a worker thread
        entry = {"address": address, "start": time.time()}
        recoveries.append(entry)
        try:
            original_recover(address, err)
        finally:
            entry["end"] = time.time()

    session.recover = recover
    directory = NodeDirectory(mdns_interfaces=[args.mdns_interface])
    directory.subscribe(lambda ev: emit({"type": "event", "kind": ev.kind, "node_id": ev.node.node_id,
                                         "address": ev.node.address, "t": time.time()}))
    directory.start()
    session.on_mark_down = directory.mark_down
    controller = None
    if args.mode == "serve":
        class Controller(PlacementController):
            def reconcile(self):
                ok = super().reconcile()
                emit({"type": "replaced", "t": time.time(), "count": self.replacements,
                      "last_replace_s": self.last_replace_s, "error": self.last_error})
                return ok

        controller = Controller(session, directory, settle_s=args.settle_s)
        controller.start()
    serving = None
    emit({"type": "ready", "t": time.time()})
    try:
        while line := await asyncio.to_thread(sys.stdin.readline):
            req = json.loads(line)
            try:
                if req["op"] == "prepare":             # place on every up node (reviving all), start serving
                    want = set(req["addresses"])
                    if not await asyncio.to_thread(
                            directory.wait_for, lambda s: want <= {n.address for n in s if n.up}, 30):
                        raise RuntimeError(f"nodes not up: {want}")
                    for a in want:
                        session.revive(a)
                    plan, _ = await asyncio.to_thread(session.place_and_deploy, sorted(want))
                    if serving is None:
                        serving = await start_serving(session, config)
                    recoveries.clear()
                    last_send.clear()
                    result = {"functions": len(plan)}
                elif req["op"] == "generate":
                    start = time.time()
                    out = (await generate(serving.engine, serving.tokenizer, [req["prompt"]],
                                          req["max_new_tokens"]))[0]
                    result = {"token_ids": out.token_ids, "start": start, "end": time.time(),
                              "recoveries": list(recoveries), "last_send": dict(last_send)}
                else:
                    raise ValueError(f"unknown op {req['op']!r}")
                emit({"type": "reply", "id": req["id"], "ok": True, "result": result})
            except Exception as exc:  # noqa: BLE001 - reported to the caller
                emit({"type": "reply", "id": req["id"], "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        if serving is not None:
            await serving.close()
        if controller is not None:
            await asyncio.to_thread(controller.stop)
        directory.stop()
        session.close()
    return 0


def router_helper_process(host, store: Path, mode: str, log_path: Path, settle_s: float = 0.5):
    """:func:`router_helper` inside ``host``: a tests/netns.JsonLinesProcess (``messages["event"]``,
    ``messages["replaced"]``)."""
    import netns
    cmd = [sys.executable, str(Path(__file__).resolve()), "_router", "--store", str(store), "--mdns-interface",
           host.ip, "--mode", mode, "--settle-s", str(settle_s)]
    return netns.JsonLinesProcess(host, cmd, log_path, ready_timeout_s=60)


# --------------------------------------------------------------------------------------------- orchestration

def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "max": max(values), "min": min(values), "n": len(values),
            "values": [round(v, 4) for v in values]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--tokens", type=int, default=96, help="new tokens per generation in the kill scenario")
    p.add_argument("--settle-s", type=float, default=0.5)
    p.add_argument("--out", default=str(OUT / "mesh_events.json"))
    args = p.parse_args(argv)
    if args.reps < 5:
        p.error("--reps must be >= 5")

    import netns
    reason = netns.unavailable_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from faasmoe.router.engine.reference import reference_generate
    from faasmoe.router.store.manifest import load_manifest
    from faasmoe.router.store.split import split_checkpoint
    from model_factory import make_checkpoint

    work = Path(tempfile.mkdtemp(prefix="mesh-events-"))
    model_dir = make_checkpoint(work / "model", **MODEL)
    store = work / "store"
    split_checkpoint(model_dir, store, group_size=4, progress=False)
    manifest = load_manifest(store)
    function_ids = {f.function_id for f in manifest.functions}
    total_mb = sum(f.footprint_bytes for f in manifest.functions) / 2**20   # as placement counts
    tok = AutoTokenizer.from_pretrained(str(store))
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    expected = reference_generate(ref, tok, [PROMPT], args.tokens)[0].token_ids
    extra = ["--profile", "rpi4-4gb", "--threads", "1"]
    budget_mb = CAPACITY_FRACTION * total_mb
    results: dict[str, dict] = {}
    raw: dict[str, list] = {}
    failures: list[str] = []

    with netns.Topology(("router", *NODE_ROLES)) as topo:
        router = topo["router"]
        nodes: dict[str, object] = {}

        def start(role: str, node_id: str | None = None):
            node_id = node_id or f"node-{role[-1]}"
            return netns.start_node_in(topo[role], work / "nodes" / node_id, node_id,
                                       memory_budget_mb=budget_mb, port=PORT, extra_args=extra,
                                       log_path=work / f"{node_id}.log")

        def address(role: str) -> str:
            return f"{topo[role].ip}:{PORT}"

        agent = netns.Agent(router, log_path=work / "agent.log")
        try:
            # ---- discovery: spawn -> READY -> mDNS record in the router namespace -> health up
            ready, added, up = [], [], []
            for i in range(args.reps):
                role, node_id = NODE_ROLES[i % 3], f"disc-{i}"
                since = len(agent.events)
                t0 = time.time()
                node = start(role, node_id)
                t_ready = time.time()
                ev_added = agent.wait_event(lambda e: e["kind"] == "added" and e["node_id"] == node_id, 30,
                                            "added", since=since)
                ev_up = agent.wait_event(lambda e: e["kind"] == "up" and e["node_id"] == node_id, 30, "up",
                                         since=since)
                ready.append(t_ready - t0)
                added.append(ev_added["t"] - t0)
                up.append(ev_up["t"] - t0)
                node.stop()
                agent.wait_event(lambda e: e["kind"] == "removed" and e["node_id"] == node_id, 30, "goodbye",
                                 since=since)
            results["discovery: spawn -> node READY"] = stats(ready)
            results["discovery: spawn -> router sees mDNS record"] = stats(added)
            results["discovery: spawn -> router reports it up"] = stats(up)
            print("discovery done", file=sys.stderr)

            # ---- kill -9 during a generation
            with NodesRunning(start, nodes, agent, [address(r) for r in NODE_ROLES]):
                helper = router_helper_process(router, store, "generate", work / "router-generate.log")
                try:
                    last_call, marked, recovered, dir_down, correct = [], [], [], [], []
                    for i in range(args.reps):
                        victim = NODE_ROLES[i % 3]
                        helper.call("prepare", wait_s=60, addresses=[address(r) for r in NODE_ROLES])
                        since = agent.count("event")
                        base = _invocations(agent.status(address(victim)))
                        box: dict = {}

                        def run():
                            try:
                                box["out"] = helper.call("generate", wait_s=120, prompt=PROMPT,
                                                         max_new_tokens=args.tokens)
                            except Exception as exc:  # noqa: BLE001 - a failed recovery, reported below
                                box["error"] = str(exc)

                        gen = threading.Thread(target=run)
                        gen.start()
                        netns.wait_until(lambda: _invocations(agent.status(address(victim), 1.0)) > base
                                         or not gen.is_alive(), 60, "the victim to serve calls")
                        if not gen.is_alive():
                            raise RuntimeError(f"the generation ended before the kill: {box}")
                        nodes[victim].kill()
                        t_kill = time.time()
                        gen.join(120)
                        ev = agent.wait_event(lambda e: e["kind"] == "down" and e["address"] == address(victim),
                                              10, "down", since=since)
                        dir_down.append(ev["t"] - t_kill)
                        nodes[victim] = start(victim)
                        if "error" in box:
                            failures.append(f"generation, {victim} killed: {box['error']}")
                            continue
                        out = box["out"]
                        rec = [r for r in out["recoveries"] if r["address"] == address(victim)]
                        if not rec:
                            raise RuntimeError(f"the router never noticed the kill: {out}")
                        last_call.append(out["last_send"][address(victim)] - t_kill)
                        marked.append(rec[0]["start"] - t_kill)
                        recovered.append(rec[0]["end"] - t_kill)
                        correct.append(out["token_ids"] == expected)
                    if last_call:
                        results["kill mid-generation: kill -> last call sent to the dead node"] = stats(last_call)
                        results["kill mid-generation: kill -> router marks it down"] = stats(marked)
                        results["kill mid-generation: kill -> recovery done (re-placed, deployed)"] = \
                            stats(recovered)
                    results["kill: kill -> directory health check reports it down"] = stats(dir_down)
                    raw["tokens_identical"] = correct
                finally:
                    helper.close()
            print("kill mid-generation done", file=sys.stderr)

            # ---- re-place under serve
            with NodesRunning(start, nodes, agent, [address(r) for r in NODE_ROLES]):
                helper = router_helper_process(router, store, "serve", work / "router-serve.log",
                                               settle_s=args.settle_s)
                try:
                    def held(role):
                        st = agent.status(address(role), 1.0)
                        return None if st is None else {f["function_id"] for f in st["functions"]}

                    def all_placed(roles, each=False):
                        hs = [held(r) for r in roles]
                        return (None not in hs and set().union(*hs) == function_ids
                                and (not each or all(hs)))

                    netns.wait_until(lambda: all_placed(NODE_ROLES, each=True), 60, "serve to place everything")
                    down, replace_s, survivors_hold, rejoin = [], [], [], []
                    for i in range(args.reps):
                        victim = NODE_ROLES[i % 3]
                        survivors = [r for r in NODE_ROLES if r != victim]
                        replaced_since, events_since = helper.count("replaced"), helper.count("event")
                        nodes[victim].kill()
                        t_kill = time.time()
                        ev = helper.wait_message("event", lambda e: e["kind"] == "down"
                                                 and e["address"] == address(victim), 10, "down",
                                                 since=events_since)
                        down.append(ev["t"] - t_kill)
                        rep = helper.wait_message("replaced", lambda m: m["t"] >= ev["t"], 30, "a re-placement",
                                                  since=replaced_since)
                        if rep["error"]:
                            failures.append(f"serve, {victim} killed: re-placement failed: {rep['error']}")
                        else:
                            netns.wait_until(lambda: all_placed(survivors), 30, "the survivors to hold everything")
                            survivors_hold.append(time.time() - t_kill)
                            replace_s.append(rep["last_replace_s"])
                        t_restart = time.time()
                        nodes[victim] = start(victim)
                        netns.wait_until(lambda: held(victim), 30, "functions back on the restarted node")
                        rejoin.append(time.time() - t_restart)
                        netns.wait_until(lambda: all_placed(NODE_ROLES, each=True), 30, "everything placed")
                    results["serve: kill -> directory reports it down"] = stats(down)
                    if replace_s:
                        results["serve: re-place + redeploy (controller last_replace_s)"] = stats(replace_s)
                        results["serve: kill -> survivors hold every function"] = stats(survivors_hold)
                    results["serve: node restart -> functions placed on it again"] = stats(rejoin)
                finally:
                    helper.close()
        finally:
            agent.close()
            for node in nodes.values():
                node.stop()
            if failures:
                print(f"logs kept in {work}", file=sys.stderr)

    if not failures:
        shutil.rmtree(work, ignore_errors=True)
    report = {"model": MODEL, "group_size": 4, "functions": len(function_ids), "function_mib": round(total_mb, 3),
              "capacity_fraction": CAPACITY_FRACTION, "tokens": args.tokens, "reps": args.reps,
              "settle_s": args.settle_s, "results": results, "failures": failures, **raw}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    width = max(len(k) for k in results)
    print(f"{'event':<{width}}  {'median':>9}  {'max':>9}  n")
    for name, s in results.items():
        print(f"{name:<{width}}  {s['median'] * 1000:>7.1f}ms  {s['max'] * 1000:>7.1f}ms  {s['n']}")
    print(f"tokens identical to transformers after every kill: {all(raw['tokens_identical'])} "
          f"({len(raw['tokens_identical'])} generations)")
    for failure in failures:
        print(f"FAILED: {failure}")
    print(f"written {args.out}")
    return 0 if all(raw["tokens_identical"]) and not failures else 1


def _invocations(status: dict | None) -> int:
    return 0 if status is None else sum(f["invocations"] for f in status["functions"])


class NodesRunning:
    """Start the three nodes (those not running), wait until the agent sees them up; stop them on exit."""

    def __init__(self, start, nodes: dict, agent, addresses: list[str]):
        self.start, self.nodes, self.agent, self.addresses = start, nodes, agent, addresses

    def __enter__(self):
        import netns
        for role in NODE_ROLES:
            if role not in self.nodes or self.nodes[role].process.poll() is not None:
                self.nodes[role] = self.start(role)
        netns.wait_until(lambda: set(self.addresses) <= {s["address"] for s in self.agent.snapshot() if s["up"]},
                         30, "all nodes up")
        return self

    def __exit__(self, *exc):
        for role in list(self.nodes):
            self.nodes.pop(role).stop()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_router":
        sys.exit(router_helper(sys.argv[2:]))
    sys.exit(main())
