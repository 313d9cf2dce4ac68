"""Invoke frames: a small protobuf header followed by raw little-endian tensor payloads.

    frame := u32le(len(header)) | header | payload_0 | payload_1 | ...

Each payload is exactly ``prod(spec.shape) * itemsize(spec.dtype)`` bytes, in the order the header lists
its TensorSpecs. Decoding validates everything before a byte is interpreted and returns numpy views of the
received buffer (no copy). No pickle, ever.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from faasmoe.proto import faasmoe_pb2 as pb
from faasmoe.proto.errors import InvalidRequest

# dtype name on the wire -> little-endian numpy dtype
WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
}
HIDDEN_DTYPES = ("float32", "float16")
_LEN = struct.Struct("<I")
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


# numpy dtype (either byte order) -> its wire name
_WIRE_NAME = {**{dt: name for name, dt in WIRE_DTYPES.items()},
              **{dt.newbyteorder(">"): name for name, dt in WIRE_DTYPES.items()}}


def spec_of(arr: np.ndarray) -> pb.TensorSpec:
    name = _WIRE_NAME.get(arr.dtype)
    if name is None:
        raise InvalidRequest(f"dtype {arr.dtype.name} cannot travel on the wire (allowed: {', '.join(WIRE_DTYPES)})")
    return pb.TensorSpec(dtype=name, shape=arr.shape)


def spec_nbytes(spec: pb.TensorSpec, what: str) -> int:
    dtype = WIRE_DTYPES.get(spec.dtype)
    if dtype is None:
        raise InvalidRequest(f"{what}: unknown dtype {spec.dtype!r} (allowed: {', '.join(WIRE_DTYPES)})")
    n = dtype.itemsize
    for d in spec.shape:
        if d < 0:
            raise InvalidRequest(f"{what}: negative dimension in shape {list(spec.shape)}")
        n *= d
    return n


def encode(header, tensors: Sequence[np.ndarray]) -> bytes:
    """Frame ``header`` (a protobuf message) and the raw bytes of ``tensors``."""
    head = header.SerializeToString()
    parts = [_LEN.pack(len(head)), head]
    for arr in tensors:
        le = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        parts.append(np.ascontiguousarray(le).data)
    return b"".join(parts)


def _parse_header(view: memoryview, header_cls):
    if len(view) < _LEN.size:
        raise InvalidRequest(f"frame of {len(view)} bytes is shorter than its length prefix")
    (head_len,) = _LEN.unpack_from(view)
    if _LEN.size + head_len > len(view):
        raise InvalidRequest(f"frame header length {head_len} exceeds the frame ({len(view)} bytes)")
    header = header_cls()
    try:
        header.ParseFromString(view[_LEN.size:_LEN.size + head_len])
    except Exception as exc:  # protobuf raises DecodeError or others on garbage
        raise InvalidRequest(f"malformed frame header: {exc}") from None
    return header, _LEN.size + head_len


def decode_header(frame: bytes, header_cls):
    """Only the protobuf header of a frame (payloads unchecked)."""
    return _parse_header(memoryview(frame), header_cls)[0]


def decode(frame: bytes, header_cls, specs_of) -> tuple[object, list[np.ndarray]]:
    """Parse a frame; ``specs_of(header)`` lists ``(what, TensorSpec)`` in payload order."""
    view = memoryview(frame)
    header, offset = _parse_header(view, header_cls)
    specs = list(specs_of(header))
    sizes = [spec_nbytes(spec, what) for what, spec in specs]
    if offset + sum(sizes) != len(view):
        raise InvalidRequest(
            f"payload is {len(view) - offset} bytes but the header's tensors need {sum(sizes)} "
            f"({', '.join(f'{w} {s.dtype}{list(s.shape)}' for w, s in specs)})")
    arrays = []
    for (what, spec), size in zip(specs, sizes):
        arr = np.frombuffer(view, dtype=WIRE_DTYPES[spec.dtype], count=size // WIRE_DTYPES[spec.dtype].itemsize,
                            offset=offset).reshape(tuple(spec.shape))
        arrays.append(arr)
        offset += size
    return header, arrays


@dataclass(frozen=True)
class Call:
    """One function's share of an Invoke: rows of the hidden tensor per expert, in expert order."""

    function_id: str
    rows: np.ndarray              # int32 [M]: expert j takes rows[sum(counts[:j]):sum(counts[:j+1])]
    expert_row_counts: Sequence[int]


_I32 = np.dtype("<i4")
_FUNCTION_ID = re.compile(r"[0-9a-f]{64}")


