"""A node never plans past its container's memory limit: the cgroup limit is read (v1 and v2 layouts), the
budget lowered to fit, and a limit with no room for functions refused with one line. The last tests run a real
node process inside a real memory cgroup (root; this kernel's cgroups are v1)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import REPO, skip_or_fail
from faasmoe.node.cgroup import BASELINE_BYTES, MIB, fit_to_container, memory_limit_bytes
from faasmoe.node.config import NodeConfig
from faasmoe.proto.errors import ConfigError
from faasmoe.proto.ready import NODE_READY, parse_ready
from node_fixtures import node_env
from polling import wait_for


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("layout, files, own, expected", [
    ("v2 in a container", {"cgroup.controllers": "memory", "memory.max": "536870912\n"}, "0::/\n", 512 * MIB),
    ("v2 unlimited", {"cgroup.controllers": "memory", "memory.max": "max\n"}, "0::/\n", None),
    ("v2 on a host", {"cgroup.controllers": "memory", "memory.max": "max\n",
                      "system.slice/app.scope/memory.max": "1073741824\n"}, "0::/system.slice/app.scope\n", 1024 * MIB),
    ("v1 in a container", {"memory/memory.limit_in_bytes": "3221225472\n"}, "4:memory:/\n", 3072 * MIB),
    ("v1 unlimited", {"memory/memory.limit_in_bytes": "9223372036854771712\n"}, "4:memory:/\n", None),
    ("v1 on a host", {"memory/memory.limit_in_bytes": "9223372036854771712\n",
                      "memory/docker/abc/memory.limit_in_bytes": "268435456\n"}, "4:memory:/docker/abc\n", 256 * MIB),
    ("nothing mounted", {}, "", None),
])
def test_memory_limit_layouts(tmp_path, layout, files, own, expected):
    for rel, text in files.items():
        write(tmp_path / rel, text)
    assert memory_limit_bytes(tmp_path, own) == expected, layout


def config(tmp_path, budget_mb: int) -> NodeConfig:
    return NodeConfig(store_dir=tmp_path, memory_budget_bytes=budget_mb * MIB, max_inflight_bytes=64 * MIB)


def test_budget_fits_the_limit(tmp_path):
    reserve = BASELINE_BYTES + 64 * MIB
    assert fit_to_container(config(tmp_path, 2560), None).memory_budget_bytes == 2560 * MIB
    assert fit_to_container(config(tmp_path, 100), 1024 * MIB).memory_budget_bytes == 100 * MIB
    assert fit_to_container(config(tmp_path, 2560), 1024 * MIB).memory_budget_bytes == 1024 * MIB - reserve
    with pytest.raises(ConfigError, match="memory limit is 200 MiB.*at least"):
        fit_to_container(config(tmp_path, 2560), 200 * MIB)


def test_shipped_profiles_fit_their_own_limits(tmp_path):
    """compose gives each node its profile's mem_limit: no shipped profile should need lowering there."""
    from faasmoe.node.cli import config_from_args
    from faasmoe.node.profiles import list_profiles, load_profile
    for name in list_profiles():
        profile = load_profile(name)
        cfg, _ = config_from_args(["--profile", name, "--store-dir", str(tmp_path)], environ={})
        limit = int(profile.container_mem_limit[:-1]) << {"g": 30, "m": 20}[profile.container_mem_limit[-1].lower()]
        assert fit_to_container(cfg, limit) == cfg, f"{name}: budget does not fit mem_limit {profile.container_mem_limit}"


# ------------------------------------------------------------------------------- a real memory cgroup


@pytest.fixture
def memory_cgroup():
    """A fresh v1 memory cgroup (or a v2 child), removed afterwards."""
    root = Path("/sys/fs/cgroup")
    if os.geteuid() != 0:
        skip_or_fail("needs root to make a memory cgroup")
    name = f"faasmoe-test-{uuid.uuid4().hex[:8]}"
    if (root / "cgroup.controllers").exists():
        path, limit_file = root / name, "memory.max"
    elif (root / "memory").is_dir():
        path, limit_file = root / "memory" / name, "memory.limit_in_bytes"
    else:
        skip_or_fail("no memory cgroup controller mounted")
    path.mkdir()
    yield path, limit_file
    wait_for(lambda: not (path / "cgroup.procs").read_text().strip(), 10.0, f"{path} to empty")
    path.rmdir()


def node_in(cgroup: Path, *args: str) -> subprocess.Popen:
    procs = cgroup / "cgroup.procs"
    script = f'echo $$ > "{procs}" && exec "{sys.executable}" -m faasmoe.node "$@"'
    return subprocess.Popen(["sh", "-c", script, "sh", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=node_env(), cwd=REPO)


def test_node_in_a_small_cgroup_lowers_its_budget(memory_cgroup, tmp_path):
    from faasmoe.router.control.client import NodeClient
    cgroup, limit_file = memory_cgroup
    (cgroup / limit_file).write_text(str(512 * MIB))
    node = node_in(cgroup, "--port", "0", "--no-mdns", "--store-dir", str(tmp_path), "--profile", "rpi4-4gb",
                   "--max-inflight-mb", "64")
    try:
        line = node.stdout.readline()
        ready = parse_ready(line, NODE_READY)
        assert ready, (line, node.stderr.read() if node.poll() is not None else "")
        client = NodeClient(ready["address"])
        try:
            status = client.status(5.0)
        finally:
            client.close()
        assert status.memory_budget_bytes == 512 * MIB - BASELINE_BYTES - 64 * MIB, status.memory_budget_bytes
    finally:
        node.terminate()
        assert node.wait(30) == 0
    assert "budget lowered to" in node.stderr.read()


def test_node_refuses_a_cgroup_with_no_room(memory_cgroup, tmp_path):
    cgroup, limit_file = memory_cgroup
    (cgroup / limit_file).write_text(str(192 * MIB))
    node = node_in(cgroup, "--port", "0", "--no-mdns", "--store-dir", str(tmp_path), "--memory-budget-mb", "1024")
    out, err = node.communicate(timeout=60)
    assert node.returncode == 2, (out, err)
    assert err.startswith("error: the container's memory limit is 192 MiB") and err.count("\n") == 1, err
