"""Which precision serves a request: the expert functions' (the store's) and the router's dense part's.

Responses carry it as an extension field and a header (:meth:`ServedPrecision.label`, :meth:`header`), so a
client always knows whether what it got is exact: only float32 experts with a float32 dense part are
token-identical to transformers in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from faasmoe.proto.errors import ConfigError

DENSE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}   # int8: router/model/int8.py
HEADER = "x-faasmoe-precision"


def dense_dtype(name: str) -> torch.dtype:
    """``--dense-dtype NAME`` as a torch dtype; one-line :class:`ConfigError` when it is not one we serve."""
    try:
        return DENSE_DTYPES[name]
    except KeyError:
        raise ConfigError(f"--dense-dtype {name!r}: choose one of {', '.join(DENSE_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class ServedPrecision:
    experts: str              # fp32 | int8 | int4 (mesh functions), or the full model's dtype name
    block_size: int           # quantization block of the experts; 0 when not quantized
    dense: str                # the dense part's dtype: float32 | bfloat16

    @property
    def exact(self) -> bool:
        return self.experts in ("fp32", "float32") and self.dense == "float32"

    def label(self) -> dict:
        """The ``faasmoe_precision`` extension field of every response."""
        return {"experts": self.experts, "block_size": self.block_size, "dense": self.dense, "exact": self.exact}

    def header(self) -> str:
        experts = f"{self.experts}-b{self.block_size}" if self.block_size else self.experts
        return f"experts={experts}; dense={self.dense}"

    @classmethod
    def of_mesh(cls, manifest, dtype: torch.dtype) -> ServedPrecision:
        return cls(manifest.experts_precision, manifest.block_size, dtype_name(dtype))

    @classmethod
    def of_full_model(cls, dtype: torch.dtype) -> ServedPrecision:
        name = dtype_name(dtype)
        return cls("fp32" if name == "float32" else name, 0, name)
