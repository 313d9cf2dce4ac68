"""The contract of an expert function file (ONNX), shared by the splitter that writes it and the node
that runs it. A node needs nothing but this to run a function: no torch, no model config.

A function holds the routed experts ``expert_ids`` (G of them) of one MoE layer.

- input ``hidden``: float32 [N, hidden_size], the token rows sent to this node;
- inputs ``rows_0`` … ``rows_{G-1}``: int64 [n_j], which rows expert j runs on (may be empty);
- output ``out``: float32 [n_0 + … + n_{G-1}, hidden_size], expert 0's outputs first, unweighted
  (the router applies the routing weights, exactly as transformers does).

Expert j computes ``down_j(silu(gate_j(x)) * up_j(x))`` on its rows only, so a G-expert function costs
what G single-expert functions cost on the same rows. Metadata (ONNX ``metadata_props``) repeats layer,
expert ids and sizes so a node can describe what it holds.

**Precision.** The weights are float32 (``fp32``, the exact default) or weight-only block-quantized (``int8``,
``int4``): each projection is then ONNX Runtime's ``MatMulNBits`` (domain ``com.microsoft``) over blocks of
``block_size`` weights along K, one float32 scale per block, ``accuracy_level`` 4 (int8 activations: the fast
kernels on AVX512-VNNI / AVX2). int8 is asymmetric (a uint8 zero point per block); int4 is symmetric (no zero
points). Measured here (BENCHMARKS §7.1): levels 0/1 ran 2-7x slower at 1-16 rows; asymmetric int8 ran ~25 %
faster than symmetric at one row (~10 % at 4-16) with the same error; asymmetric int4 was 7-10 % faster, but
symmetric avoids the asymmetric-int4 / int8-activation error reported on AVX2-only CPUs. A quantized file names its precision and
block size in its metadata (a float32 file has neither, so float32 ids never changed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from faasmoe.proto.errors import ConfigError

ABI_VERSION = "1"
HIDDEN_INPUT = "hidden"
OUTPUT = "out"
META_ABI = "faasmoe.abi"
META_LAYER = "faasmoe.layer"
META_EXPERTS = "faasmoe.expert_ids"
META_HIDDEN = "faasmoe.hidden_size"
META_INTERMEDIATE = "faasmoe.intermediate_size"
META_MODEL = "faasmoe.model_id"


def rows_input(j: int) -> str:
    return f"rows_{j}"


# What a function costs on a node: the memory its ONNX Runtime session holds when loaded. Measured with
# onnxruntime 1.32 / glibc (arena off, the node's malloc settings): RSS grows by 1.00-1.02 x the file per
# session; MatMulNBits at accuracy level 4 prepacks B with 8 more bytes per quantization block (int4 at
# block 32: 1.41 x the file, block 128: 1.13 x; int8 at block 128: 1.07 x). Nodes admit deployments and loads
# by this estimate and routers place by it, so every function deployed at overcommit 1 can be loaded at once.
RESIDENT_FACTOR = 1.02
RESIDENT_OVERHEAD_BYTES = 1 << 20
PREPACK_BYTES_PER_BLOCK = 8


def resident_estimate_bytes(size_bytes: int, quant_blocks: int = 0) -> int:
    """Memory a loaded function holds: ``size_bytes`` of file, ``quant_blocks`` quantization blocks (0: fp32)."""
    return int(size_bytes * RESIDENT_FACTOR) + PREPACK_BYTES_PER_BLOCK * quant_blocks + RESIDENT_OVERHEAD_BYTES


# -- the graph itself: what the splitter emits and the only thing a node accepts --------------------------------
OPSET = 17                      # the default ("ai.onnx") domain
MS_DOMAIN, MS_OPSET = "com.microsoft", 1     # imported by quantized functions only (MatMulNBits)
IR_VERSION = 8
FLOAT, UINT8, INT64 = 1, 2, 7   # ONNX TensorProto data types
CONSTANTS = ("c_zero", "c_inter", "c_two_inter", "c_axis1")      # int64 [1]: 0, I, 2I, 1
MAX_EXPERTS = 1024              # per function
MAX_HIDDEN = 1 << 16
MAX_INTERMEDIATE = 1 << 18
MAX_FUNCTION_BYTES = (1 << 31) - 1           # ONNX's protobuf limit
META_PRECISION = "faasmoe.precision"         # int8 | int4 (absent: fp32)
META_BLOCK_SIZE = "faasmoe.block_size"
ACCURACY_LEVEL = 4                           # MatMulNBits: int8 activations
BLOCK_SIZES = (16, 32, 64, 128, 256)         # what MatMulNBits' CPU kernels take
BITS = {"fp32": 0, "int8": 8, "int4": 4}


@dataclass(frozen=True)
class Precision:
    """How a function stores its weights: ``fp32``, or ``int8`` / ``int4`` in blocks of ``block_size``."""
    name: str = "fp32"
    block_size: int = 0                      # weights per quantization block along K; 0 for fp32

    def __post_init__(self):
        if self.name not in BITS:
            raise ConfigError(f"precision {self.name!r} is not one of {', '.join(BITS)}")
        if self.quantized and self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"block size {self.block_size} is not one of {', '.join(map(str, BLOCK_SIZES))}")
        if not self.quantized and self.block_size:
            raise ConfigError("fp32 functions have no block size")

    @property
    def bits(self) -> int:
        return BITS[self.name]

    @property
    def quantized(self) -> bool:
        return self.bits > 0

    @property
    def label(self) -> str:
        """``fp32``, ``int8-b128``, ``int4-b32``."""
        return f"{self.name}-b{self.block_size}" if self.quantized else self.name

    @property
    def symmetric(self) -> bool:
        """int4 blocks are symmetric; int8 blocks carry a zero point each (see the module docstring)."""
        return self.bits == 4

    def blob_bytes(self) -> int:
        """Bytes of one block's packed weights."""
        return self.block_size * self.bits // 8

    def zero_point_bytes(self, k: int) -> int:
        """Bytes of one row's packed zero points (MatMulNBits packs 8 / bits of them per byte)."""
        return -(-self.k_blocks(k) * self.bits // 8)

    def k_blocks(self, k: int) -> int:
        return -(-k // self.block_size)


FP32 = Precision()


def quant_blocks(n_experts: int, hidden: int, inter: int, precision: Precision) -> int:
    """Quantization blocks of a function: per expert, gate_up (K = hidden, N = 2I) and down (K = I, N = hidden)."""
    if not precision.quantized:
        return 0
    return n_experts * (2 * inter * precision.k_blocks(hidden) + hidden * precision.k_blocks(inter))


def function_resident_bytes(size_bytes: int, n_experts: int, hidden: int, inter: int, precision: Precision) -> int:
    return resident_estimate_bytes(size_bytes, quant_blocks(n_experts, hidden, inter, precision))


@dataclass(frozen=True)
class Op:
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: tuple[tuple[str, int], ...] = ()   # int attributes only, sorted by name (as onnx.helper writes them)
    domain: str = ""                          # "" (the default ONNX domain) or MS_DOMAIN


def weight_names(expert: int) -> tuple[str, str]:
    return f"e{expert}_gate_up", f"e{expert}_down"


def quant_names(weight: str, precision: Precision | None = None) -> tuple[str, ...]:
    """The packed blocks and the scales of a quantized weight, and its zero points when ``precision`` has them."""
    names = (f"{weight}_q", f"{weight}_scales")
    return names + ((f"{weight}_zero_points",) if precision is not None and not precision.symmetric else ())


def _matmul(x: str, weight: str, out: str, k: int, n: int, precision: Precision) -> Op:
    if not precision.quantized:
        return Op("MatMul", (x, weight), (out,))
    attrs = (("K", k), ("N", n), ("accuracy_level", ACCURACY_LEVEL), ("bits", precision.bits),
             ("block_size", precision.block_size))
    return Op("MatMulNBits", (x, *quant_names(weight, precision)), (out,), attrs, MS_DOMAIN)


def graph_ops(expert_ids: Sequence[int], hidden: int = 0, inter: int = 0, precision: Precision = FP32) -> list[Op]:
    """Every node of a function's graph, in order: per expert j, gather its rows, the fused gate/up MatMul,
    SiLU(gate) * up, the down MatMul; then the outputs concatenated (Identity for one expert). Quantized
    functions use MatMulNBits (whose attributes name ``hidden`` and ``inter``) for both projections."""
    ops, outs = [], []
    for j, expert in enumerate(expert_ids):
        p, rows = f"e{expert}", rows_input(j)
        gate_up, down = weight_names(expert)
        ops += [Op("Gather", (HIDDEN_INPUT, rows), (f"{p}_x",), (("axis", 0),)),
                _matmul(f"{p}_x", gate_up, f"{p}_gu", hidden, 2 * inter, precision),
                Op("Slice", (f"{p}_gu", "c_zero", "c_inter", "c_axis1"), (f"{p}_g",)),
                Op("Slice", (f"{p}_gu", "c_inter", "c_two_inter", "c_axis1"), (f"{p}_u",)),
                Op("Sigmoid", (f"{p}_g",), (f"{p}_sg",)),
                Op("Mul", (f"{p}_g", f"{p}_sg"), (f"{p}_act",)),
                Op("Mul", (f"{p}_act", f"{p}_u"), (f"{p}_h",)),
                _matmul(f"{p}_h", down, f"{p}_y", inter, hidden, precision)]
        outs.append(f"{p}_y")
    ops.append(Op("Identity", tuple(outs), (OUTPUT,)) if len(outs) == 1
               else Op("Concat", tuple(outs), (OUTPUT,), (("axis", 0),)))
    return ops


def initializers(expert_ids: Sequence[int], hidden: int, inter: int,
                 precision: Precision = FP32) -> dict[str, tuple[int, tuple[int, ...]]]:
    """name -> (data type, dims) of every initializer: the four int64 constants, then per expert the
    transposed gate_up [H, 2I] and down [I, H] (float32); quantized, each as MatMulNBits' B, uint8
    [N, ceil(K / block), block bytes], its scales, float32 [N, ceil(K / block)], and for int8 its zero points,
    uint8 [N, ceil(K / block)]."""
    specs = {name: (INT64, (1,)) for name in CONSTANTS}
    for expert in expert_ids:
        gate_up, down = weight_names(expert)
        if not precision.quantized:
            specs[gate_up] = (FLOAT, (hidden, 2 * inter))
            specs[down] = (FLOAT, (inter, hidden))
            continue
        for weight, k, n in ((gate_up, hidden, 2 * inter), (down, inter, hidden)):
            packed, scales, *zero_points = quant_names(weight, precision)
            specs[packed] = (UINT8, (n, precision.k_blocks(k), precision.blob_bytes()))
            specs[scales] = (FLOAT, (n, precision.k_blocks(k)))
            if zero_points:
                specs[zero_points[0]] = (UINT8, (n, precision.zero_point_bytes(k)))
    return specs


def opset_imports(precision: Precision = FP32) -> list[tuple[str, int]]:
    """(domain, version) of every opset a function imports, in order."""
    return [("", OPSET)] + ([(MS_DOMAIN, MS_OPSET)] if precision.quantized else [])


def constant_values(inter: int) -> dict[str, int]:
    return {"c_zero": 0, "c_inter": inter, "c_two_inter": 2 * inter, "c_axis1": 1}
