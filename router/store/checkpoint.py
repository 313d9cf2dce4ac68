"""Read a Hugging Face MoE checkpoint of a supported family (:mod:`faasmoe.router.families`) lazily, tensor by
tensor.

:func:`open_checkpoint` checks everything it can without reading tensor data: ``config.json`` (its
``model_type`` picks the family), the safetensors files (single ``model.safetensors`` or sharded with
``model.safetensors.index.json``), every file's header against its size (a truncated or corrupt file fails
here), dtypes, and the routed experts of every MoE layer in either layout:

- per-expert (checkpoints on disk): ``model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight`` with
  gate/up ``[I, H]`` and down ``[H, I]`` (Mixtral: ``block_sparse_moe.experts.{e}.{w1,w3,w2}.weight``);
- fused (transformers 5 state dicts): ``model.layers.{l}.mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (gate rows
  first) and ``model.layers.{l}.mlp.experts.down_proj`` ``[E, H, I]``.

Every other tensor is *dense* (stays on the router). Problems raise a one-line :class:`CheckpointError`
naming the file. Tensor data is read only on request: :meth:`Checkpoint.expert_weights` (one expert, as
float32 numpy, one slice of a fused tensor at a time), :meth:`Checkpoint.dense_tensors` (torch tensors in
their own dtype) and :meth:`Checkpoint.raw_chunks` (the stored bytes, for copying without conversion).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from faasmoe.proto.errors import CheckpointError
from faasmoe.router.families import Family, family_of
from faasmoe.router.families.base import positive_int

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
               "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
EXPERT_DTYPES = ("F32", "F16", "BF16", "F64")
MAX_HEADER_BYTES = 100 * 2**20
_FUSED = ("gate_up_proj", "down_proj")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``nbytes`` bytes at absolute offset ``start`` of ``file``."""
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int


@dataclass(frozen=True)
class MoeConfig:
    """What the splitter needs from ``config.json`` (``raw`` keeps the whole file)."""
    num_layers: int
    hidden_size: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    moe_layers: tuple[int, ...]
    raw: dict
    family: Family

    @property
    def name(self) -> str:
        """Config-derived model name, independent of where the checkpoint lives."""
        return (f"{self.family.model_type}-{self.num_layers}L-{self.num_experts}E-{self.hidden_size}H-"
                f"{self.moe_intermediate_size}I-{self.raw.get('vocab_size', 0)}V")


def read_config(model_dir: Path) -> MoeConfig:
    path = model_dir / CONFIG
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {model_dir} is not a Hugging Face model directory") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    family = family_of(raw.get("model_type"), str(path))
    archs = raw.get("architectures") or [family.architecture]
    if family.architecture not in archs:
        raise CheckpointError(f"{path}: architectures {archs} do not include {family.architecture}, the class of "
                              f"model_type {family.model_type!r}")
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: hidden_act {raw.get('hidden_act')!r} is not supported (expert functions use silu)")
    ints = {key: positive_int(raw, key, str(path))
            for key in ("num_hidden_layers", "hidden_size", "num_experts_per_tok", family.expert_width_key)}
    experts = family.num_experts(raw, str(path))
    layers = family.moe_layers(raw)
    return MoeConfig(ints["num_hidden_layers"], ints["hidden_size"], experts, ints["num_experts_per_tok"],
                     ints[family.expert_width_key], layers, raw, family)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check it against the file size (no tensor data is read)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if n < 2 or n > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{path}: not a safetensors file or truncated (header length {n}, file {size} bytes)")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    base, tensors, end = 8 + n, {}, 0
    for name, entry in header.items():
        try:
            dtype, shape, (lo, hi) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name}") from None
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{path}: tensor {name} has unknown dtype {dtype!r}")
        if hi - lo != int(np.prod(shape, dtype=np.int64)) * DTYPE_BYTES[dtype] or lo < 0:
            raise CheckpointError(f"{path}: tensor {name} offsets [{lo}, {hi}] do not match {dtype} {list(shape)}")
        tensors[name] = TensorInfo(name, path, dtype, shape, base + lo, hi - lo)
        end = max(end, hi)
    if base + end != size:
        raise CheckpointError(f"{path}: file is {size} bytes but its header describes {base + end} "
                              f"({'truncated' if size < base + end else 'trailing data'})")
    return tensors


