"""``faasmoe-node`` / ``python -m faasmoe.node``: run an edge node.

Once the gRPC server listens, exactly one line goes to stdout (everything else is logged to stderr):

    FAASMOE_NODE_READY {"node_id": "...", "address": "HOST:PORT", "pid": N}

SIGINT / SIGTERM: stop accepting calls, let in-flight calls finish (grace period), release sessions, exit 0.
Exit 2: bad configuration; exit 3: startup failure (port in use, store dir locked or unwritable, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib.util
import logging
import os
import signal
import sys
import traceback
from typing import Callable, Sequence

from faasmoe.node.config import MIB, NodeConfig
from faasmoe.proto.errors import ConfigError, FaasmoeError
from faasmoe.proto.ready import NODE_READY, ready_line

log = logging.getLogger(__name__)
ENV_PREFIX = "FAASMOE_NODE_"
PROG = "faasmoe-node"

# An extension runs next to the gRPC server for the node's lifetime (mDNS advertiser, MQTT events, metrics
# endpoint): a callable taking the started NodeServer and returning an async context manager, entered
# after the server starts and before the READY line, exited before the server stops.
Extension = Callable[["NodeServer"], contextlib.AbstractAsyncContextManager]  # noqa: F821


def default_extensions(config: NodeConfig) -> list[Extension]:
    """Extensions the config asks for. Hook point for mDNS (config.mdns), MQTT (config.mqtt_url) and
    Prometheus metrics (config.metrics_port)."""
    extensions: list[Extension] = []
    if config.mdns:
        from faasmoe.node.mdns import advertised
        extensions.append(advertised)
    if config.metrics_port is not None:
        from faasmoe.node.metrics import metrics_extension
        extensions.append(metrics_extension(config))
    if config.mqtt_url:
        from faasmoe.node.telemetry import mqtt_extension
        extensions.append(mqtt_extension(config))      # a bad URL raises ConfigError here: exit 2
    return extensions


def tune_malloc() -> bool:
    """Make released sessions give their memory back (glibc only; call once, early, in the node process).

    glibc serves blocks below a *dynamic* mmap threshold (it grows up to 32 MiB) from its heaps, where freed
    weights stay resident: measured, RSS did not fall at all after releasing 4 sessions of 33 MiB. A fixed
    ``M_MMAP_THRESHOLD`` of 4 MiB sends every weight tensor through mmap (returned on free) while per-call
    tensors stay on the heap; ``M_TRIM_THRESHOLD`` 64 MiB keeps the heap from being trimmed and re-faulted on
    every call (measured: 256-row round trips 16.3 -> 12.4 ms); the runtime calls ``malloc_trim`` itself
    after each release.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 4 * MIB)) and bool(libc.mallopt(-1, 64 * MIB))   # MMAP_, TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: same format and exit code as ours
        raise ConfigError(f"{message}; see {PROG} --help")


def _mib(text: str) -> int:
    value = float(text)
    if not value > 0:
        raise ValueError("must be > 0")
    return int(value * MIB)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected 1/0, true/false, yes/no")


