"""``faasmoe``: the umbrella command.

    faasmoe demo [--model DIR] [--nodes N] [--group-size G]   the whole path on loopback
    faasmoe split MODEL_DIR --out STORE [--group-size G] [--experts fp32|int8|int4]   checkpoint -> dense part + functions
    faasmoe bench SCENARIO [--quick] [--out DIR]              resources and latency against full-model baselines
    faasmoe router ...                                        same as faasmoe-router
    faasmoe node ...                                          same as faasmoe-node (started as its own program)
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["router"]:
        from faasmoe.router.cli.main import main as router_main
        return router_main(argv[1:])
    if argv[:1] == ["node"]:
        # the node is a separate program (node and router never import each other)
        from faasmoe.proto import NODE_PROGRAM
        os.execv(sys.executable, [sys.executable, "-m", NODE_PROGRAM, *argv[1:]])
    from faasmoe.router.cli.main import OneLineParser, parse, run_command
    parser = OneLineParser(prog="faasmoe", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    from faasmoe.router.cli import bench, demo; from faasmoe.router.store import split
    demo.add_arguments(sub.add_parser("demo", help="split a model, start local nodes, generate, compare"))
    bench.add_arguments(sub.add_parser("bench", help="measure memory, CPU and latency of deployments on a workload"))
    split.add_arguments(sub.add_parser("split", help="split a checkpoint into dense part + expert functions"))
    sub.add_parser("router", help="the router's commands (faasmoe-router --help)", add_help=False)
    sub.add_parser("node", help="run an edge node (faasmoe-node --help)", add_help=False)
    args = parse(parser, argv)
    return run_command({"demo": demo.run, "split": split.run, "bench": bench.run}[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
