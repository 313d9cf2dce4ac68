"""``faasmoe-router``: generate through the mesh, place functions on nodes, show the mesh.

Every flag can also come from an environment variable ``FAASMOE_ROUTER_<FLAG>`` (e.g.
``FAASMOE_ROUTER_NODES=10.0.0.2:50051,10.0.0.3:50051``), handy in compose files.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from faasmoe.proto.errors import ConfigError, FaasmoeError

log = logging.getLogger(__name__)
ENV_PREFIX = "FAASMOE_ROUTER_"


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
ROUTER_ID_HELP = ("this router's owner id on the nodes: a node keeps a function while any owner holds a lease on it "
                  "(default: HOSTNAME/MODEL_ID, shared by this host's runs for the store; give routers that run at "
                  "the same time their own)")


class OneLineParser(argparse.ArgumentParser):
    """argparse's own errors as every faasmoe error: ``error: …`` on one line (and exit 2), not usage text."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message}; see {self.prog} --help")


def parse(parser: argparse.ArgumentParser, argv):
    """``parser.parse_args(argv)``, or the one-line error and exit code 2 (as :func:`run_command` does)."""
    try:
        return parser.parse_args(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def discover_mode(text: str) -> str | None:
    """``--discover`` alone is mDNS; ``--discover dns-srv:NAME[@HOST[:PORT]]`` resolves a DNS SRV name (Kubernetes);
    from the environment, 1/true/… mean mDNS and 0/false/… none."""
    value = text.strip()
    if value.lower() in ("mdns",) + TRUE:
        return "mdns"
    if value.lower() in FALSE:
        return None
    if value.startswith("dns-srv:"):
        from faasmoe.router.control.dns_srv import parse_spec
        try:
            return str(parse_spec(value))
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    raise argparse.ArgumentTypeError(f"--discover {value!r}: give no value (mDNS), mdns, or dns-srv:SRV-NAME[@HOST[:PORT]]")


def _from_env(action: argparse.Action, name: str, text: str):
    try:
        if isinstance(action, argparse._StoreTrueAction):
            if text.strip().lower() not in TRUE + FALSE:
                raise ValueError("expected 1/0, true/false, yes/no or on/off")
            return text.strip().lower() in TRUE
        convert = action.type or str
        if isinstance(action, argparse._AppendAction):
            return [convert(part.strip()) for part in text.split(",") if part.strip()]
        return convert(text)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise ConfigError(f"{name}={text!r} is not valid for {action.option_strings[0]}: {exc}") from None


def apply_env_defaults(parser: argparse.ArgumentParser, environ=None) -> None:
    """Every flag of every subcommand may come from ``FAASMOE_ROUTER_<FLAG>``; the command line wins."""
    environ = os.environ if environ is None else environ
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                apply_env_defaults(sub, environ)
            continue
        if not action.option_strings or action.dest in ("help", "verbose"):
            continue
        name = ENV_PREFIX + action.dest.upper()
        if name in environ:
            action.default = _from_env(action, name, environ[name])
            action.required = False


def add_mesh_arguments(p: argparse.ArgumentParser, store: bool = True) -> None:
    if store:
        p.add_argument("--store", required=True, help="store written by 'faasmoe split'")
    p.add_argument("--nodes", default="",
                   help="static node list HOST:PORT[,HOST:PORT...]")
    p.add_argument("--discover", nargs="?", const="mdns", default=None, type=discover_mode, metavar="dns-srv:NAME",
                   help="find nodes over mDNS (_faasmoe._tcp.local.), or with dns-srv:NAME[@HOST[:PORT]] from the DNS SRV "
                        "records of NAME, e.g. dns-srv:_grpc._tcp.faasmoe-nodes.NAMESPACE.svc.cluster.local (Kubernetes)")
    p.add_argument("--mdns-interface", action="append", default=None,
                   help="IPv4 address of an interface to browse mDNS on (repeatable; default: all)")
    p.add_argument("--discover-wait-s", type=float, default=3.0,
                   help="how long to wait for mDNS or DNS answers before planning (default 3)")
    p.add_argument("--dns-srv-interval-s", type=float, default=5.0,
                   help="with --discover dns-srv:NAME: how often NAME is resolved again (default 5)")
    p.add_argument("--cluster", default=None, metavar="DIR",
                   help="the cluster folder ('faasmoe-router init-cluster'): mutual TLS to every node, and a "
                        "discovered node is used only when its certificate matches its advertisement (default: "
                        "plaintext, for loopback development)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-batch", type=int, default=32,
                   help="sequences decoding together in one step at most (default 32)")
    p.add_argument("--max-step-tokens", type=int, default=512,
                   help="tokens fed per step, all sequences together (default 512)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens one sequence prefills per step at most: long prompts are prefilled over "
                        "several steps while running decodes keep stepping (default 256)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests queued beyond the batch (>= 1); more get 503 with Retry-After (default 256)")
    p.add_argument("--step-timeout-s", type=float, default=30.0,
                   help="deadline of one step across the mesh, recovery included (default 30)")
    p.add_argument("--reserved-slots", type=int, default=1,
                   help="with tenants: batch places kept for a tenant with nothing running, so a flooding tenant "
                        "cannot fill the batch to the brim (default 1)")
    p.add_argument("--kv-cache-mb", type=float, default=4096,
                   help="KV cache all running sequences may reserve together; a request reserves prompt + max_tokens "
                        "when it joins the batch and waits while that does not fit. The cache has a slot per "
                        "--max-batch place; memory is backed as tokens are written (default 4096)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="intra-op threads of the router's dense part (default: torch's, one per core; with "
                        "--dense-dtype int8 the dense products run on ONNX Runtime's pool of every core and torch "
                        "keeps one thread)")


def add_dense_dtype_argument(p: argparse.ArgumentParser, *aliases: str, full_model: bool = False) -> None:
    if full_model:
        p.add_argument("--dense-dtype", *aliases, dest="dense_dtype", choices=["float32", "bfloat16"],
                       default="float32", help="dtype of the whole model: float32 (default) or bfloat16 (transformers' "
                                               "own bfloat16 model)")
        return
    p.add_argument("--dense-dtype", *aliases, dest="dense_dtype", choices=["float32", "bfloat16", "int8"],
                   default="float32",
                   help="the router's dense part (attention and shared-expert projections, lm_head, embeddings): "
                        "float32 (default, exact), bfloat16 (about half the memory) or int8 (a quarter of the bytes "
                        "and the fastest on CPUs without bfloat16 instructions); both NOT exact, responses say so")


def add_replicas_argument(p: argparse.ArgumentParser) -> None:
    from faasmoe.router.control.replicas import DEFAULT_MODE as DEFAULT_REPLICAS
    p.add_argument("--replicas", choices=["1", "2", "auto"], default=DEFAULT_REPLICAS,
                   help="copies of each expert function: 1 (one copy; a lost node's functions are re-placed on the "
                        "survivors), 2 (a second copy of hot functions while memory is left: what place and generate "
                        "did before), auto (one copy, and a second one only while a function's calls are measured "
                        "queueing at its node, within a quarter of each node's capacity; only serve measures, so "
                        f"place and generate deploy one copy). Default {DEFAULT_REPLICAS}")
    p.add_argument("--no-replicas", dest="replicas", action="store_const", const="1", help=argparse.SUPPRESS)


def add_mesh_engine_arguments(p: argparse.ArgumentParser) -> None:
    """What only an engine over the mesh has (generate, serve)."""
    p.add_argument("--frame-timeout-s", type=float, default=10.0,
                   help="a node's reply to one frame is awaited this long; then another replica is tried, or the "
                        "node's functions are re-placed (default 10)")
    p.add_argument("--degraded", action="store_true",
                   help="opt-in, NOT exact: when no replica of a needed expert answers, drop that expert instead of "
                        "failing the step; responses list what was dropped (default: fail with an explicit error)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="faasmoe-router", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)

    gen = sub.add_parser("generate", help="generate text through the mesh")
    add_mesh_arguments(gen)
    gen.add_argument("--prompt", action="append", required=True,
                     help="prompt text (repeat for a batch of prompts)")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    add_engine_arguments(gen)
    add_mesh_engine_arguments(gen)
    add_dense_dtype_argument(gen)
    add_replicas_argument(gen)
    gen.add_argument("--router-id", default=None, help=ROUTER_ID_HELP)
    gen.add_argument("--warm", action="store_true",
                     help="load the placed functions on their nodes before generating (no cold starts; each node "
                          "loads the hottest functions that fit its memory budget)")

    place = sub.add_parser("place", help="plan where functions go (table) and deploy the difference")
    add_mesh_arguments(place)
    place.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    add_replicas_argument(place)
    place.add_argument("--router-id", default=None, help=ROUTER_ID_HELP)

    serve = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API and keep it placed on "
                                         "the live mesh (long-running)")
    add_mesh_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address of the HTTP API (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port of the HTTP API (default 8000; 0 = any free)")
    serve.add_argument("--model-name", default=None,
                       help="the model id clients ask for (default: the store directory's name)")
    add_engine_arguments(serve)
    add_mesh_engine_arguments(serve)
    serve.add_argument("--router-id", default=None, help=ROUTER_ID_HELP)
    serve.add_argument("--tenants", default=None, metavar="FILE",
                       help="tenants file (keys, limits, weights; 'faasmoe-router tenants'); reloaded on SIGHUP or "
                            "when it changes. Without it the server is open to local clients only, as tenant 'default'")
    serve.add_argument("--tenants-poll-s", type=float, default=1.0,
                       help="how often the tenants file is checked for changes (default 1; SIGHUP reloads at once)")
    serve.add_argument("--tenant", default=None, metavar="NAME",
                       help="private mode: serve this tenant of --tenants only (one router per tenant, sharing the "
                            "nodes' functions)")
    serve.add_argument("--usage-log", default=None, metavar="FILE",
                       help="append JSON lines of finished requests and memory attributions (for billing; the file "
                            "can be rotated at any time)")
    serve.add_argument("--usage-poll-s", type=float, default=5.0,
                       help="how often the nodes' loaded memory is read and attributed to tenants (default 5)")
    add_dense_dtype_argument(serve)
    add_replicas_argument(serve)
    serve.add_argument("--replica-interval-s", type=float, default=10.0,
                       help="with --replicas auto: how often the nodes' slot waits are surveyed (default 10)")
    serve.add_argument("--warm", action="store_true", help="load the placed functions before serving")
    serve.add_argument("--mqtt", default=None, help="MQTT broker to read node telemetry from: mqtt://HOST[:PORT] or mqtts://USER@HOST[:PORT]?ca=CA.pem "
                            "(password from $FAASMOE_MQTT_PASSWORD)")
    serve.add_argument("--settle-s", type=float, default=1.0,
                       help="wait this long after a mesh change before re-placing (default 1)")

    full = sub.add_parser("serve-full", help="serve a whole model in this process over the same API (the "
                                             "full-model baseline of the benchmarks; no mesh)")
    full.add_argument("--model", required=True, help="Hugging Face MoE model directory (a supported family)")
    add_dense_dtype_argument(full, "--dtype", full_model=True)
    full.add_argument("--host", default="127.0.0.1", help="address of the HTTP API (default 127.0.0.1)")
    full.add_argument("--port", type=int, default=8000, help="port of the HTTP API (default 8000; 0 = any free)")
    full.add_argument("--model-name", default=None, help="the model id clients ask for (default: the directory's name)")
    full.add_argument("--tenants", default=None, metavar="FILE", help="tenants file, as for serve")
    full.add_argument("--tenant", default=None, metavar="NAME", help="serve this tenant only, as for serve")
    full.add_argument("--usage-log", default=None, metavar="FILE")
    add_engine_arguments(full)

    serve.add_argument("--enroll-listen", default=None, metavar="HOST:PORT",
                       help="with --cluster: serve node enrolment here too (default 0.0.0.0 and the port of the "
                            "cluster's enrolment address; 'off' = not here)")
    from faasmoe.router.cli import cluster as cluster_cli
    from faasmoe.router.cli import tenants as tenants_cli
    tenants_cli.add_arguments(sub)
    cluster_cli.add_arguments(sub)

    status = sub.add_parser("status", help="nodes, profiles, budgets, functions held and loaded, health")
    add_mesh_arguments(status, store=False)
    status.add_argument("--store", default=None, help="name functions after this store's manifest")
    status.add_argument("--mqtt", default=None, metavar="URL",
                        help="also read node telemetry from this MQTT broker (mqtt://HOST:PORT): nodes seen there, "
                             "offline ones included, and recent load/evict events; alone, it needs no --nodes")
    status.add_argument("--mqtt-wait-s", type=float, default=2.0,
                        help="how long to collect MQTT messages at most (default 2)")
    status.add_argument("--heat", action="store_true",
                        help="show the expert heat table: rows per layer and expert in the nodes' heat window")
    status.add_argument("--plot", default=None, metavar="FILE", help="write the expert heat as a PNG heatmap")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        apply_env_defaults(parser)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = parse(parser, argv)
    if args.command == "tenants":
        from faasmoe.router.cli import tenants as tenants_cli
        return run_command(tenants_cli.run, args)
    if args.command in ("init-cluster", "tokens", "enroll-server"):
        from faasmoe.router.cli import cluster as cluster_cli
        return run_command(getattr(cluster_cli, args.command.replace("-", "_")), args)
    from faasmoe.router.cli import commands
    return run_command(getattr(commands, args.command.replace("-", "_")), args)


def run_command(command, args) -> int:
    """Run a parsed subcommand the way every faasmoe CLI does: ``error: …`` on one line and exit 2 (bad
    configuration) or 1 (anything else faasmoe reports); a traceback only with ``-v``."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return command(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FaasmoeError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