# flag, dest, type, metavar, help. Environment: FAASMOE_NODE_<FLAG> (dashes -> underscores, upper case).
_FLAGS = [
    ("--port", "port", int, "P", "TCP port to listen on; 0 picks a free one (default 0)"),
    ("--host", "host", str, "H", "address to listen on (default 127.0.0.1; 0.0.0.0 = every interface)"),
    ("--store-dir", "store_dir", str, "DIR", "function file store (default ~/.cache/faasmoe/node/<node-id>)"),
    ("--memory-budget-mb", "memory_budget_bytes", _mib, "M",
     "MiB of loaded sessions (default: the profile's, else half the RAM)"),
    ("--disk-budget-mb", "disk_budget_bytes", _mib, "D", "MiB of function files kept on disk (default: the profile's, else 16384)"),
    ("--overcommit", "overcommit", float, "X",
     "deploy up to memory budget x X; loaded sessions always stay within the budget (default 1.0)"),
    ("--node-id", "node_id", str, "ID", "node name in the mesh (default <hostname>-<random>)"),
    ("--threads", "threads", int, "T", "ONNX Runtime intra-op threads (default: the profile's, else all CPUs)"),
    ("--keep-alive-s", "keep_alive_s", float, "S",
     "release a session after S idle seconds; 0 = right after each call, inf = never (default: the "
     "profile's, else 30)"),
    ("--max-queue", "max_queue", int, "Q",
     "calls that may wait for a load or a free slot; more are refused with RESOURCE_EXHAUSTED (default 64)"),
    ("--max-message-mb", "max_message_bytes", _mib, "N", "gRPC message size limit in MiB (default 64)"),
    ("--profile", "profile", str, "NAME|PATH",
     "edge profile (shipped name or .toml path): its memory/disk budgets, threads and keep-alive become the "
     "defaults; explicit flags and environment win"),
    ("--mqtt", "mqtt_url", str, "URL", "MQTT broker for node events: mqtt://HOST[:PORT], or mqtts://USER@HOST[:PORT]?ca=CA.pem (TLS; password from $FAASMOE_MQTT_PASSWORD or USER:PASS@) (default: off)"),
    ("--metrics-port", "metrics_port", int, "P", "serve Prometheus metrics on this port (default: off)"),
    ("--max-concurrent-rpcs", "max_concurrent_rpcs", int, "N",
     "calls served at once, streams included; more are refused with RESOURCE_EXHAUSTED (default 256)"),
    ("--max-inflight-mb", "max_inflight_bytes", _mib, "M",
     "MiB of request frames held at once before decoding; more are refused with backpressure (default: 4 x "
     "--max-message-mb)"),
    ("--load-rss-factor", "load_rss_factor", float, "X",
     "a function whose load grows the node's RSS by more than X times its estimate (plus 16 MiB) is unloaded and "
     "refused (default 1.5)"),
    ("--deploy-timeout-s", "deploy_timeout_s", float, "S", "a deployment must arrive within S seconds (default 600)"),
    ("--join", "join_token", str, "TOKEN",
     "enrol in the cluster of this join token ('faasmoe-router init-cluster'), or of the token in @FILE; from then "
     "on the node serves mutual-TLS gRPC only (its identity stays in STORE/identity)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Run a faasmoe edge node: serves expert functions (ONNX) over gRPC.",
                     epilog=f"Every flag may also come from the environment as {ENV_PREFIX}<FLAG>, e.g. "
                            f"{ENV_PREFIX}MEMORY_BUDGET_MB=2048, {ENV_PREFIX}MDNS_INTERFACE=10.0.0.2,10.0.0.3, "
                            f"{ENV_PREFIX}NO_MDNS=1, {ENV_PREFIX}VERBOSE=1. Precedence: flag > environment > "
                            "profile > built-in default. On start one line goes to stdout: "
                            f'{NODE_READY}{{"node_id": ..., "address": "HOST:PORT", "pid": ...}}. '
                            "Exit codes: 0 after SIGINT/SIGTERM, 2 bad configuration, 3 startup failure.")
    for flag, dest, kind, metavar, text in _FLAGS:
        parser.add_argument(flag, dest=dest, type=kind, metavar=metavar, help=text)
    parser.add_argument("--mdns-interface", dest="mdns_interfaces", action="append", metavar="IP",
                        help="advertise on mDNS on this IPv4 address (repeatable; default: the host's choice)")
    parser.add_argument("--no-mdns", dest="no_mdns", action="store_const", const=True,
                        help="do not advertise on mDNS")
    parser.add_argument("--insecure", dest="insecure", action="store_const", const=True,
                        help="serve plaintext gRPC on a non-loopback --host (anyone on the network may call it); "
                             "without an identity the node otherwise listens in plaintext on loopback only")
    parser.add_argument("-v", "--verbose", dest="verbose", action="store_const", const=True,
                        help="debug logging, tracebacks on errors")
    return parser


def _env_fill(args: argparse.Namespace, environ) -> None:
    """Fill flags missing from the command line from FAASMOE_NODE_* variables."""
    specs = [(f, d, k) for f, d, k, _, _ in _FLAGS] + [
        ("--mdns-interface", "mdns_interfaces", lambda v: [s.strip() for s in v.split(",") if s.strip()]),
        ("--no-mdns", "no_mdns", _bool), ("--insecure", "insecure", _bool), ("--verbose", "verbose", _bool)]
    for flag, dest, kind in specs:
        name = ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()
        if getattr(args, dest) is None and name in environ:
            try:
                setattr(args, dest, kind(environ[name]))
            except ValueError as err:
                raise ConfigError(f"{name}={environ[name]!r} is not valid for {flag}: {err}") from None


def _profile_defaults(name: str) -> dict:
    if importlib.util.find_spec("faasmoe.node.profiles") is None:
        raise ConfigError(f"--profile {name}: this install has no profile loader (faasmoe.node.profiles); "
                          "give --memory-budget-mb and --threads instead")
    from faasmoe.node.profiles import load_profile

    profile = load_profile(name)
    values = {key: value for key in ("memory_budget_bytes", "disk_budget_bytes", "threads", "keep_alive_s")
              if (value := getattr(profile, key, None)) is not None}
    if not values.get("disk_budget_bytes"):        # 0 in a profile: keep the node's default
        values.pop("disk_budget_bytes", None)
    return values | {"profile": getattr(profile, "name", name)}


def config_from_args(argv: Sequence[str] | None = None, environ=None) -> tuple[NodeConfig, bool]:
    """Parse flags (and the environment) into a NodeConfig. Returns (config, verbose)."""
    args = build_parser().parse_args(argv)
    _env_fill(args, os.environ if environ is None else environ)
    values = {dest: getattr(args, dest) for _, dest, _, _, _ in _FLAGS if getattr(args, dest) is not None}
    if args.profile:
        defaults = _profile_defaults(args.profile)
        values = defaults | values | {"profile": defaults["profile"]}
    if args.mdns_interfaces:
        values["mdns_interfaces"] = tuple(args.mdns_interfaces)
    values["mdns"] = not args.no_mdns
    values["insecure"] = bool(args.insecure)
    return NodeConfig(**values), bool(args.verbose)


def _print_ready(node) -> None:
    line = ready_line(NODE_READY, {"node_id": node.node_id, "address": node.address, "pid": os.getpid(),
                                   "tls": node.tls is not None,
                                   "cert": node.tls.identity.fingerprint if node.tls else None})
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def serve(config: NodeConfig, extensions: Sequence[Extension] = ()) -> int:
    """Run the node until SIGINT/SIGTERM; returns the exit code."""
    from faasmoe.node.server import NodeServer

    loop, stop = asyncio.get_running_loop(), asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: shutting down", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    node = NodeServer(config)
    await node.start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            for extension in extensions:
                await stack.enter_async_context(extension(node))
            _print_ready(node)
            await stop.wait()
    finally:
        await node.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config, verbose = config_from_args(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from faasmoe.node.cgroup import fit_to_container, memory_limit_bytes
    try:
        config = fit_to_container(config, memory_limit_bytes())    # never past the container's memory limit
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not tune_malloc():
        log.warning("could not set malloc's mmap threshold (not glibc?): RSS may stay high after releases")
    try:
        return asyncio.run(serve(config, default_extensions(config)))
    except (FaasmoeError, OSError) as err:
        if verbose:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 3
    except KeyboardInterrupt:
        return 0
    except Exception as err:  # noqa: BLE001 - a bug, but still one line unless -v
        if verbose:
            traceback.print_exc()
        print(f"error: node failed unexpectedly: {type(err).__name__}: {err} (run with -v for the traceback)",
              file=sys.stderr)
        return 3
