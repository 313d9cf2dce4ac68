"""Network namespaces as hosts: a private bridge, N namespaces on one /24, real processes inside them.

    with Topology(["router", "node0", "node1", "node2"]) as topo:
        topo["node0"].ip                    # 10.231.<k>.2
        topo["node0"].prefix                # ["ip", "netns", "exec", "fmnt-<pid>-<rand>-node0"]
        agent = Agent(topo["router"])       # a helper process inside the router namespace (see below)

Layout: the bridge lives in its own namespace (``<tag>-br``), so the host's network is never touched; each
host namespace gets ``lo`` up and one veth (``eth0``) plugged into the bridge, an address 10.231.<k>.<i>/24,
multicast on and a 224.0.0.0/4 route (python-zeroconf needs both). Nothing is routed out of the bridge: every
address used lives inside these namespaces. Names carry the creating pid and a random suffix, so parallel
runs never collide; :func:`cleanup_leftovers` removes namespaces of this prefix whose creator is gone (killing
the processes left inside them first).

The test process stays in the root namespace and cannot reach 10.231.x addresses, so it talks to the mesh
through an :class:`Agent`: ``python tests/netns.py agent`` running inside a namespace, JSON lines over
stdin/stdout. It keeps a :class:`faasmoe.router.directory.NodeDirectory` (mDNS + gRPC health) and streams its
events with ``time.time()`` stamps (same host clock as the test process), and answers ``status`` requests
(gRPC Status of a node).
"""

from __future__ import annotations

import atexit
import errno
import itertools
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from polling import wait_for

PREFIX = "fmnt"                  # every namespace this library creates starts with "fmnt-<pid>-"
SUBNET = "10.231"
BRIDGE = "br0"
HERE = Path(__file__).resolve()
REPO = HERE.parents[1]


# --------------------------------------------------------------------------------------------- helpers

def ip(*args: str, check: bool = True, timeout_s: float = 20.0) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout_s)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def json_line_writer():
    """``emit(msg)``: one JSON object per stdout line, thread-safe (agents talk to tests this way)."""
    lock = threading.Lock()

    def emit(msg: dict) -> None:
        with lock:
            sys.stdout.write(json.dumps(msg) + "\n")
            sys.stdout.flush()
    return emit


wait_until = wait_for                       # tests/polling.py: the one poller


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without FAASMOE_* settings (they would silently change flags), offline Hugging Face."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAASMOE_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env | extra


def unavailable_reason() -> str | None:
    """Why namespaces cannot be created here (None: they can). Only a permission problem is a reason to
    skip; anything else is a failure of the caller."""
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, as CI does)"
    if shutil.which("ip") is None:
        return "iproute2's 'ip' command is not installed"
    probe = f"{PREFIX}-{os.getpid()}-probe{secrets.token_hex(2)}"
    proc = ip("netns", "add", probe, check=False)
    if proc.returncode != 0:
        text = proc.stderr.strip()
        if "Operation not permitted" in text or "Permission denied" in text or str(errno.EPERM) in text:
            return f"cannot create network namespaces here: {text}"
        raise RuntimeError(f"ip netns add failed: {text}")
    ip("netns", "del", probe, check=False)
    return None


