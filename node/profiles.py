"""Edge device profiles: the defaults a node runs with on a given device (stdlib only: no torch, no router).

A profile is a TOML file; the shipped ones live in the package ``faasmoe.edge_profiles``::

    name = "rpi4-4gb"
    description = "Raspberry Pi 4 Model B, 4 GB RAM, 4x Cortex-A72"
    memory_budget_mb = 2560        # MiB of expert functions resident at once
    threads = 3                    # ORT intra-op threads
    keep_alive_s = 60              # idle seconds before a function's session is released
    disk_budget_mb = 8192          # MiB of ONNX files kept on disk (warm cache)

    [container]                    # docker compose limits for the node container
    mem_limit = "3g"
    cpus = 4.0

``load_profile("rpi4-4gb")`` reads a shipped profile; ``load_profile("./my-board.toml")`` (a path: ends in
``.toml`` or contains ``/``) reads any file. Every problem is a one-line :class:`ConfigError` naming the file.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from faasmoe.proto.errors import ConfigError

PACKAGE = "faasmoe.edge_profiles"
MIB = 1 << 20
_MEM_LIMIT = re.compile(r"^([0-9]+)([bkmg])b?$", re.IGNORECASE)   # docker compose byte values
_UNIT_BYTES = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    memory_budget_bytes: int       # bytes of expert functions the node may hold in memory
    disk_budget_bytes: int         # bytes of ONNX files kept on disk
    threads: int                   # ONNX Runtime intra-op threads per session
    keep_alive_s: float            # seconds an idle function stays loaded
    container_mem_limit: str       # docker compose mem_limit, e.g. "3g"
    container_cpus: float          # docker compose cpus, e.g. 4.0


# field -> (types accepted, smallest legal value, what it is)
_TOP = {
    "name": (str, None, "a non-empty string"),
    "description": (str, None, "a string"),
    "memory_budget_mb": (int, 1, "an integer >= 1 (MiB)"),
    "threads": (int, 1, "an integer >= 1"),
    "keep_alive_s": ((int, float), 0, "a number >= 0 (seconds)"),
    "disk_budget_mb": (int, 0, "an integer >= 0 (MiB)"),
}
_CONTAINER = {
    "mem_limit": (str, None, 'a docker byte value such as "3g" or "2560m"'),
    "cpus": ((int, float), 0, "a number > 0"),
}


def list_profiles() -> list[str]:
    """Names of the shipped profiles, sorted."""
    return sorted(p.name[:-len(".toml")] for p in resources.files(PACKAGE).iterdir()
                  if p.name.endswith(".toml") and p.is_file())


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name, or the TOML file at a path (ends in ``.toml`` or contains ``/``)."""
    if name_or_path.endswith(".toml") or "/" in name_or_path or os.sep in name_or_path:
        where = str(name_or_path)
        try:
            text = Path(name_or_path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: cannot read profile ({exc.__class__.__name__}: {exc})") from None
    else:
        resource = resources.files(PACKAGE) / f"{name_or_path}.toml"
        where = f"{PACKAGE}/{name_or_path}.toml"
        if not name_or_path or not resource.is_file():
            raise ConfigError(f"unknown profile {name_or_path!r}: known profiles are "
                              f"{', '.join(list_profiles())} (or pass a path to a .toml file)")
        text = resource.read_text(encoding="utf-8")
    return parse_profile(text, where)


def parse_profile(text: str, where: str) -> Profile:
    """Check and convert the TOML ``text`` read from ``where`` (used in error messages)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML ({exc})") from None
    container = data.get("container")
    if not isinstance(container, dict):
        raise ConfigError(f"{where}: missing table [container] with mem_limit and cpus")
    top = _fields(data, _TOP, where, "", extra={"container"})
    box = _fields(container, _CONTAINER, where, "container.")
    if not top["name"].strip():
        raise ConfigError(f"{where}: name must be a non-empty string")
    match = _MEM_LIMIT.match(box["mem_limit"])
    if not match:
        raise ConfigError(f"{where}: container.mem_limit must be {_CONTAINER['mem_limit'][2]}, "
                          f"got {box['mem_limit']!r}")
    if box["cpus"] <= 0:
        raise ConfigError(f"{where}: container.cpus must be a number > 0, got {box['cpus']!r}")
    budget_bytes = top["memory_budget_mb"] * MIB
    limit_bytes = int(match.group(1)) * _UNIT_BYTES[match.group(2).lower()]
    if limit_bytes <= budget_bytes:
        raise ConfigError(f"{where}: container.mem_limit {box['mem_limit']!r} must exceed memory_budget_mb "
                          f"({top['memory_budget_mb']} MiB) to leave room for the node process itself")
    return Profile(
        name=top["name"],
        description=top["description"],
        memory_budget_bytes=budget_bytes,
        disk_budget_bytes=top["disk_budget_mb"] * MIB,
        threads=top["threads"],
        keep_alive_s=float(top["keep_alive_s"]),
        container_mem_limit=box["mem_limit"],
        container_cpus=float(box["cpus"]),
    )


def _fields(table: dict, spec: dict, where: str, prefix: str, extra: set[str] = frozenset()) -> dict:
    unknown = sorted(set(table) - set(spec) - extra)
    if unknown:
        raise ConfigError(f"{where}: unknown field {prefix}{unknown[0]} (expected: "
                          f"{', '.join(prefix + k for k in spec)})")
    out = {}
    for key, (types, minimum, what) in spec.items():
        if key not in table:
            raise ConfigError(f"{where}: missing field {prefix}{key} ({what})")
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ConfigError(f"{where}: {prefix}{key} must be {what}, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{where}: {prefix}{key} must be {what}, got {value!r}")
        out[key] = value
    return out