def encode_request(request_id: str, tenant_id: str, layer: int, hidden: np.ndarray,
                   calls: Sequence[Call], caller: str = "") -> bytes:
    """Payloads: hidden [N, H], then every call's rows and every call's per-expert counts as int32."""
    header = pb.InvokeRequest(request_id=request_id, tenant_id=tenant_id, layer=layer, hidden=spec_of(hidden),
                              caller=caller)
    rows = [np.asarray(c.rows, dtype=_I32) for c in calls]
    counts = [np.asarray(c.expert_row_counts, dtype=_I32) for c in calls]
    for call, r, n in zip(calls, rows, counts):
        header.calls.add(function_id=call.function_id, row_count=len(r), expert_count=len(n))
    all_rows = np.concatenate(rows) if len(rows) > 1 else (rows[0] if rows else np.zeros(0, _I32))
    all_counts = np.concatenate(counts) if len(counts) > 1 else (counts[0] if counts else np.zeros(0, _I32))
    header.rows.CopyFrom(spec_of(all_rows))
    header.counts.CopyFrom(spec_of(all_counts))
    return encode(header, [hidden, all_rows, all_counts])


def _request_specs(h: pb.InvokeRequest):
    return [("hidden", h.hidden), ("rows", h.rows), ("counts", h.counts)]


def decode_request(frame: bytes) -> tuple[pb.InvokeRequest, np.ndarray, list[Call]]:
    """Validate an Invoke frame: its header, the hidden rows [N, H] (a view) and each call with its rows and
    counts (views of the int32 payloads), every index checked against the frame."""
    header, (hidden, rows, counts) = decode(frame, pb.InvokeRequest, _request_specs)
    if header.hidden.dtype not in HIDDEN_DTYPES:
        raise InvalidRequest(f"hidden: dtype {header.hidden.dtype} not allowed (use {' or '.join(HIDDEN_DTYPES)})")
    if hidden.ndim != 2:
        raise InvalidRequest(f"hidden: expected 2 dimensions [rows, hidden_size], got shape {list(hidden.shape)}")
    for what, spec, arr in (("rows", header.rows, rows), ("counts", header.counts, counts)):
        if spec.dtype != "int32" or arr.ndim != 1:
            raise InvalidRequest(f"{what}: expected int32 [n], got {spec.dtype}{list(spec.shape)}")
    if sum(c.row_count for c in header.calls) != len(rows) or sum(c.expert_count for c in header.calls) != len(counts):
        raise InvalidRequest(f"calls announce {sum(c.row_count for c in header.calls)} rows and "
                             f"{sum(c.expert_count for c in header.calls)} counts; the payloads hold {len(rows)} and "
                             f"{len(counts)}")
    if not np.isfinite(hidden).all():
        raise InvalidRequest("hidden: NaN or Inf values; refused (the NaN/Inf policy: hidden states are finite, "
                             "a non-finite row is a bug or corruption upstream and is never computed on)")
    n_rows, calls, r0, c0 = hidden.shape[0], [], 0, 0
    if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n_rows):
        raise InvalidRequest(f"row index out of range [0, {n_rows})")
    for call in header.calls:
        if not _FUNCTION_ID.fullmatch(call.function_id):
            raise InvalidRequest(f"function id {call.function_id[:80]!r} is not a lowercase sha256 hex digest")
        if call.row_count < 0 or call.expert_count < 0:
            raise InvalidRequest(f"{call.function_id}: negative row_count or expert_count")
        r, n = rows[r0:r0 + call.row_count], counts[c0:c0 + call.expert_count]
        r0, c0 = r0 + call.row_count, c0 + call.expert_count
        if (len(n) and int(n.min()) < 0) or int(n.sum()) != len(r):
            raise InvalidRequest(f"{call.function_id}: expert row counts {n.tolist()} do not add up to {len(r)} rows")
        calls.append(Call(call.function_id, r, n.tolist()))
    return header, hidden, calls


def encode_reply(request_id: str, node_id: str, results: Sequence[tuple[pb.CallResult, np.ndarray]],
                 node_s: float) -> bytes:
    header = pb.InvokeReply(request_id=request_id, node_id=node_id, node_s=node_s)
    arrays = []
    for result, output in results:
        result.output.CopyFrom(spec_of(output))
        header.results.append(result)
        arrays.append(output)
    return encode(header, arrays)


def encode_error_reply(request_id: str, node_id: str, code: int, details: str, node_s: float,
                       missing_functions: Sequence[str] = ()) -> bytes:
    """An InvokeStream reply saying the request failed (no payloads)."""
    header = pb.InvokeReply(request_id=request_id, node_id=node_id, node_s=node_s,
                            error=pb.CallError(code=code, details=details, missing_functions=missing_functions))
    return encode(header, [])


def decode_reply(frame: bytes) -> tuple[pb.InvokeReply, list[np.ndarray]]:
    return decode(frame, pb.InvokeReply,
                  lambda h: [(f"output of {r.function_id}", r.output) for r in h.results])
