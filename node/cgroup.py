"""The memory limit of the container (cgroup) this node runs in, and a memory budget that fits under it.

A node that loads functions up to a budget larger than its container's limit would be OOM-killed by the kernel
mid-call. So at start the node reads its cgroup's limit (v2 ``memory.max``; v1
``memory/memory.limit_in_bytes``, which this machine's kernel uses) and, where budget plus what the process
needs besides its functions would exceed it, lowers the budget to fit: the runtime then evicts (least recently
used) or refuses a load instead of growing past the limit. A limit that leaves no room at all is a
configuration error.

What the process needs besides its sessions: ``BASELINE_BYTES`` (the interpreter, ONNX Runtime's global state,
gRPC; ~74 MiB measured idle) plus the frame bytes it may hold before decoding (``inflight_limit_bytes``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from faasmoe.node.config import NodeConfig
from faasmoe.proto.errors import ConfigError

log = logging.getLogger(__name__)

MIB = 1 << 20
BASELINE_BYTES = 160 * MIB        # the node process without sessions or frames, with headroom
MIN_BUDGET_BYTES = 16 * MIB       # below this a node cannot hold even a small function
UNLIMITED_BYTES = 1 << 60         # v1 reports "no limit" as a page-rounded 2^63-1


def _own_cgroup_paths(proc_self_cgroup: str) -> tuple[str | None, str | None]:
    """(v2 path, v1 memory path) of this process from /proc/self/cgroup text."""
    v2 = v1 = None
    for line in proc_self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max" or not text.isdigit():
        return None
    value = int(text)
    return None if value >= UNLIMITED_BYTES else value


def memory_limit_bytes(root: Path = Path("/sys/fs/cgroup"), proc_self_cgroup: str | None = None) -> int | None:
    """The memory limit of this process's cgroup in bytes, None when there is none (or none can be read).

    Inside a container the cgroup namespace makes the container's cgroup the root of ``root``; on a host the
    process's own cgroup path (``/proc/self/cgroup``) is looked up under it too."""
    if proc_self_cgroup is None:
        try:
            proc_self_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            proc_self_cgroup = ""
    v2_path, v1_path = _own_cgroup_paths(proc_self_cgroup)
    candidates = []
    if (root / "cgroup.controllers").exists():                       # v2 (unified)
        for rel in filter(None, (v2_path, "/")):
            candidates.append(root / rel.lstrip("/") / "memory.max")
    else:                                                            # v1
        for rel in filter(None, (v1_path, "/")):
            candidates.append(root / "memory" / rel.lstrip("/") / "memory.limit_in_bytes")
    for path in candidates:
        limit = _read_limit(path)
        if limit is not None:
            return limit
    return None


def fit_to_container(config: NodeConfig, limit_bytes: int | None) -> NodeConfig:
    """``config`` with a memory budget that fits ``limit_bytes`` (unchanged when it fits or there is no limit).
    ConfigError when the limit leaves less than ``MIN_BUDGET_BYTES`` for functions."""
    if limit_bytes is None:
        return config
    reserve_bytes = BASELINE_BYTES + config.inflight_limit_bytes
    room_bytes = limit_bytes - reserve_bytes
    if room_bytes < MIN_BUDGET_BYTES:
        raise ConfigError(
            f"the container's memory limit is {limit_bytes / MIB:.0f} MiB, and the node needs "
            f"{reserve_bytes / MIB:.0f} MiB besides its functions ({BASELINE_BYTES / MIB:.0f} MiB for the process, "
            f"{config.inflight_limit_bytes / MIB:.0f} MiB of frames in flight): give the container at least "
            f"{(reserve_bytes + MIN_BUDGET_BYTES) / MIB:.0f} MiB, or lower --max-inflight-mb")
    if config.memory_budget_bytes <= room_bytes:
        return config
    log.warning("memory budget %.0f MiB does not fit the container's memory limit %.0f MiB (%.0f MiB are the "
                "process's and frames'): budget lowered to %.0f MiB, so loads evict or are refused instead of "
                "the kernel killing the node", config.memory_budget_bytes / MIB, limit_bytes / MIB,
                reserve_bytes / MIB, room_bytes / MIB)
    return replace(config, memory_budget_bytes=room_bytes)
