"""``faasmoe-router init-cluster | tokens | enroll-server``: the cluster's identity.

    faasmoe-router init-cluster --dir DIR --enroll-address HOST:PORT     a CA, the router's identity, a join token
    faasmoe-router tokens create|list|revoke --dir DIR                   more join tokens, or stop one
    faasmoe-router enroll-server --dir DIR                               serve enrolment (serve --cluster does too)

A node joins with ``faasmoe-node --join TOKEN``; routers use the folder with ``--cluster DIR``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

from faasmoe.proto.errors import ConfigError
from faasmoe.router.control.cluster import Cluster
from faasmoe.router.control.directory import parse_address

DEFAULT_TOKEN_TTL_S = 24 * 3600.0


def add_arguments(sub) -> None:
    init = sub.add_parser("init-cluster", help="create a cluster CA and the router's identity; prints a join token")
    init.add_argument("--dir", required=True, help="folder for the CA, the router's key and the token list")
    init.add_argument("--enroll-address", required=True, metavar="HOST:PORT",
                      help="where nodes reach the enrolment endpoint (serve --cluster or enroll-server listen there)")
    init.add_argument("--token-ttl-s", type=float, default=DEFAULT_TOKEN_TTL_S,
                      help="lifetime of the first join token (default 86400)")
    init.add_argument("--token-file", default=None, metavar="FILE",
                      help="also write the join token to FILE (mode 0600; nodes read it with --join @FILE)")
    init.add_argument("--if-missing", action="store_true",
                      help="keep a cluster that exists in --dir and only issue a new token (for scripts and compose)")
    tokens = sub.add_parser("tokens", help="create, list or revoke join tokens")
    actions = tokens.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="a new join token (printed once)")
    create.add_argument("--ttl-s", type=float, default=DEFAULT_TOKEN_TTL_S, help="lifetime (default 86400)")
    listing = actions.add_parser("list", help="tokens (ids, expiry, revoked) and the nodes enrolled")
    listing.add_argument("--json", action="store_true")
    revoke = actions.add_parser("revoke", help="refuse a token from now on, and renewals of nodes that joined with it")
    revoke.add_argument("token_id")
    forget = actions.add_parser("forget-node", help="free a node id (its renewals stop; it may enrol again)")
    forget.add_argument("node_id")
    for q in (create, listing, revoke, forget):
        q.add_argument("--dir", required=True, help="the cluster folder (init-cluster --dir)")
    server = sub.add_parser("enroll-server", help="serve node enrolment and renewal over HTTPS until stopped")
    server.add_argument("--dir", required=True, help="the cluster folder (init-cluster --dir)")
    server.add_argument("--listen", default=None, metavar="HOST:PORT",
                        help="address to bind (default 0.0.0.0 and the port of the enrolment address)")


def _ttl(seconds: float) -> float:
    if not 0 < seconds <= 366 * 86400:
        raise ConfigError("a token lifetime is > 0 s and at most a year")
    return seconds


def init_cluster(args) -> int:
    if args.if_missing and (Path(args.dir) / "ca.crt").exists():
        cluster = Cluster(args.dir)
    else:
        cluster = Cluster.init(args.dir, parse_address(args.enroll_address))
    token = cluster.create_token(_ttl(args.token_ttl_s))
    if args.token_file:
        path = Path(args.token_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token.encode() + "\n")
        os.chmod(path, 0o600)
    print(f"cluster CA sha256 {token.ca_sha256}")
    print(f"join token (valid until {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(token.expires))}):")
    print(token.encode())
    print(f"nodes join with: faasmoe-node --join TOKEN; routers use --cluster {args.dir}")
    return 0


def tokens(args) -> int:
    cluster = Cluster(args.dir)
    if args.action == "create":
        token = cluster.create_token(_ttl(args.ttl_s))
        print(token.encode())
    elif args.action == "revoke":
        cluster.revoke(args.token_id)
        print(f"token {args.token_id} revoked: new enrolments and renewals with it are refused")
    elif args.action == "forget-node":
        cluster.forget_node(args.node_id)
        print(f"node {args.node_id} forgotten: its renewals are refused; it may enrol again with a token")
    else:
        listing, nodes = cluster.tokens(), cluster.nodes()
        if args.json:
            print(json.dumps({"tokens": listing, "nodes": {n: {k: v for k, v in d.items() if "sha256" not in k}
                                                           for n, d in nodes.items()}}, indent=1))
            return 0
        print(f"{'token':14} {'expires (UTC)':18} state")
        for token_id, t in sorted(listing.items(), key=lambda kv: kv[1]["expires"]):
            state = "revoked" if t["revoked"] else "expired" if t["expires"] < time.time() else "valid"
            print(f"{token_id:14} {time.strftime('%Y-%m-%d %H:%M', time.gmtime(t['expires'])):18} {state}")
        for node_id, n in sorted(nodes.items()):
            print(f"node {node_id}: joined with token {n['token']}")
    return 0


def enroll_server(args) -> int:
    from faasmoe.router.control import enroll_server as es
    cluster = Cluster(args.dir)
    host, port = cluster.listen_address(args.listen)
    server = es.enroll_server(cluster, host, port)

    async def run():
        task, bound = await es.start(server)
        print(f"faasmoe-router enrolment for cluster {args.dir} on https://{host}:{bound} "
              f"(nodes dial {cluster.address})", flush=True)
        await task
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    asyncio.run(run())
    return 0
