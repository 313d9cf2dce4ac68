"""``faasmoe split``: turn an MoE checkpoint (any family of :mod:`faasmoe.router.families`) into a store (see :mod:`faasmoe.router.store.manifest`).

Streams: the dense tensors are copied byte for byte from the source files into ``dense.safetensors`` (one
chunk at a time, original names and dtype), and each function reads only its G experts (one slice of a fused
tensor at a time), so peak memory is about one function group (its float32 weights, about three copies while
ONNX serialises them), whatever the checkpoint size.

``--experts int8|int4`` quantizes each expert matrix as it is read (:mod:`faasmoe.router.store.quantize`,
blocks of ``--block-size``), so a quantized split holds even less at a time.

Group size G defaults to 4 (:data:`DEFAULT_GROUP_SIZE`, capped at num_experts): a 4-expert function
shares one ONNX session (less memory and load time per expert than single-expert sessions, DESIGN.md §7)
while leaving placement enough pieces to spread a layer over several nodes. When G does not divide
num_experts the last group of each layer is smaller.

Everything is written into a hidden temporary directory next to the store and renamed into place at the
end, so a failed or interrupted split never leaves something that looks like a valid store.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from faasmoe.proto.errors import CheckpointError, ConfigError
from faasmoe.proto.function_abi import FP32, Precision, function_resident_bytes
from faasmoe.router.families import FAMILIES
from faasmoe.router.store.checkpoint import Checkpoint
from faasmoe.router.store.manifest import FORMAT, MANIFEST, FunctionEntry, Manifest
from faasmoe.router.store.onnx_function import OPSET, build_function
from faasmoe.router.store.quantize import PRECISIONS, parse_precision

log = logging.getLogger(__name__)

DEFAULT_GROUP_SIZE = 4
DENSE_FILE = "dense.safetensors"
FUNCTIONS_DIR = "functions"
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
              "chat_template.jinja", "chat_template.json")


def resolve_group_size(group_size: int | None, ckpt: Checkpoint) -> int:
    """G from the flag (``None`` → default), checked against num_experts."""
    experts = ckpt.config.num_experts
    if group_size is None:
        return min(DEFAULT_GROUP_SIZE, experts)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not 1 <= group_size <= experts:
        raise CheckpointError(f"{ckpt.dir / 'config.json'}: group size {group_size!r} must be 1..{experts} "
                              f"(num_experts)")
    return group_size


def plan_groups(moe_layers: tuple[int, ...], num_experts: int, group_size: int) -> list[tuple[int, tuple[int, ...]]]:
    """``(layer, expert_ids)`` of every function, in file order."""
    return [(layer, tuple(range(first, min(first + group_size, num_experts))))
            for layer in moe_layers for first in range(0, num_experts, group_size)]


def function_paths(layer: int, expert_ids: tuple[int, ...]) -> tuple[str, str]:
    """``(name, relative file)``, e.g. ``("L03.E08-11", "functions/L03_E08-11.onnx")``."""
    first, last = expert_ids[0], expert_ids[-1]
    return f"L{layer:02d}.E{first:02d}-{last:02d}", f"{FUNCTIONS_DIR}/L{layer:02d}_E{first:02d}-{last:02d}.onnx"


def write_dense(ckpt: Checkpoint, path: Path, on_bytes: Callable[[int], None] = lambda n: None) -> int:
    """Copy every dense tensor's stored bytes into one safetensors file; returns its size in bytes."""
    names = ckpt.dense_names
    header, offset = {}, 0
    for name in names:
        info = ckpt.tensors[name]
        header[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as out:
        out.write(len(blob).to_bytes(8, "little"))
        out.write(blob)
        for name in names:
            for chunk in ckpt.raw_chunks(name):
                out.write(chunk)
                on_bytes(len(chunk))
    return path.stat().st_size


def _write_function(ckpt: Checkpoint, store: Path, layer: int, expert_ids: tuple[int, ...], precision: Precision,
                    on_bytes: Callable[[int], None]) -> FunctionEntry:
    gate_up, down = [], []
    for expert in expert_ids:
        g, d = ckpt.expert_weights(layer, expert)
        gate_up.append(g)
        down.append(d)
        on_bytes(ckpt.expert_source_bytes(layer, expert))
    data = build_function(layer, expert_ids, gate_up, down, model_id=ckpt.config.name, precision=precision)
    del gate_up, down
    name, rel = function_paths(layer, expert_ids)
    (store / rel).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    log.debug("%s: %d bytes, sha256 %s", name, len(data), digest[:12])
    cfg = ckpt.config
    footprint = function_resident_bytes(len(data), len(expert_ids), cfg.hidden_size, cfg.moe_intermediate_size,
                                        precision)
    return FunctionEntry(function_id=digest, name=name, file=rel, layer=layer, expert_ids=expert_ids,
                         bytes=len(data), sha256=digest, dtype=_dtype(precision), opset=OPSET,
                         precision=precision.name, block_size=precision.block_size, footprint_bytes=footprint)


def _dtype(precision: Precision) -> str:
    return "float32" if not precision.quantized else precision.name


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = [n for n in SIDE_FILES if (src / n).is_file()]
    for name in copied:
        shutil.copyfile(src / name, dst / name)
    return copied


def _check_target(out: Path, model_dir: Path, overwrite: bool) -> None:
    src, dst = model_dir.resolve(), out.resolve()
    if dst == src or dst in src.parents or src in dst.parents:
        raise ConfigError(f"{out}: the store must not contain or sit inside the checkpoint {model_dir}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a directory; pick another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out}: exists and is not empty; remove it, pick another --out or pass --force")
        if not (out / MANIFEST).is_file():
            raise ConfigError(f"{out}: not empty and not a faasmoe store (no {MANIFEST}); --force only replaces stores")


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out`` (replacing an old store only once the new one is complete)."""
    old = None
    if out.is_dir():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ensure_split(model_dir: str | Path, out_dir: str | Path, group_size: int | None = None,
                 precision: Precision = FP32) -> Path:
    """``out_dir`` as a store of ``model_dir``: split once, reused while its manifest is there (benchmarks and
    the bench harness keep one store per model, group size and precision in their work folders)."""
    out_dir = Path(out_dir)
    if not (out_dir / "manifest.json").exists():
        split_checkpoint(model_dir, out_dir, group_size=group_size, progress=False, precision=precision)
    return out_dir


def split_checkpoint(model_dir: str | Path, out_dir: str | Path, group_size: int | None = None,
                     progress: bool = True, precision: Precision = FP32, overwrite: bool = False) -> Manifest:
    """Split ``model_dir`` into the store ``out_dir`` and return its manifest.

    ``group_size``: experts per function, 1..num_experts (``None`` → :data:`DEFAULT_GROUP_SIZE`);
    ``precision``: how the functions store the expert weights (fp32, the exact default, or int8 / int4 in
    blocks); ``overwrite``: replace an existing store at ``out_dir`` (a non-empty ``out_dir`` is otherwise a
    :class:`ConfigError`; a non-empty directory that is not a store is never replaced). Raises
    :class:`CheckpointError` for a bad checkpoint or group size. The functions carry the config-derived model
    name (not the final ``model_id``, which hashes the function ids) so the same model split anywhere yields
    byte-identical functions.
    """
    start_s, out = time.perf_counter(), Path(out_dir)
    with Checkpoint(model_dir) as ckpt:
        cfg = ckpt.config
        g = resolve_group_size(group_size, ckpt)
        groups = plan_groups(cfg.moe_layers, cfg.num_experts, g)
        _check_target(out, ckpt.dir, overwrite)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        try:
            tmp.chmod(0o755)      # mkdtemp makes it 0700; the store is meant to be shared
            (tmp / FUNCTIONS_DIR).mkdir()
            with _progress_bar(ckpt.total_bytes, progress) as bar:
                dense_bytes = write_dense(ckpt, tmp / DENSE_FILE, bar.update)
                _copy_side_files(ckpt.dir, tmp)
                entries = []
                for layer, ids in groups:
                    bar.set_postfix_str(function_paths(layer, ids)[0], refresh=False)
                    entries.append(_write_function(ckpt, tmp, layer, ids, precision, bar.update))
            ids_hash = hashlib.sha256("\n".join(e.function_id for e in entries).encode()).hexdigest()[:12]
            manifest = Manifest(format=FORMAT, model_id=f"{cfg.name}-{ids_hash}", architecture=cfg.family.architecture,
                                num_layers=cfg.num_layers, num_experts=cfg.num_experts, top_k=cfg.top_k,
                                hidden_size=cfg.hidden_size, moe_layers=cfg.moe_layers, group_size=g,
                                dtype=_dtype(precision), dense_file=DENSE_FILE, dense_bytes=dense_bytes,
                                functions=tuple(entries), experts_precision=precision.name,
                                block_size=precision.block_size)
            manifest.save(tmp)
            _install(tmp, out)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"{out}: cannot write the store ({exc})") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("split %s into %s: %d functions, %d + %d bytes, %.1f s", model_dir, out, len(entries),
             manifest.function_bytes, dense_bytes, time.perf_counter() - start_s)
    return manifest


def _progress_bar(total_bytes: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="split", file=sys.stderr,
                disable=not enabled, dynamic_ncols=True)


# ---- CLI pieces for the umbrella command ------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, help="Hugging Face MoE checkpoint directory (safetensors) of a "
                        f"supported family ({', '.join(FAMILIES)}: config.json's model_type)")
    parser.add_argument("--out", metavar="STORE", type=Path, required=True, help="store directory to write")
    parser.add_argument("--group-size", metavar="G", type=int, default=None,
                        help=f"experts per function, 1..num_experts (default {DEFAULT_GROUP_SIZE})")
    parser.add_argument("--experts", choices=PRECISIONS, default="fp32",
                        help="how functions store the expert weights: fp32 (default, exact), or int8 / int4 "
                             "weight-only blocks run by ONNX Runtime's MatMulNBits (not exact; see BENCHMARKS.md "
                             "for their fidelity)")
    parser.add_argument("--block-size", metavar="B", type=int, default=None,
                        help="weights per quantization block for int8 / int4: 16, 32, 64, 128 (default) or 256")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--force", action="store_true", help="replace STORE if it exists and is not empty")


def run(args: argparse.Namespace) -> int:
    """Split and print a one-line summary; :class:`FaasmoeError` propagates to the umbrella's handler."""
    start_s = time.perf_counter()
    precision = parse_precision(args.experts, args.block_size)
    m = split_checkpoint(args.model_dir, args.out, group_size=args.group_size, progress=not args.no_progress,
                         overwrite=getattr(args, "force", False), precision=precision)
    elapsed_s = time.perf_counter() - start_s
    print(f"split {args.model_dir} -> {args.out}: {len(m.functions)} functions ({precision.label}, "
          f"{len(m.moe_layers)} MoE layers x {m.num_experts} experts, G={m.group_size}), functions "
          f"{_mib(m.function_bytes)}, dense {_mib(m.dense_bytes)}, {elapsed_s:.1f} s")
    return 0


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"