def _locate(model_dir: Path) -> tuple[Path, dict[str, TensorInfo]]:
    """The file that names the tensors (single file or index) and every tensor's location."""
    single, index = model_dir / SINGLE_FILE, model_dir / INDEX_FILE
    if single.is_file():
        return single, read_header(single)
    if not index.is_file():
        raise CheckpointError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found (only safetensors is supported)")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: unreadable index ({type(exc).__name__}: {exc})") from None
    headers: dict[str, dict[str, TensorInfo]] = {}
    for shard in sorted(set(weight_map.values())):
        if not (model_dir / shard).is_file():
            raise CheckpointError(f"{index}: shard {shard} is missing from {model_dir}")
        headers[shard] = read_header(model_dir / shard)
    tensors = {}
    for name, shard in weight_map.items():
        if name not in headers[shard]:
            raise CheckpointError(f"{index}: weight_map puts {name} in {shard}, which does not hold it")
        tensors[name] = headers[shard][name]
    extra = sum(len(h) for h in headers.values()) - len(tensors)
    if extra:
        log.warning("%s: %d tensors in the shards are not in weight_map; ignored", index, extra)
    return index, tensors


class Checkpoint:
    """An opened, checked checkpoint. Use as a context manager (or call :meth:`close`)."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a directory")
        self.config = read_config(self.dir)
        self.source, self.tensors = _locate(self.dir)
        self._drop_extra_layers()
        self.layouts: dict[int, str] = {}     # MoE layer -> "per_expert" | "fused"
        self._expert_names: set[str] = set()
        self._handles: dict[Path, int] = {}          # open file descriptors
        self._classify()

    # ---- checks -------------------------------------------------------------------------------------------------
    def _drop_extra_layers(self) -> None:
        """Layers past ``num_hidden_layers`` are not the model's (DeepSeek-V3's multi-token-prediction layer, which
        transformers ignores too): neither split nor copied."""
        extra = [n for n in self.tensors if (m := _LAYER_RE.match(n)) and int(m.group(1)) >= self.config.num_layers]
        if extra:
            log.info("%s: %d tensors of layers past num_hidden_layers (%d) are not part of the model; skipped",
                     self.source, len(extra), self.config.num_layers)
            for name in extra:
                del self.tensors[name]

    def _classify(self) -> None:
        cfg, seen = self.config, {}
        family = cfg.family
        expert_re = re.compile(rf"^model\.layers\.(\d+)\.(?:mlp|{re.escape(family.block)})\.experts\.(.+)$")
        per_expert_re = re.compile(rf"^(\d+)\.({'|'.join(map(re.escape, family.expert_keys))})\.weight$")
        for name in self.tensors:
            m = expert_re.match(name)
            if not m:
                continue
            layer, rest = int(m.group(1)), m.group(2)
            if layer not in cfg.moe_layers:
                raise CheckpointError(f"{self._file(name)}: {name} is a routed-expert tensor but config.json says "
                                      f"layer {layer} is not an MoE layer")
            pe = per_expert_re.match(rest)
            if pe and int(pe.group(1)) >= cfg.num_experts:
                raise CheckpointError(f"{self._file(name)}: {name} names expert {pe.group(1)} but num_experts is "
                                      f"{cfg.num_experts}")
            if not pe and rest not in _FUSED:
                raise CheckpointError(f"{self._file(name)}: unexpected routed-expert tensor {name}")
            seen.setdefault(layer, set()).add("per_expert" if pe else "fused")
            self._expert_names.add(name)
        for layer in cfg.moe_layers:
            kinds = seen.get(layer, {"per_expert"})
            if len(kinds) > 1:
                raise CheckpointError(f"{self.source}: layer {layer} mixes per-expert and fused expert tensors")
            self.layouts[layer] = kinds.pop()
            for name, shape in self._expected(layer):
                if name not in self.tensors:
                    raise CheckpointError(f"{self.source}: missing tensor {name} ({self.layouts[layer]} layout)")
                info = self.tensors[name]
                if info.shape != shape:
                    raise CheckpointError(f"{info.file}: {name} has shape {list(info.shape)}, expected {list(shape)} "
                                          f"from config.json")
                if info.dtype not in EXPERT_DTYPES:
                    fp8 = " (an FP8 checkpoint, as DeepSeek-V3's release: convert it to bfloat16 first)" \
                        if info.dtype.startswith("F8") else ""
                    raise CheckpointError(f"{info.file}: {name} has dtype {info.dtype}; experts must be one of "
                                          f"{'/'.join(EXPERT_DTYPES)}{fp8}")

    def _expected(self, layer: int) -> Iterator[tuple[str, tuple[int, ...]]]:
        c = self.config
        h, i, e = c.hidden_size, c.moe_intermediate_size, c.num_experts
        if self.layouts[layer] == "fused":
            prefix = f"model.layers.{layer}.mlp.experts"
            yield f"{prefix}.gate_up_proj", (e, 2 * i, h)
            yield f"{prefix}.down_proj", (e, h, i)
            return
        prefix, (gate, up, down) = c.family.expert_prefix(layer), c.family.expert_keys
        for expert in range(e):
            for proj in (gate, up, down):
                yield f"{prefix}.{expert}.{proj}.weight", ((h, i) if proj == down else (i, h))

    def _file(self, name: str) -> Path:
        return self.tensors[name].file

    # ---- queries ------------------------------------------------------------------------------------------------
    @property
    def dense_names(self) -> list[str]:
        """Every tensor that is not a routed expert, sorted."""
        return sorted(n for n in self.tensors if n not in self._expert_names)

    def expert_source_bytes(self, layer: int, expert: int) -> int:
        """Bytes of ``expert``'s weights as stored (for progress accounting)."""
        c = self.config
        per = 3 * c.hidden_size * c.moe_intermediate_size
        return per * DTYPE_BYTES[self.tensors[next(self._expected(layer))[0]].dtype]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    # ---- data ---------------------------------------------------------------------------------------------------
    # Tensor data is read with plain positioned reads of the bytes the header locates (no mmap): a split of a
    # 28 GB checkpoint then holds one expert at a time, where mapped shards would count every page touched so
    # far in the process's RSS.
    def _fd(self, path: Path) -> int:
        if path not in self._handles:
            try:
                self._handles[path] = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise CheckpointError(f"{path}: cannot open it ({exc.strerror})") from None
        return self._handles[path]

    def _read(self, name: str, index: int | None = None):
        """Tensor ``name`` (or its ``index``-th slice along the first axis) as a torch tensor of its own dtype."""
        info = self.tensors[name]
        return read_tensor(self._fd(info.file), info, index)

    def expert_weights(self, layer: int, expert: int) -> tuple[np.ndarray, np.ndarray]:
        """Expert ``expert`` of ``layer`` as float32 ``(gate_up [2I, H], down [H, I])``."""
        import torch
        if self.layouts[layer] == "fused":
            prefix = f"model.layers.{layer}.mlp.experts"
            gate_up, down = self._read(f"{prefix}.gate_up_proj", expert), self._read(f"{prefix}.down_proj", expert)
        else:
            p, (gate, up, down_key) = f"{self.config.family.expert_prefix(layer)}.{expert}", self.config.family.expert_keys
            gate_up = torch.cat([self._read(f"{p}.{gate}.weight"), self._read(f"{p}.{up}.weight")], dim=0)
            down = self._read(f"{p}.{down_key}.weight")
        return (np.ascontiguousarray(gate_up.to(torch.float32).numpy()),
                np.ascontiguousarray(down.to(torch.float32).numpy()))

    def dense_tensors(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        """``(name, tensor)`` for every dense tensor, in its stored dtype, one at a time."""
        for name in self.dense_names:
            yield name, self._read(name)

    def raw_chunks(self, name: str, chunk_bytes: int = 16 * 2**20) -> Iterator[bytes]:
        """The stored bytes of tensor ``name`` (little-endian, its own dtype), in chunks."""
        info = self.tensors[name]
        with open(info.file, "rb") as f:
            f.seek(info.start)
            left = info.nbytes
            while left:
                chunk = f.read(min(chunk_bytes, left))
                if not chunk:
                    raise CheckpointError(f"{info.file}: ended inside tensor {name} (file changed while reading?)")
                left -= len(chunk)
                yield chunk

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_tensor(fd: int, info: TensorInfo, index: int | None = None):
    """The tensor ``info`` locates (or its ``index``-th slice along the first axis), read from the open file
    ``fd`` with one positioned read, as a torch tensor of its own dtype."""
    import torch
    shape = info.shape if index is None else info.shape[1:]
    nbytes = info.nbytes if index is None else info.nbytes // info.shape[0]
    offset = info.start + (0 if index is None else index * nbytes)
    dtype = getattr(torch, TORCH_DTYPES.get(info.dtype, ""), None)
    if dtype is None:
        raise CheckpointError(f"{info.file}: {info.name} has dtype {info.dtype}, which cannot be read as a tensor")
    if not nbytes:
        return torch.empty(shape, dtype=dtype)
    buf, got = bytearray(nbytes), 0
    view = memoryview(buf)
    try:
        while got < nbytes:                      # one read returns at most ~2 GiB on Linux
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                raise CheckpointError(f"{info.file}: ended inside tensor {info.name} (file changed while reading?)")
            got += n
    except OSError as exc:
        raise CheckpointError(f"{info.file}: cannot read {info.name} ({exc.strerror})") from None
    finally:
        view.release()
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def open_checkpoint(model_dir: str | Path) -> Checkpoint:
    """Open and check ``model_dir``; see the module docstring."""
    return Checkpoint(model_dir)
