"""``faasmoe-router tenants add|list|remove|admin-key --file FILE``: manage the tenants file. A new key is
printed once and only its sha256 is stored."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
from pathlib import Path

from faasmoe.proto.errors import ConfigError
from faasmoe.router.tenancy.config import NAME, Tenant, TenantsConfig, hash_key, load_tenants, new_key, save_tenants


def add_arguments(sub) -> None:
    p = sub.add_parser("tenants", help="add, list and remove tenants (API keys, limits, weights) in a tenants file")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="add a tenant; prints its new API key once")
    add.add_argument("name")
    add.add_argument("--weight", type=float, default=1.0, help="share of the mesh under contention (default 1)")
    add.add_argument("--max-concurrent", type=int, default=0, help="requests in flight at once (0 = no limit)")
    add.add_argument("--tokens-per-minute", type=int, default=0,
                     help="prompt + completion tokens per minute (0 = no limit)")
    add.add_argument("--max-tokens-per-request", type=int, default=0,
                     help="prompt + max_tokens of one request (0 = the model's context)")
    listing = actions.add_parser("list", help="the tenants and their limits (never keys)")
    remove = actions.add_parser("remove", help="remove a tenant (its key stops working at the next reload)")
    remove.add_argument("name")
    admin = actions.add_parser("admin-key", help="create or replace the admin key of GET /v1/usage; prints it once")
    for q in (add, listing, remove, admin):
        q.add_argument("--file", required=True, help="the tenants file (TOML; created by 'add' if missing)")
    listing.add_argument("--json", action="store_true")


def _load(path: Path, create: bool) -> TenantsConfig:
    if not path.exists():
        if create:
            return TenantsConfig()
        raise ConfigError(f"{path}: no such tenants file ('faasmoe-router tenants add NAME --file {path}' makes one)")
    return load_tenants(path)


def run(args) -> int:
    path = Path(args.file)
    if args.action == "list":
        return _run(args, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:     # one writer at a time: no lost update
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _run(args, path)


def _run(args, path: Path) -> int:
    config = _load(path, create=args.action in ("add", "admin-key"))
    if args.action == "list":
        rows = [dataclasses.asdict(t) | {"key_sha256": t.key_sha256[:12] + "…"} for t in config.tenants.values()]
        if args.json:
            print(json.dumps({"tenants": rows, "admin_key": bool(config.admin_key_sha256)}))
        else:
            print(f"{'tenant':<20} {'weight':>6} {'max_concurrent':>14} {'tokens/min':>10} {'max_tokens/req':>14}")
            for t in config.tenants.values():
                print(f"{t.name:<20} {t.weight:>6g} {t.max_concurrent or '-':>14} {t.tokens_per_minute or '-':>10} "
                      f"{t.max_tokens_per_request or '-':>14}")
            print(f"admin key: {'set' if config.admin_key_sha256 else 'not set'}")
        return 0
    if args.action == "remove":
        if args.name not in config.tenants:
            raise ConfigError(f"{path}: no tenant {args.name!r}")
        tenants = {n: t for n, t in config.tenants.items() if n != args.name}
        save_tenants(path, dataclasses.replace(config, tenants=tenants))
        print(f"removed tenant {args.name!r}")
        return 0
    key = new_key()
    if args.action == "admin-key":
        save_tenants(path, dataclasses.replace(config, admin_key_sha256=hash_key(key)))
        print(key)
        return 0
    if not NAME.match(args.name):
        raise ConfigError(f"tenant name {args.name!r}: 1-64 letters, digits, '.', '_' or '-'")
    if args.name in config.tenants:
        raise ConfigError(f"{path}: tenant {args.name!r} exists; remove it first to give it a new key")
    if not (0 < args.weight < math.inf) or min(args.max_concurrent, args.tokens_per_minute,
                                                 args.max_tokens_per_request) < 0:
        raise ConfigError("--weight must be > 0 and the limits >= 0 (0 = no limit)")
    tenant = Tenant(args.name, hash_key(key), args.weight, args.max_concurrent, args.tokens_per_minute,
                    args.max_tokens_per_request)
    save_tenants(path, dataclasses.replace(config, tenants={**config.tenants, args.name: tenant}))
    print(key)
    return 0