def list_netns() -> list[str]:
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _started_at(pid: int) -> float | None:
    """Wall-clock start time of process ``pid``; None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
        if fields[0] == "Z":
            return None
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def _creator_alive(pid: int, name: str) -> bool:
    """Whether the process that created namespace ``name`` still runs (not merely a later one with its pid)."""
    started = _started_at(pid)
    if started is None:
        return False
    try:
        created = os.stat(f"/var/run/netns/{name}").st_mtime
    except OSError:
        return True
    return started <= created + 1.0      # btime has 1 s resolution


def kill_netns_processes(name: str, timeout_s: float = 5.0) -> None:
    """SIGKILL every process inside namespace ``name`` (all started by this library's users), by pid."""
    pids = [int(p) for p in ip("netns", "pids", name, check=False).stdout.split() if p.isdigit()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and _not_zombie(p) for p in pids):
        time.sleep(0.02)


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def delete_netns(name: str) -> None:
    kill_netns_processes(name)
    ip("netns", "del", name, check=False)


def cleanup_leftovers() -> list[str]:
    """Delete namespaces of this prefix whose creating process is gone. Returns their names."""
    removed = []
    for name in list_netns():
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != PREFIX or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid() or _creator_alive(pid, name):
            continue                           # this run's, or a run in progress in parallel: not leftovers
        delete_netns(name)
        removed.append(name)
    return removed


# --------------------------------------------------------------------------------------------- topology

@dataclass(frozen=True)
class Host:
    role: str
    netns: str
    ip: str

    @property
    def prefix(self) -> list[str]:
        """Run a command in this host: ``[*host.prefix, "python", ...]``."""
        return ["ip", "netns", "exec", self.netns]

    def popen(self, cmd: Sequence[str], **kwargs) -> subprocess.Popen:
        kwargs.setdefault("env", clean_env())
        return subprocess.Popen([*self.prefix, *cmd], **kwargs)

    def run(self, cmd: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", clean_env())
        return subprocess.run([*self.prefix, *cmd], **kwargs)


class Topology:
    """A bridge in its own namespace plus one namespace per role, all on 10.231.<k>.0/24."""

    def __init__(self, roles: Sequence[str] = ("router", "node0", "node1", "node2")):
        self.tag = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.octet = random.randint(1, 254)
        self.bridge_netns = f"{self.tag}-br"
        self.hosts = {role: Host(role, f"{self.tag}-{role}", f"{SUBNET}.{self.octet}.{i + 1}")
                      for i, role in enumerate(roles)}
        self._created: list[str] = []

    def __getitem__(self, role: str) -> Host:
        return self.hosts[role]

    def create(self) -> Topology:
        cleanup_leftovers()
        atexit.register(self.destroy)
        try:
            br = self.bridge_netns
            ip("netns", "add", br)
            self._created.append(br)
            ip("-n", br, "link", "set", "lo", "up")
            ip("-n", br, "link", "add", BRIDGE, "type", "bridge", "mcast_snooping", "0")
            ip("-n", br, "link", "set", BRIDGE, "up")
            for i, host in enumerate(self.hosts.values()):
                ip("netns", "add", host.netns)
                self._created.append(host.netns)
                ip("-n", host.netns, "link", "set", "lo", "up")
                port = f"p{i}"      # bridge-side end; names are per namespace, so short names never collide
                ip("-n", br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
                ip("-n", br, "link", "set", port, "master", BRIDGE)
                ip("-n", br, "link", "set", port, "up")
                ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
                ip("-n", host.netns, "link", "set", "dev", "eth0", "multicast", "on")
                ip("-n", host.netns, "link", "set", "dev", "eth0", "up")
                ip("-n", host.netns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        """Kill what runs inside, delete every namespace (their veths and the bridge go with them)."""
        created, self._created = self._created, []
        for name in reversed(created):
            delete_netns(name)

    def __enter__(self) -> Topology:
        return self.create()

    def __exit__(self, *exc) -> None:
        self.destroy()


def start_node_in(host: Host, store_dir: Path, node_id: str, *, memory_budget_mb: float, port: int = 50051,
                  extra_args: Sequence[str] = (), log_path: Path | None = None, ready_timeout_s: float = 60.0):
    """``faasmoe-node`` inside ``host``: listens on its address, advertises on mDNS there. Returns the
    :class:`faasmoe.router.local_mesh.NodeProcess` (its ``process`` is the node itself: ``ip netns exec``
    execs the command)."""
    from faasmoe.router.control.local_mesh import start_node

    args = ["--host", host.ip, "--port", str(port), "--mdns-interface", host.ip, "--node-id", node_id,
            *extra_args]
    if "--join" not in args and "--insecure" not in args:
        args.append("--insecure")           # plaintext on a namespace address: development mode, said explicitly
    log = open(log_path, "a") if log_path else None
    try:
        return start_node(Path(store_dir), memory_budget_mb=memory_budget_mb, extra_args=args, prefix=host.prefix,
                          stderr=log, ready_timeout_s=ready_timeout_s)
    finally:
        if log is not None:
            log.close()


# --------------------------------------------------------------------------------------------- agent

class JsonLinesProcess:
    """A helper process inside a namespace speaking JSON lines: requests ``{"id", "op", ...}`` on its stdin;
    on its stdout one ``{"type": "ready"}``, replies ``{"type": "reply", "id", "ok", "result"|"error"}`` and any
    other messages (kept by type in ``messages``, e.g. ``messages["event"]``)."""

    def __init__(self, host: Host, cmd: Sequence[str], log_path: Path | None = None, ready_timeout_s: float = 30.0):
        self._log = open(log_path, "w") if log_path else subprocess.DEVNULL
        self.proc = host.popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                               text=True, bufsize=1)
        self.messages: dict[str, list[dict]] = {}
        self._replies: dict[int, dict] = {}
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._write_lock = threading.Lock()
        self._closed = False
        self._ready = False
        threading.Thread(target=self._pump, daemon=True, name="netns-jsonl-reader").start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._ready or self._closed, ready_timeout_s) or not self._ready:
                self.close()
                raise RuntimeError(f"{cmd[1:3]} in {host.netns} did not start (see {log_path})")

    def _pump(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                kind = msg.get("type")
                if kind == "reply":
                    self._replies[msg["id"]] = msg
                elif kind == "ready":
                    self._ready = True
                else:
                    self.messages.setdefault(kind, []).append(msg)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def call(self, op: str, wait_s: float = 15.0, **args):
        """Send ``{"op": op, **args}``; the reply's result (RuntimeError when the helper reports an error)."""
        rid = next(self._ids)
        with self._write_lock:
            self.proc.stdin.write(json.dumps({"id": rid, "op": op, **args}) + "\n")
            self.proc.stdin.flush()
        with self._cond:
            if not self._cond.wait_for(lambda: rid in self._replies or self._closed, wait_s):
                raise TimeoutError(f"{op}: no answer within {wait_s} s")
            if rid not in self._replies:
                raise RuntimeError(f"{op}: the helper exited")
            msg = self._replies.pop(rid)
        if not msg["ok"]:
            raise RuntimeError(f"{op}: {msg['error']}")
        return msg["result"]

    def count(self, kind: str) -> int:
        with self._cond:
            return len(self.messages.get(kind, []))

    def wait_message(self, kind: str, predicate: Callable[[dict], bool], timeout_s: float, what: str,
                     since: int = 0) -> dict:
        """The first ``kind`` message (from index ``since``) matching ``predicate``; AssertionError on timeout."""
        found: list[dict] = []

        def seen() -> bool:
            found[:] = [m for m in self.messages.get(kind, [])[since:] if predicate(m)][:1]
            return bool(found) or self._closed

        with self._cond:
            self._cond.wait_for(seen, timeout_s)
            recent = self.messages.get(kind, [])[-10:]
        if not found:
            raise AssertionError(f"timed out after {timeout_s:.1f} s waiting for {what}; last {kind}s: {recent}")
        return found[0]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Agent(JsonLinesProcess):
    """``python tests/netns.py agent`` inside ``host``: its NodeDirectory's events (``events``, each with
    kind, node_id, address, up and ``t`` = time.time()) and node Status."""

    def __init__(self, host: Host, mdns: bool = True, log_path: Path | None = None, ready_timeout_s: float = 30.0,
                 health_interval_s: float = 1.0):
        cmd = [sys.executable, str(HERE), "agent", "--health-interval-s", str(health_interval_s)]
        if mdns:
            cmd += ["--mdns-interface", host.ip]
        super().__init__(host, cmd, log_path, ready_timeout_s)

    @property
    def events(self) -> list[dict]:
        with self._cond:
            return list(self.messages.get("event", []))

    def status(self, address: str, timeout_s: float = 2.0) -> dict | None:
        """The node's Status (dict), or None when it does not answer."""
        return self.call("status", wait_s=timeout_s + 10, address=address, timeout_s=timeout_s)

    def snapshot(self) -> list[dict]:
        return self.call("snapshot")

    def wait_event(self, predicate: Callable[[dict], bool], timeout_s: float, what: str, since: int = 0) -> dict:
        return self.wait_message("event", predicate, timeout_s, what, since)


def _status_dict(reply) -> dict:
    return {
        "node_id": reply.node_id, "capacity_bytes": reply.capacity_bytes, "deployed_bytes": reply.deployed_bytes,
        "memory_budget_bytes": reply.memory_budget_bytes, "loaded_bytes": reply.loaded_bytes,
        "profile": reply.profile, "threads": reply.threads,
        "functions": [{"function_id": f.function_id, "invocations": f.invocations, "size_bytes": f.size_bytes,
                       "loaded": f.loaded, "layer": f.layer} for f in reply.functions],
    }


def agent_main(argv: Sequence[str]) -> int:
    """Runs inside a namespace (see :class:`Agent`)."""
    import argparse

    from faasmoe.proto.errors import MeshError
    from faasmoe.router.control.client import NodeClient
    from faasmoe.router.control.directory import NodeDirectory

    parser = argparse.ArgumentParser(prog="netns.py agent")
    parser.add_argument("--mdns-interface", default=None)
    parser.add_argument("--health-interval-s", type=float, default=1.0)
    args = parser.parse_args(argv)
    emit = json_line_writer()

    directory = None
    if args.mdns_interface:
        directory = NodeDirectory(mdns_interfaces=[args.mdns_interface], health_interval_s=args.health_interval_s)
        directory.subscribe(lambda ev: emit({"type": "event", "kind": ev.kind, "node_id": ev.node.node_id,
                                             "address": ev.node.address, "up": ev.node.up, "t": time.time()}))
        directory.start()
    clients: dict[str, NodeClient] = {}
    emit({"type": "ready", "t": time.time()})
    try:
        for line in sys.stdin:
            req = json.loads(line)
            try:
                if req["op"] == "status":
                    client = clients.setdefault(req["address"], NodeClient(req["address"]))
                    try:
                        result = _status_dict(client.status(req.get("timeout_s", 2.0)))
                    except MeshError:
                        result = None
                elif req["op"] == "snapshot":
                    result = [{"node_id": s.node_id, "address": s.address, "up": s.up}
                              for s in (directory.snapshot() if directory else [])]
                else:
                    raise ValueError(f"unknown op {req['op']!r}")
                emit({"type": "reply", "id": req["id"], "ok": True, "result": result})
            except Exception as exc:  # noqa: BLE001 - reported to the caller
                emit({"type": "reply", "id": req["id"], "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        for client in clients.values():
            client.close()
        if directory is not None:
            directory.stop()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "agent":
        sys.exit(agent_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "cleanup":
        print("\n".join(cleanup_leftovers()))
        sys.exit(0)
    print(f"usage: {sys.argv[0]} agent [--mdns-interface IP] | cleanup", file=sys.stderr)
    sys.exit(2)
