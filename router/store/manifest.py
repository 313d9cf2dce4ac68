"""The store written by ``faasmoe split`` and read by the router.

    STORE/
      manifest.json          this module's Manifest
      config.json            the model's config (unchanged)
      dense.safetensors      every non-routed-expert tensor, original names and dtype
      tokenizer*, special_tokens_map.json, generation_config.json   copied when present
      functions/L{layer:02d}_E{first:02d}-{last:02d}.onnx   one file per expert function

Every function of a store has the store's precision (``experts_precision``, ``block_size``); stores written
before quantization existed have neither field and are fp32.

A function is identified by the sha256 of its file (content addressing): two routers deploying the same
split share a node's copy, and a node verifies what it receives.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from faasmoe.proto.errors import CheckpointError, ConfigError
from faasmoe.proto.function_abi import Precision, resident_estimate_bytes

FORMAT = "faasmoe-store/1"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class FunctionEntry:
    function_id: str          # sha256 hex of the file
    name: str                 # human label, e.g. L03.E08-11
    file: str                 # path relative to the store
    layer: int
    expert_ids: tuple[int, ...]
    bytes: int                # file size
    sha256: str
    dtype: str                # weights dtype inside the ONNX file (float32, int8, int4)
    opset: int
    expected_load: float = 0.0   # share of the layer's routed (token, expert) pairs; 0 = unknown
    precision: str = "fp32"      # fp32 | int8 | int4 (function_abi.Precision)
    block_size: int = 0          # weights per quantization block; 0 for fp32
    footprint_bytes: int = 0     # memory when loaded on a node (function_abi estimate; what placement counts)

    def __post_init__(self):
        if not self.footprint_bytes:             # a store written before footprints were recorded: fp32
            object.__setattr__(self, "footprint_bytes", resident_estimate_bytes(self.bytes))


@dataclass(frozen=True)
class Manifest:
    format: str
    model_id: str
    architecture: str
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    moe_layers: tuple[int, ...]
    group_size: int
    dtype: str
    dense_file: str
    dense_bytes: int
    functions: tuple[FunctionEntry, ...] = field(default_factory=tuple)
    experts_precision: str = "fp32"      # every function's precision (a store has one)
    block_size: int = 0

    @property
    def precision(self) -> Precision:
        return Precision(self.experts_precision, self.block_size)

    def layer_functions(self, layer: int) -> list[FunctionEntry]:
        return [f for f in self.functions if f.layer == layer]

    @property
    def function_bytes(self) -> int:
        return sum(f.bytes for f in self.functions)

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(data, indent=1)

    def save(self, store: Path) -> None:
        (Path(store) / MANIFEST).write_text(self.to_json())


def load_manifest(store: str | Path) -> Manifest:
    """Read and check ``STORE/manifest.json``; one-line :class:`CheckpointError` when it is wrong."""
    path = Path(store) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no manifest; is {store} a store written by 'faasmoe split'?") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({exc})") from None
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {data.get('format')!r} is not {FORMAT!r}")
    try:
        functions = tuple(FunctionEntry(**{**f, "expert_ids": tuple(f["expert_ids"])}) for f in data.pop("functions"))
        manifest = Manifest(**{**data, "moe_layers": tuple(data["moe_layers"]), "functions": functions})
        precision = manifest.precision           # checks the store's precision and block size
    except (KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: manifest fields do not match {FORMAT} ({exc})") from None
    odd = next((f for f in manifest.functions if (f.precision, f.block_size) != (precision.name, precision.block_size)),
               None)
    if odd is not None:
        raise CheckpointError(f"{path}: function {odd.name} is {odd.precision} (block {odd.block_size}), the store "
                              f"{precision.label}")
    for layer in manifest.moe_layers:
        covered = sorted(e for f in manifest.layer_functions(layer) for e in f.expert_ids)
        if covered != list(range(manifest.num_experts)):
            raise CheckpointError(f"{path}: layer {layer} functions do not cover experts 0..{manifest.num_experts - 1}")
    return manifest
