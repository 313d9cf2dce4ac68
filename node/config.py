"""The node's configuration: one frozen dataclass, one unit per field.

CLI flags of ``faasmoe-node`` map 1:1 onto these fields (see :mod:`faasmoe.node.cli`); every flag may also
come from the environment as ``FAASMOE_NODE_<FLAG>``.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

from faasmoe.proto.errors import ConfigError
from faasmoe.proto.frames import DEFAULT_MAX_MESSAGE_BYTES

MIB = 1024 * 1024
DEFAULT_DISK_BUDGET_BYTES = 16 * 1024 * MIB


def default_node_id() -> str:
    """Host name plus a short random suffix, so two nodes on one host never collide."""
    host = socket.gethostname().split(".")[0] or "node"
    return f"{host}-{secrets.token_hex(3)}"


def default_store_dir(node_id: str) -> Path:
    """Per-user cache dir of one node: ``$XDG_CACHE_HOME/faasmoe/node/<node_id>``.

    A node keeps its warm disk cache across restarts only with a stable ``--node-id`` (or ``--store-dir``).
    """
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "faasmoe" / "node" / node_id


def default_threads() -> int:
    """CPUs this process may run on (honours cpusets / taskset, unlike a bare ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_memory_budget_bytes() -> int:
    """Half of the machine's RAM."""
    import psutil  # lazy: keep `import faasmoe.node.config` cheap

    return int(psutil.virtual_memory().total // 2)


@dataclass(frozen=True)
class NodeConfig:
    host: str = "127.0.0.1"                      # address to listen on (0.0.0.0 = every interface)
    port: int = 0                                # TCP port; 0 = pick a free one
    node_id: str = field(default_factory=default_node_id)  # unique name of this node in the mesh
    store_dir: Path | None = None                # content-addressed file store; None = default_store_dir(node_id)
    memory_budget_bytes: int = field(default_factory=default_memory_budget_bytes)  # bytes of loaded sessions
    disk_budget_bytes: int = DEFAULT_DISK_BUDGET_BYTES  # bytes of function files kept on disk
    overcommit: float = 1.0                      # ratio: deployable bytes = memory_budget_bytes x overcommit
    threads: int = field(default_factory=default_threads)  # ORT intra-op threads per session run
    keep_alive_s: float = 30.0                   # seconds a session stays loaded after its last call (inf = never)
    max_queue: int = 64                          # calls that may wait for a load or a free run slot
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # bytes, gRPC send/receive limit
    profile: str = ""                            # edge profile name or path ("" = none)
    mdns: bool = True                            # advertise on mDNS
    mdns_interfaces: tuple[str, ...] = ()        # IPv4 addresses to advertise on (() = default choice)
    mqtt_url: str | None = None                  # MQTT broker URL for events (None = off)
    metrics_port: int | None = None              # Prometheus port (None = off)
    join_token: str | None = None                # enrol in a cluster with this token (then mutual TLS only)
    insecure: bool = False                       # allow plaintext on a non-loopback address
    max_concurrent_rpcs: int = 256               # calls at once (streams included); more: RESOURCE_EXHAUSTED
    max_inflight_bytes: int = 0                  # frame bytes held at once before decoding (0 = 4 x max message)
    deploy_timeout_s: float = 600.0              # a Deploy stream must finish within this
    load_rss_factor: float = 1.5                 # a load may grow RSS by this x its estimate (+ slack), else refused

    def __post_init__(self) -> None:
        if self.store_dir is None:
            object.__setattr__(self, "store_dir", default_store_dir(self.node_id))
        else:
            object.__setattr__(self, "store_dir", Path(self.store_dir).expanduser())
        object.__setattr__(self, "mdns_interfaces", tuple(self.mdns_interfaces))
        self.validate()

    @property
    def inflight_limit_bytes(self) -> int:
        return self.max_inflight_bytes or 4 * self.max_message_bytes

    @property
    def capacity_bytes(self) -> int:
        """What may be deployed: memory budget x overcommit."""
        return int(self.memory_budget_bytes * self.overcommit)

    def validate(self) -> None:
        problems = []
        if not self.node_id or any(c.isspace() or c in "/\\" for c in self.node_id):
            problems.append(f"node id {self.node_id!r} must be non-empty without spaces or slashes")
        if not 0 <= self.port <= 65535:
            problems.append(f"port {self.port} is not in 0..65535")
        if self.memory_budget_bytes <= 0:
            problems.append("memory budget must be > 0 MiB")
        if self.disk_budget_bytes <= 0:
            problems.append("disk budget must be > 0 MiB")
        if not (math.isfinite(self.overcommit) and self.overcommit > 0):
            problems.append(f"overcommit {self.overcommit} must be a finite number > 0 (1.0 = no overcommit)")
        if self.threads < 1:
            problems.append(f"threads {self.threads} must be >= 1")
        if math.isnan(self.keep_alive_s) or self.keep_alive_s < 0:
            problems.append(f"keep-alive {self.keep_alive_s} s must be >= 0 (inf = never evict)")
        if self.max_queue < 0:
            problems.append(f"max queue {self.max_queue} must be >= 0")
        if self.max_message_bytes < MIB:
            problems.append("max message size must be >= 1 MiB")
        if not (math.isfinite(self.load_rss_factor) and self.load_rss_factor > 0):
            problems.append("load RSS factor must be a finite number > 0")
        if self.max_concurrent_rpcs < 4:
            problems.append("max concurrent RPCs must be >= 4")
        if self.max_inflight_bytes < 0:
            problems.append("max in-flight bytes must be >= 0 (0 = 4 x the message limit)")
        if not (math.isfinite(self.deploy_timeout_s) and self.deploy_timeout_s > 0):
            problems.append("deploy timeout must be a finite number of seconds > 0")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            problems.append(f"metrics port {self.metrics_port} is not in 0..65535")
        if problems:
            raise ConfigError("; ".join(problems))
