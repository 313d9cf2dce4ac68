"""Start ``faasmoe-node`` processes on loopback: the demo's mesh, and the tests' (real processes, real
gRPC). Nodes are separate programs (``python -m`` the node program); nothing is imported from them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from faasmoe.proto import NODE_PROGRAM
from faasmoe.proto.ready import NODE_READY, ReadyLines



@dataclass
class NodeProcess:
    node_id: str
    address: str
    process: subprocess.Popen

    def stop(self, timeout_s: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: the node dies without a goodbye."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _read_ready(proc: subprocess.Popen, timeout_s: float) -> dict:
    return ReadyLines(proc.stdout, proc).wait(NODE_READY, timeout_s, "node")


def start_node(store_dir: Path, *, memory_budget_mb: float = 1024, extra_args: Sequence[str] = (),
               env: dict | None = None, prefix: Sequence[str] = (), ready_timeout_s: float = 60.0,
               stderr=None) -> NodeProcess:
    """One node on 127.0.0.1, port 0, no mDNS unless ``extra_args`` say otherwise. ``prefix`` runs the
    command inside something (e.g. ``ip netns exec NS``)."""
    cmd = [*prefix, sys.executable, "-m", NODE_PROGRAM, "--store-dir", str(store_dir),
           "--memory-budget-mb", str(memory_budget_mb)]
    if "--host" not in extra_args:
        cmd += ["--host", "127.0.0.1", "--port", "0"]
    if "--mdns-interface" not in extra_args:
        cmd += ["--no-mdns"]
    cmd += list(extra_args)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr if stderr is not None else subprocess.DEVNULL,
                            text=True, env={**os.environ, **(env or {})})
    try:
        info = _read_ready(proc, ready_timeout_s)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return NodeProcess(info["node_id"], info["address"], proc)


class LocalMesh:
    """``with LocalMesh(3, root) as mesh: mesh.addresses`` — N nodes, stopped (SIGTERM) on exit."""

    def __init__(self, n_nodes: int, root: Path, memory_budget_mb: float = 1024,
                 extra_args: Sequence[str] = (), env: dict | None = None, prefix: Sequence[str] = ()):
        self.root = Path(root)
        self.prefix = tuple(prefix)     # runs each node inside something, e.g. ("taskset", "-c", "1")
        self.n_nodes = n_nodes
        self.memory_budget_mb = memory_budget_mb
        self.extra_args = tuple(extra_args)
        self.env = env
        self.nodes: list[NodeProcess] = []

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    def __enter__(self) -> "LocalMesh":
        try:
            for i in range(self.n_nodes):
                self.nodes.append(start_node(self.root / f"node{i}", memory_budget_mb=self.memory_budget_mb,
                                             extra_args=[*self.extra_args, "--node-id", f"local-{i}"],
                                             env=self.env, prefix=self.prefix))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for node in self.nodes:
            node.stop()
