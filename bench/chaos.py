"""Chaos run in network namespaces (root needed): steady multi-tenant load through the HTTP API while a nemesis
kills, pauses and restarts nodes and injects latency, resets and partitions.

    sudo python bench/chaos.py [--minutes 5] [--model ../shared/models/qwen2moe-tiny-code] [--out bench/out/chaos.json]

Setup: a router and four nodes, each in its own namespace on one bridge. The cluster is enrolled for real
(``init-cluster``, ``enroll-server``, ``faasmoe-node --join TOKEN``): every call is mutual TLS. The router reaches
each node through a user-space fault proxy (:mod:`faasmoe.router.evaluation.faults`) running in its namespace,
so latency, resets and blackholes are injected on the router-to-node links; kills and pauses are signals to
the node processes (SIGKILL, then a restart from the same store; SIGSTOP, then SIGCONT).

Load: tenants with their own API keys, each with a fixed number of callers in a closed loop, the official
``openai`` client, greedy completions of prompts from a fixed set. The reference is a fault-free pass over the
same prompts through the same API, checked against transformers. Every successful output during the run must
equal it; every failure must carry an error message.

Per fault: when it started and ended, the requests that overlapped it, how many failed, and the time to
recover: from the fault's start to the end of the first successful request that started after it.
Results: a table, and the JSON at ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

PROMPTS = ["def fibonacci(n):", "import numpy as np\n", "The quick brown fox", "for i in range(",
           "class Stack:\n    def", "# read a csv file\n", "SELECT name FROM", "if __name__ == '__main__':"]
ENROLL_PORT, NODE_PORT, API_PORT = 8443, 50051, 8000


# ------------------------------------------------------------------------------------------- helpers in netns

_EMIT_LOCK = threading.Lock()


def _emit(msg: dict) -> None:
    with _EMIT_LOCK:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()


def proxies_helper(targets: list[str]) -> int:
    """``chaos.py _proxies T0 T1 ...``: one FaultProxy per target; ops: addresses, set, reset, stats."""
    from faasmoe.router.evaluation.faults import FaultProxy
    proxies = [FaultProxy(t).start() for t in targets]
    _emit({"type": "ready"})
    for line in sys.stdin:
        req = json.loads(line)
        try:
            op = req["op"]
            if op == "addresses":
                result = [p.address for p in proxies]
            elif op == "set":
                proxies[req["node"]].set(**req.get("faults", {}))
                result = None
            elif op == "reset":
                result = proxies[req["node"]].reset()
            elif op == "stats":
                result = [vars(p.stats) for p in proxies]
            else:
                raise ValueError(f"unknown op {op!r}")
            _emit({"type": "reply", "id": req["id"], "ok": True, "result": result})
        except Exception as exc:  # noqa: BLE001 - reported to the driver
            _emit({"type": "reply", "id": req["id"], "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    for p in proxies:
        p.close()
    return 0


def load_helper(argv: list[str]) -> int:
    """``chaos.py _load``: ops reference (one pass, sequential) and start (closed-loop callers for a while;
    one "request" message per request, then "done")."""
    import openai
    p = argparse.ArgumentParser(prog="chaos.py _load")
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--keys", required=True)
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args(argv)
    keys = args.keys.split(",")

    async def one(client, prompt: int) -> dict:
        t0 = time.time()
        try:
            out = await client.completions.create(model=args.model, prompt=PROMPTS[prompt], max_tokens=args.max_tokens,
                                                  temperature=0)
            return {"prompt": prompt, "start": t0, "end": time.time(), "ok": True, "text": out.choices[0].text}
        except openai.APIError as exc:
            status = getattr(exc, "status_code", None)
            return {"prompt": prompt, "start": t0, "end": time.time(), "ok": False, "status": status,
                    "error": str(exc)[:400]}

    async def run(duration_s: float, callers: int, seed: int) -> None:
        clients = [openai.AsyncOpenAI(base_url=args.url, api_key=k, max_retries=0, timeout=120) for k in keys]
        stop_at = time.time() + duration_s

        async def caller(tenant: int, rng: random.Random):
            while time.time() < stop_at:
                result = await one(clients[tenant], rng.randrange(len(PROMPTS)))
                _emit({"type": "request", "tenant": tenant, **result})

        await asyncio.gather(*(caller(t, random.Random(seed * 1000 + t * 10 + c))
                               for t in range(len(keys)) for c in range(callers)))
        _emit({"type": "done"})

    async def reference() -> list:
        import httpx
        health, deadline = args.url.removesuffix("/v1") + "/health", time.time() + 300
        async with httpx.AsyncClient() as http:         # the router is up once its functions are placed
            while (await http.get(health)).status_code != 200:
                if time.time() > deadline:
                    raise TimeoutError("the router did not become healthy in 300 s")
                await asyncio.sleep(0.2)
        client = openai.AsyncOpenAI(base_url=args.url, api_key=keys[0], max_retries=0, timeout=120)
        return [await one(client, i) for i in range(len(PROMPTS))]

    _emit({"type": "ready"})
    threads = []
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "reference":
            _emit({"type": "reply", "id": req["id"], "ok": True, "result": asyncio.run(reference())})
        elif req["op"] == "start":
            t = threading.Thread(target=asyncio.run, args=(run(req["duration_s"], req["callers"], req["seed"]),))
            t.start()
            threads.append(t)
            _emit({"type": "reply", "id": req["id"], "ok": True, "result": None})
    for t in threads:
        t.join()
    return 0


# ------------------------------------------------------------------------------------------------ the driver

def _run(cmd, **kw) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} failed: {out.stderr[-1500:]}")
    return out.stdout


class Router:
    """``faasmoe-router serve`` in the router namespace; its stderr goes to a log."""

    def __init__(self, host, args: list[str], log_path: Path, ready_timeout_s: float = 300):
        from faasmoe.proto.ready import ROUTER_READY, ReadyLines
        self.log = open(log_path, "w")
        self.proc = host.popen([sys.executable, "-m", "faasmoe.router", "serve", *args], stdout=subprocess.PIPE,
                               stderr=self.log, text=True)
        self.info = ReadyLines(self.proc.stdout, self.proc).wait(ROUTER_READY, ready_timeout_s,
                                                                 f"the router (see {log_path})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


class Nemesis:
    """Faults in a fixed rotation, one every ``period_s``, each on the next node."""

    KINDS = ("kill", "pause", "latency", "reset", "blackhole", "drop")

    def __init__(self, topo, nodes: dict, proxies, work: Path, budget_mb: float, period_s: float, token: str):
        self.topo, self.nodes, self.proxies, self.work, self.token = topo, nodes, proxies, work, token
        self.budget_mb, self.period_s = budget_mb, period_s
        self.faults: list[dict] = []

    def _restart(self, i: int) -> None:
        import netns
        self.nodes[i] = netns.start_node_in(self.topo[f"node{i}"], self.work / f"node{i}", f"node{i}",
                                            memory_budget_mb=self.budget_mb, port=NODE_PORT,
                                            extra_args=["--join", self.token],      # its identity is kept
                                            log_path=self.work / f"node{i}.log")

    def inject(self, n: int) -> None:
        kind, i = self.KINDS[n % len(self.KINDS)], n % len(self.nodes)
        fault = {"kind": kind, "node": f"node{i}", "start": time.time()}
        pid = self.nodes[i].process.pid
        if kind == "kill":
            os.kill(pid, signal.SIGKILL)
            self.nodes[i].process.wait(10)
            self._hold(8.0)
            self._restart(i)
            fault["detail"] = "SIGKILL, restarted from the same store 8 s later"
        elif kind == "pause":
            os.kill(pid, signal.SIGSTOP)
            self._hold(8.0)
            os.kill(pid, signal.SIGCONT)
            fault["detail"] = "SIGSTOP for 8 s, then SIGCONT"
        elif kind == "latency":
            self.proxies.call("set", node=i, faults={"delay_s": 0.05})
            self._hold(15.0)
            self.proxies.call("set", node=i, faults={})
            fault["detail"] = "+50 ms each way on the router link for 15 s"
        elif kind == "reset":
            fault["detail"] = f"TCP RST on {self.proxies.call('reset', node=i)} open connections"
        elif kind == "blackhole":
            self.proxies.call("set", node=i, faults={"blackhole": True})
            self._hold(6.0)
            self.proxies.call("set", node=i, faults={})
            self.proxies.call("reset", node=i)          # the partition heals: stale connections are dropped
            fault["detail"] = "partition (blackhole) for 6 s"
        else:
            self.proxies.call("set", node=i, faults={"drop_p": 0.02})
            self._hold(5.0)
            self.proxies.call("set", node=i, faults={})
            fault["detail"] = "2 % of chunks lost for 5 s (broken streams)"
        fault["end"] = time.time()
        self.faults.append(fault)

    @staticmethod
    def _hold(seconds: float) -> None:
        time.sleep(seconds)         # the fault's duration (the nemesis's schedule, not synchronisation)


def summarize(requests: list[dict], reference: dict[int, str], faults: list[dict], baseline_p50_s: float) -> dict:
    ok = [r for r in requests if r["ok"]]
    failed = [r for r in requests if not r["ok"]]
    wrong = [r for r in ok if r["text"] != reference[r["prompt"]]]
    latency = sorted(r["end"] - r["start"] for r in ok)
    for f in faults:
        overlapping = [r for r in requests if r["start"] <= f["end"] and r["end"] >= f["start"]]
        after = sorted((r for r in ok if r["start"] >= f["start"]), key=lambda r: r["end"])
        f["requests"] = len(overlapping)
        f["failed"] = sum(not r["ok"] for r in overlapping)
        f["recovery_s"] = round(after[0]["end"] - f["start"], 2) if after else None
        f["max_latency_s"] = round(max((r["end"] - r["start"] for r in overlapping), default=0.0), 2)
    return {"requests": len(requests), "succeeded": len(ok), "failed": len(failed),
            "success_rate": len(ok) / max(len(requests), 1), "wrong_outputs": len(wrong),
            "errors": sorted({r["error"][:200] for r in failed}),
            "error_statuses": sorted({str(r.get("status")) for r in failed}),
            "latency_p50_s": round(statistics.median(latency), 3) if latency else None,
            "latency_p99_s": round(latency[int(0.99 * (len(latency) - 1))], 3) if latency else None,
            "fault_free_p50_s": round(baseline_p50_s, 3), "faults": faults}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="chaos.py", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "qwen2moe-tiny-code"))
    p.add_argument("--tenants", type=int, default=3)
    p.add_argument("--callers", type=int, default=2, help="closed-loop callers per tenant")
    p.add_argument("--period-s", type=float, default=20.0, help="a fault every this many seconds")
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "chaos.json"))
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = p.parse_args(argv)

    import netns
    from faasmoe.router.control.session import RouterSession
    from faasmoe.router.store.split import split_checkpoint
    if (why := netns.unavailable_reason()) is not None:
        print(f"chaos.py: {why}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="faasmoe-chaos-"))
    print(f"work folder {work}")
    split_checkpoint(Path(args.model), work / "store", group_size=4, progress=False)
    total_mb = sum(f.bytes for f in RouterSession(work / "store").placement_functions()) / 2**20
    budget_mb = 0.6 * total_mb + 8          # any three nodes hold everything; four hold hot copies
    roles = ("router", "node0", "node1", "node2", "node3")
    router = load = proxies = enroll = None
    nodes: dict = {}
    topo = netns.Topology(roles).create()
    try:
        rhost = topo["router"]
        out = _run([sys.executable, "-m", "faasmoe.router", "init-cluster", "--dir", str(work / "cluster"),
                    "--enroll-address", f"{rhost.ip}:{ENROLL_PORT}"])
        token = next(line for line in out.splitlines() if line.startswith("fmj1."))
        enroll = rhost.popen([sys.executable, "-m", "faasmoe.router", "enroll-server", "--dir", str(work / "cluster"),
                              "--listen", f"{rhost.ip}:{ENROLL_PORT}"], stdout=subprocess.PIPE, text=True)
        enroll.stdout.readline()                # its "enrolment ... on https://..." line: listening
        for i in range(4):
            nodes[i] = netns.start_node_in(topo[f"node{i}"], work / f"node{i}", f"node{i}", memory_budget_mb=budget_mb,
                                           port=NODE_PORT, extra_args=["--join", token],
                                           log_path=work / f"node{i}.log")
        enroll.terminate()
        enroll.wait(10)
        targets = [f"{topo[f'node{i}'].ip}:{NODE_PORT}" for i in range(4)]
        proxies = netns.JsonLinesProcess(rhost, [sys.executable, str(Path(__file__).resolve()), "_proxies", *targets],
                                         log_path=work / "proxies.log")
        addresses = proxies.call("addresses")
        keys = []
        for t in range(args.tenants):
            keys.append(_run([sys.executable, "-m", "faasmoe.router", "tenants", "add", f"tenant{t}", "--file",
                              str(work / "tenants.toml")]).strip().splitlines()[-1])
        router = Router(rhost, ["--store", str(work / "store"), "--nodes", ",".join(addresses), "--cluster",
                                str(work / "cluster"), "--enroll-listen", "off", "--host", "127.0.0.1", "--port",
                                str(API_PORT), "--tenants", str(work / "tenants.toml"), "--frame-timeout-s", "2",
                                "--step-timeout-s", "30", "--settle-s", "1"], work / "router.log")
        load = netns.JsonLinesProcess(rhost, [sys.executable, str(Path(__file__).resolve()), "_load", "--url",
                                              f"{router.info['url']}/v1", "--model", router.info["model"],
                                              "--keys", ",".join(keys)], log_path=work / "load.log")
        ref = load.call("reference", wait_s=300)
        assert all(r["ok"] for r in ref), ref
        reference = {r["prompt"]: r["text"] for r in ref}
        baseline_p50_s = statistics.median(r["end"] - r["start"] for r in ref)
        matches = _check_against_transformers(Path(args.model), work / "store", reference)
        print(f"reference: {len(ref)} prompts, {matches}/{len(ref)} equal to transformers")
        duration_s = args.minutes * 60
        t0 = time.time()
        load.call("start", duration_s=duration_s, callers=args.callers, seed=1)
        nemesis = Nemesis(topo, nodes, proxies, work, budget_mb, args.period_s, token)
        n = 0
        while time.time() - t0 < duration_s - args.period_s:
            next_at = t0 + (n + 1) * args.period_s
            while time.time() < next_at:
                time.sleep(0.2)     # the nemesis's clock
            nemesis.inject(n)
            f = nemesis.faults[-1]
            print(f"[{f['start'] - t0:6.1f} s] {f['kind']:9} {f['node']}: {f['detail']}", flush=True)
            n += 1
        load.wait_message("done", lambda m: True, duration_s + 300, "the load to finish")
        summary = summarize(load.messages.get("request", []), reference, nemesis.faults, baseline_p50_s)
        summary.update({"minutes": args.minutes, "tenants": args.tenants, "callers_per_tenant": args.callers,
                        "nodes": 4, "model": Path(args.model).name, "node_budget_mb": round(budget_mb, 1),
                        "reference_equal_to_transformers": f"{matches}/{len(ref)}",
                        "proxy_stats": proxies.call("stats")})
    finally:
        for closer in (load, proxies):
            if closer is not None:
                closer.close()
        if router is not None:
            router.stop()
        if enroll is not None and enroll.poll() is None:
            enroll.kill()
        for node in nodes.values():
            node.stop()
        topo.destroy()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    _print(summary)
    if not args.keep:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    good = summary["success_rate"] >= 0.999 and summary["wrong_outputs"] == 0
    return 0 if good else 1


def _check_against_transformers(model_dir: Path, store: Path, reference: dict[int, str]) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from faasmoe.router.engine.reference import reference_generate
    tok = AutoTokenizer.from_pretrained(str(store))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    refs = reference_generate(model, tok, PROMPTS, 16)
    return sum(tok.decode(r.token_ids, skip_special_tokens=True) == reference[i] for i, r in enumerate(refs))


def _print(s: dict) -> None:
    print(f"\n{s['requests']} requests from {s['tenants']} tenants x {s['callers_per_tenant']} callers over "
          f"{s['minutes']} min: {s['succeeded']} succeeded ({100 * s['success_rate']:.2f} %), {s['failed']} failed, "
          f"{s['wrong_outputs']} outputs differ from the fault-free reference")
    print(f"latency p50 {s['latency_p50_s']} s, p99 {s['latency_p99_s']} s (fault-free p50 {s['fault_free_p50_s']} s)")
    print("\n| fault | node | detail | requests overlapping | failed | recovery s | max latency s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for f in s["faults"]:
        print(f"| {f['kind']} | {f['node']} | {f['detail']} | {f['requests']} | {f['failed']} | {f['recovery_s']} | "
              f"{f['max_latency_s']} |")
    for e in s["errors"]:
        print("error:", e)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_proxies":
        sys.exit(proxies_helper(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "_load":
        sys.exit(load_helper(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
