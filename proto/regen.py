"""Regenerate the committed gRPC/protobuf code from ``faasmoe.proto``.

    python -m faasmoe.proto.regen           # rewrite faasmoe_pb2.py and faasmoe_pb2.pyi
    python -m faasmoe.proto.regen --check   # exit 1 when the committed files are stale (CI)

Uses protoc's virtual include path (``-Ifaasmoe/proto=<dir>``) so the generated imports are absolute
(``from faasmoe.proto import faasmoe_pb2``) with no hand edits. Needs ``grpcio-tools`` (dev extra). No gRPC
stubs are generated: :mod:`faasmoe.proto.methods` is the one method table, for both sides.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
GENERATED = ("faasmoe_pb2.py", "faasmoe_pb2.pyi")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # dev-only dependency

    args = [
        "protoc",
        f"-Ifaasmoe/proto={PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        "faasmoe/proto/faasmoe.proto",
    ]
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    args.insert(1, f"-I{include}")
    if protoc.main(args) != 0:
        raise SystemExit("error: protoc failed on faasmoe.proto")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        produced = Path(tmp) / "faasmoe" / "proto"
        stale = [n for n in GENERATED if not (PROTO_DIR / n).exists()
                 or not filecmp.cmp(produced / n, PROTO_DIR / n, shallow=False)]
        if args.check:
            if stale:
                print(f"error: generated code is stale: {', '.join(stale)}; run python -m faasmoe.proto.regen",
                      file=sys.stderr)
                return 1
            print("generated code is up to date")
            return 0
        for name in GENERATED:
            (PROTO_DIR / name).write_bytes((produced / name).read_bytes())
        print(f"wrote {', '.join(GENERATED)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
