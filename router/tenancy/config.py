"""The tenants file (TOML): who may call the server, with which key, limits and scheduling weight.

    admin_key_sha256 = "…"            # optional: the key of GET /v1/usage

    [tenants.alice]
    key_sha256 = "…"                  # sha256 of the tenant's API key; the key itself is never stored
    weight = 2.0                      # share of the mesh under contention (weighted-fair scheduling)
    max_concurrent = 8                # requests running or waiting at once (0 = no limit)
    tokens_per_minute = 60000         # prompt + completion tokens per minute (0 = no limit)
    max_tokens_per_request = 1024     # prompt + max_tokens of one request (0 = the model's context)

Keys are 256-bit random strings (``fmk-…``), so a plain sha256 is enough to store them; :func:`new_key` makes
one and :func:`hash_key` hashes what a client presents. A malformed file is a ConfigError naming the file, the
tenant and the field.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import secrets
import tempfile
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from faasmoe.proto.errors import ConfigError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
KEY_PREFIX = "fmk-"


@dataclass(frozen=True)
class Tenant:
    name: str
    key_sha256: str
    weight: float = 1.0
    max_concurrent: int = 0              # 0 = no limit
    tokens_per_minute: int = 0           # 0 = no limit
    max_tokens_per_request: int = 0      # 0 = the model's context


@dataclass(frozen=True)
class TenantsConfig:
    tenants: dict[str, Tenant] = field(default_factory=dict)
    admin_key_sha256: str = ""

    def by_key(self, key: str) -> Tenant | None:
        digest = hash_key(key)
        for tenant in self.tenants.values():
            if secrets.compare_digest(tenant.key_sha256, digest):
                return tenant
        return None

    def is_admin(self, key: str) -> bool:
        return bool(self.admin_key_sha256) and secrets.compare_digest(self.admin_key_sha256, hash_key(key))


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _tenant(path: Path, name: str, raw) -> Tenant:
    where = f"{path}: tenant {name!r}"
    if not NAME.match(name):
        raise ConfigError(f"{where}: names are 1-64 letters, digits, '.', '_' or '-'")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table [tenants.{name}]")
    unknown = set(raw) - {f for f in Tenant.__dataclass_fields__ if f != "name"}
    if unknown:
        raise ConfigError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    key = raw.get("key_sha256", "")
    if not isinstance(key, str) or not HEX64.match(key):
        raise ConfigError(f"{where}: key_sha256 must be 64 lowercase hex digits (add tenants with "
                          "'faasmoe-router tenants add')")
    weight = raw.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (0 < weight < math.inf):
        raise ConfigError(f"{where}: weight must be a number > 0, got {weight!r}")
    limits = {}
    for name_ in ("max_concurrent", "tokens_per_minute", "max_tokens_per_request"):
        value = raw.get(name_, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}: {name_} must be an integer >= 0 (0 = no limit), got {value!r}")
        limits[name_] = value
    return Tenant(name, key, float(weight), **limits)


def load_tenants(path: str | Path) -> TenantsConfig:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the tenants file ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    unknown = set(raw) - {"tenants", "admin_key_sha256"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key {sorted(unknown)[0]!r}")
    admin = raw.get("admin_key_sha256", "")
    if admin and (not isinstance(admin, str) or not HEX64.match(admin)):
        raise ConfigError(f"{path}: admin_key_sha256 must be 64 lowercase hex digits")
    tenants_raw = raw.get("tenants", {})
    if not isinstance(tenants_raw, dict):
        raise ConfigError(f"{path}: 'tenants' must be a table of [tenants.NAME] tables")
    tenants = {name: _tenant(path, name, value) for name, value in tenants_raw.items()}
    digests = [t.key_sha256 for t in tenants.values()]
    if len(set(digests)) != len(digests):
        raise ConfigError(f"{path}: two tenants share one key")
    return TenantsConfig(tenants, admin)


def save_tenants(path: str | Path, config: TenantsConfig) -> None:
    """Write atomically (a reader never sees half a file), keeping the file's mode (new files: 0644, since only
    hashes are stored and a server may run as another user)."""
    import tomli_w
    path = Path(path)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    doc: dict = {}
    if config.admin_key_sha256:
        doc["admin_key_sha256"] = config.admin_key_sha256
    doc["tenants"] = {name: {k: v for k, v in asdict(t).items() if k != "name"} for name, t in config.tenants.items()}
    text = "# faasmoe tenants: API keys are stored as sha256 only (faasmoe-router tenants --help)\n" + tomli_w.dumps(doc)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
