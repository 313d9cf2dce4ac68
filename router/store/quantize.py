"""Weight-only block quantization of expert matrices for ONNX Runtime's ``MatMulNBits``.

The packing is ONNX Runtime's own: the same C++ kernels (``quantize_matmul_8bits`` / ``quantize_matmul_4bits``)
that ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`` calls, with its padding of K to
whole blocks, so a function's blocks and scales are byte for byte what that quantizer writes for the same
float32 matrix (``tests/test_quantize.py`` checks it). int8 is asymmetric (a zero point per block), int4
symmetric (see :mod:`faasmoe.proto.function_abi`).

One matrix at a time: the split quantizes each expert's tensors as it streams them, so its memory stays bounded.
"""

from __future__ import annotations

import numpy as np

from faasmoe.proto.errors import ConfigError
from faasmoe.proto.function_abi import BLOCK_SIZES, FP32, Precision

PRECISIONS = ("fp32", "int8", "int4")
DEFAULT_BLOCK_SIZE = 128      # both int8 and int4: the fastest here, and within 1.15x of the file when loaded


def _kernels():
    try:
        from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits
    except ImportError as err:        # a build of onnxruntime without its quantization kernels
        raise ConfigError(f"this onnxruntime cannot quantize ({err}); install the onnxruntime package from PyPI") from None
    return {8: quantize_matmul_8bits, 4: quantize_matmul_4bits}


def parse_precision(name: str, block_size: int | None = None) -> Precision:
    """``--experts NAME [--block-size B]`` as a :class:`Precision`; one-line :class:`ConfigError` if wrong."""
    if name not in PRECISIONS:
        raise ConfigError(f"--experts {name!r}: choose one of {', '.join(PRECISIONS)}")
    if name == "fp32":
        if block_size is not None:
            raise ConfigError("--block-size applies to --experts int8 or int4 only")
        return FP32
    block = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    if block not in BLOCK_SIZES:
        raise ConfigError(f"--block-size {block}: choose one of {', '.join(map(str, BLOCK_SIZES))}")
    return Precision(name, block)


def quantize_matrix(b_kn: np.ndarray, precision: Precision) -> tuple[np.ndarray, ...]:
    """Quantize ``B`` [K, N] (the right operand of ``x @ B``) in blocks of ``block_size`` along K.

    Returns ``(packed, scales)``, plus ``zero_points`` for an asymmetric precision (int8): uint8
    ``[N, ceil(K / block), block * bits / 8]``, float32 ``[N, ceil(K / block)]`` and uint8
    ``[N, ceil(ceil(K / block) * bits / 8)]``, the inputs B, scales and zero_points of ``MatMulNBits``.
    """
    if not precision.quantized:
        raise ConfigError("quantize_matrix needs an int8 or int4 precision")
    if b_kn.ndim != 2:
        raise ConfigError(f"expected a 2-D matrix, got shape {b_kn.shape}")
    k, n = b_kn.shape
    block, k_blocks = precision.block_size, precision.k_blocks(k)
    weight = np.ascontiguousarray(b_kn, dtype=np.float32)
    if k_blocks * block != k:
        weight = np.pad(weight, ((0, k_blocks * block - k), (0, 0)))
    packed = np.zeros((n, k_blocks, precision.blob_bytes()), np.uint8)
    scales = np.zeros((n, k_blocks), np.float32)
    zero_points = np.zeros((n, precision.zero_point_bytes(k)), np.uint8)      # unused when symmetric
    _kernels()[precision.bits](packed, weight, scales, zero_points, block, n, k, precision.symmetric)
    return (packed, scales) if precision.symmetric else (packed, scales, zero_points)


def dequantize_matrix(packed: np.ndarray, scales: np.ndarray, k: int, precision: Precision,
                      zero_points: np.ndarray | None = None) -> np.ndarray:
    """``B`` [K, N] back from :func:`quantize_matrix` (a symmetric block's zero point is 2^(bits-1)); for tests."""
    n, k_blocks, _ = packed.shape
    if precision.bits == 8:
        q = packed.astype(np.int16)
        zp = (zero_points.astype(np.int16) if zero_points is not None else np.full((n, k_blocks), 128, np.int16))
    else:                                      # two weights per byte, low nibble first
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, k_blocks, -1).astype(np.int16)
        zp = (np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)[:, :k_blocks].astype(np.int16)
              if zero_points is not None else np.full((n, k_blocks), 8, np.int16))
    values = (q - zp[:, :, None]).astype(np.float32) * scales[:, :, None]
    return np.ascontiguousarray(values.reshape(n, -1)[:, :k].T)
