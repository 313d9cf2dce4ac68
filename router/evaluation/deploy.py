"""The deployments a benchmark compares, each started as real processes (inside the deployment's cgroup when
there is one) behind the same OpenAI-compatible API:

- ``full-per-tenant``: one ``faasmoe-router serve-full`` per tenant, each holding the whole model (the paper's
  baseline);
- ``full-shared``: one ``serve-full`` for all tenants, batching them together;
- ``mesh``: N ``faasmoe-node`` processes (keep-alive and memory budget as given) and one shared router
  (``serve --tenants``) or one private router per tenant (``serve --tenant NAME``).
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from faasmoe.proto.errors import FaasmoeError
from faasmoe.proto.ready import ROUTER_READY, ReadyLines
from faasmoe.router.control.local_mesh import LocalMesh
from faasmoe.router.evaluation.scenario import DeploymentSpec
from faasmoe.router.evaluation.sampler import Cgroup

READY_TIMEOUT_S = 300.0


def launch_server(cmd: list[str], prefix: list[str], log_path: Path) -> tuple[subprocess.Popen, ReadyLines]:
    """Start a faasmoe HTTP server without waiting for it (:func:`wait_ready` does)."""
    with open(log_path, "ab") as log:                   # the child keeps its own descriptor
        proc = subprocess.Popen([*prefix, *cmd], stdout=subprocess.PIPE, stderr=log, text=True)
    return proc, ReadyLines(proc.stdout, proc)


def wait_ready(proc: subprocess.Popen, lines: ReadyLines, name: str, log_path: Path) -> str:
    """The URL of a launched server, once it has printed its ready line and answers /health."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        url = lines.wait(ROUTER_READY, READY_TIMEOUT_S, f"{name} (see {log_path})")["url"]
    except FaasmoeError:
        proc.kill()
        raise
    while httpx.get(f"{url}/health").status_code != 200:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise FaasmoeError(f"{name} never became healthy (see {log_path})")
        time.sleep(0.05)
    return url


def start_server(cmd: list[str], prefix: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start a faasmoe HTTP server; returns once it is healthy."""
    proc, lines = launch_server(cmd, prefix, log_path)
    return proc, wait_ready(proc, lines, cmd[3], log_path)


def stop_process(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Running:
    spec: DeploymentSpec
    roles: dict[int, str] = field(default_factory=dict)            # pid -> role: every process of the deployment
    urls: dict[str, str] = field(default_factory=dict)             # tenant -> the URL serving it
    keys: dict[str, str | None] = field(default_factory=dict)      # tenant -> its API key
    admin_key: str | None = None
    _servers: list[subprocess.Popen] = field(default_factory=list)
    _mesh: LocalMesh | None = None

    def router_urls(self) -> list[str]:
        return sorted(set(self.urls.values()))

    def cold_starts(self) -> int:
        """Cold starts the requests waited on, as the routers saw them in the nodes' replies."""
        if self.spec.kind != "mesh":
            return 0
        total = 0
        for url in self.router_urls():
            text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {self.admin_key}"}).text
            for line in text.splitlines():
                if line.startswith("faasmoe_router_cold_starts_total "):
                    total += int(float(line.split()[1]))
        return total

    def copies(self) -> int:
        """Function copies deployed on the mesh's nodes right now (every function counts once per node)."""
        if self._mesh is None:
            return 0
        from faasmoe.router.control.client import NodeClient
        total = 0
        for address in self._mesh.addresses:
            client = NodeClient(address)
            try:
                total += len(client.status(5.0).functions)
            except FaasmoeError:
                pass
            finally:
                client.close()
        return total

    def stop(self) -> None:
        for proc in self._servers:                  # every server drains at once
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._servers:
            stop_process(proc)
        if self._mesh is not None:
            self._mesh.__exit__(None, None, None)


def start_deployment(spec: DeploymentSpec, *, model_dir: Path, store_of, tenants: list[str], keys: dict[str, str],
                     admin_key: str, tenants_file: Path, workdir: Path, dtype: str,
                     cgroup: Cgroup | None) -> Running:
    prefix = cgroup.prefix() if cgroup is not None else []
    workdir.mkdir(parents=True, exist_ok=True)
    run = Running(spec, admin_key=admin_key)
    router = [sys.executable, "-m", "faasmoe.router"]
    try:
        if spec.kind == "full-per-tenant":
            launched = {}                           # independent servers: they start side by side
            for t in tenants:
                log_path = workdir / f"full-{t}.log"
                launched[t] = (*launch_server([*router, "serve-full", "--model", str(model_dir), "--port", "0",
                                               "--model-name", "bench", "--dtype", dtype], prefix, log_path), log_path)
                run._servers.append(launched[t][0])
            for t, (proc, lines, log_path) in launched.items():
                url = wait_ready(proc, lines, "serve-full", log_path)
                run.roles[proc.pid], run.urls[t], run.keys[t] = f"full-{t}", url, None
        elif spec.kind == "full-shared":
            proc, url = start_server([*router, "serve-full", "--model", str(model_dir), "--port", "0", "--model-name",
                                      "bench", "--dtype", dtype, "--tenants", str(tenants_file)], prefix,
                                     workdir / "full.log")
            run._servers.append(proc)
            run.roles[proc.pid] = "full"
            run.urls, run.keys = {t: url for t in tenants}, dict(keys)
        else:
            keep = "inf" if math.isinf(spec.keep_alive_s) else f"{spec.keep_alive_s:g}"
            run._mesh = LocalMesh(spec.nodes, workdir / "nodes", memory_budget_mb=spec.node_memory_mb,
                                  extra_args=["--keep-alive-s", keep], prefix=prefix).__enter__()
            for i, node in enumerate(run._mesh.nodes):
                run.roles[node.process.pid] = f"node-{i}"
            serve = [*router, "serve", "--store", str(store_of(spec.group_size)), "--nodes",
                     ",".join(run._mesh.addresses), "--port", "0", "--model-name", "bench", "--tenants",
                     str(tenants_file), "--settle-s", "0.2", "--replicas", spec.replicas]
            groups = [(None, tenants)] if spec.routers == "shared" else [(t, [t]) for t in tenants]
            launched = []           # the first router places every function; the others, side by side, lease them
            for n, (private, served) in enumerate(groups):
                log_path = workdir / f"router-{private or 'shared'}.log"
                proc, lines = launch_server([*serve, *(["--tenant", private] if private else [])], prefix, log_path)
                run._servers.append(proc)
                url = wait_ready(proc, lines, "serve", log_path) if n == 0 else None
                launched.append((proc, lines, log_path, private, served, url))
            for proc, lines, log_path, private, served, url in launched:
                url = url or wait_ready(proc, lines, "serve", log_path)
                run.roles[proc.pid] = f"router-{private}" if private else "router"
                for t in served:
                    run.urls[t], run.keys[t] = url, keys[t]
    except BaseException:
        run.stop()
        raise
    return run
