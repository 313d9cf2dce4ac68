"""Check an expert function file against the function ABI before ONNX Runtime ever opens it.

No onnx package and no weights in memory: the file's protobuf is walked field by field, seeking over tensor
data. A file passes only if it is exactly what :mod:`faasmoe.proto.function_abi` describes, up to the weight
values and free-text strings:

- the model: IR version, the opset imports of its precision (the default domain at ``OPSET``; quantized
  functions also ``com.microsoft`` for MatMulNBits), one graph, the ABI metadata; no local functions, no
  training info, nothing unknown;
- the graph: the inputs, output, nodes (operator, inputs, outputs, integer attributes) and initializers
  (name, data type, dims) that :func:`graph_ops` and :func:`initializers` list for its experts and sizes;
  no value_info, no sparse initializers, no subgraphs; the precision and block size named in the metadata
  decide which graph that is (MatMul over float32 weights, or MatMulNBits over packed blocks and scales);
- every initializer holds its bytes inline (``raw_data`` of exactly dims x item size): **no external data**,
  so a function can never read another file; the int64 constants hold the values the Slices need.

Anything else raises :class:`InvalidRequest` with the reason. Because every shape is pinned to the declared
hidden and intermediate sizes, a graph cannot allocate more per row than the experts it declares.
"""

from __future__ import annotations

import io
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from faasmoe.proto import function_abi as abi
from faasmoe.proto.errors import ConfigError, InvalidRequest

SMALL_BYTES = 1 << 16            # any message but a tensor's data is smaller than this
ITEM_BYTES = {abi.FLOAT: 4, abi.UINT8: 1, abi.INT64: 8}
DOMAINS = {"": "", "ai.onnx": "", abi.MS_DOMAIN: abi.MS_DOMAIN}
VARINT, I64, LEN, I32 = 0, 1, 2, 5


@dataclass(frozen=True)
class FunctionSpec:
    layer: int
    expert_ids: tuple[int, ...]
    hidden_size: int
    intermediate_size: int
    model_id: str
    precision: abi.Precision = abi.FP32


def _utf8(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("a name or string in the graph is not valid UTF-8") from None

def _varint(fh: BinaryIO) -> int:
    value = shift = 0
    while True:
        byte = fh.read(1)
        if not byte:
            raise InvalidRequest("truncated protobuf")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise InvalidRequest("malformed varint")


def _fields(fh: BinaryIO, end: int) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) up to ``end``; LEN values are (offset, length), read or skipped by
    the caller (the walk resumes after them either way)."""
    while fh.tell() < end:
        key = _varint(fh)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise InvalidRequest("field number 0")
        if wire == VARINT:
            yield number, wire, _varint(fh)
        elif wire in (I64, I32):
            data = fh.read(8 if wire == I64 else 4)
            yield number, wire, data
        elif wire == LEN:
            length = _varint(fh)
            start = fh.tell()
            if start + length > end:
                raise InvalidRequest("a field runs past the end of its message")
            yield number, wire, (start, length)
            fh.seek(start + length)
        else:
            raise InvalidRequest(f"wire type {wire} is not used by ONNX")
    if fh.tell() != end:
        raise InvalidRequest("a field runs past the end of its message")


def _read(fh: BinaryIO, span, what: str) -> bytes:
    start, length = span
    if length > SMALL_BYTES:
        raise InvalidRequest(f"{what} is {length} bytes, larger than any the ABI needs")
    fh.seek(start)
    return fh.read(length)


def _message(data: bytes, allowed: dict[int, tuple[int, str]], what: str) -> dict[int, list]:
    """Fields of a small message, each checked against ``allowed`` {number: (wire, name)}."""
    out: dict[int, list] = {}
    fh = io.BytesIO(data)
    for number, wire, value in _fields(fh, len(data)):
        spec = allowed.get(number)
        if spec is None:
            raise InvalidRequest(f"{what} has field {number}, which the function ABI does not use")
        if spec[0] != wire and not (spec[0] == "packed" and wire in (VARINT, LEN)):
            raise InvalidRequest(f"{what}.{spec[1]} has the wrong wire type")
        if wire == LEN:
            value = data[value[0]:value[0] + value[1]]
        out.setdefault(number, []).append(value)
    return out


def _text(values: list | None) -> str:
    try:
        return _utf8(values[-1]) if values else ""
    except UnicodeDecodeError:
        raise InvalidRequest("a name is not UTF-8") from None


def _ints(values: list | None) -> list[int]:
    out = []
    for v in values or []:
        if isinstance(v, int):
            out.append(v)
        else:                                           # packed
            fh = io.BytesIO(v)
            while fh.tell() < len(v):
                out.append(_varint(fh))
    return out


# field tables: {number: (wire type, name)}
_MODEL = {1: (VARINT, "ir_version"), 2: (LEN, "producer_name"), 3: (LEN, "producer_version"), 4: (LEN, "domain"),
          5: (VARINT, "model_version"), 6: (LEN, "doc_string"), 7: (LEN, "graph"), 8: (LEN, "opset_import"),
          14: (LEN, "metadata_props")}
_GRAPH = {1: (LEN, "node"), 2: (LEN, "name"), 5: (LEN, "initializer"), 10: (LEN, "doc_string"), 11: (LEN, "input"),
          12: (LEN, "output")}
_NODE = {1: (LEN, "input"), 2: (LEN, "output"), 3: (LEN, "name"), 4: (LEN, "op_type"), 5: (LEN, "attribute"),
         6: (LEN, "doc_string"), 7: (LEN, "domain")}
_ATTR = {1: (LEN, "name"), 3: (VARINT, "i"), 20: (VARINT, "type")}
_TENSOR_HEAD = {1: ("packed", "dims"), 2: (VARINT, "data_type"), 8: (LEN, "name"), 12: (LEN, "doc_string")}
_VALUE_INFO = {1: (LEN, "name"), 2: (LEN, "type"), 3: (LEN, "doc_string")}
_TYPE = {1: (LEN, "tensor_type")}
_TENSOR_TYPE = {1: (VARINT, "elem_type"), 2: (LEN, "shape")}
_SHAPE = {1: (LEN, "dim")}
_DIM = {1: (VARINT, "dim_value"), 2: (LEN, "dim_param"), 3: (LEN, "denotation")}
_OPSET = {1: (LEN, "domain"), 2: (VARINT, "version")}
_PAIR = {1: (LEN, "key"), 2: (LEN, "value")}
_EXTERNAL = {13: "external_data", 14: "data_location"}
ATTRIBUTE_INT = 2


def _node(data: bytes) -> abi.Op:
    f = _message(data, _NODE, "a node")
    domain = DOMAINS.get(_text(f.get(7)))
    if domain is None:
        raise InvalidRequest(f"operator domain {_text(f.get(7))!r}: only the default ONNX domain and "
                             f"{abi.MS_DOMAIN} (MatMulNBits) are allowed")
    attrs = []
    for raw in f.get(5, []):
        a = _message(raw, _ATTR, "an attribute")
        if _ints(a.get(20)) != [ATTRIBUTE_INT] or 3 not in a:
            raise InvalidRequest("only integer attributes are allowed")
        value = _ints(a.get(3))[-1]
        attrs.append((_text(a.get(1)), value - (1 << 64) if value >= 1 << 63 else value))
    return abi.Op(_text(f.get(4)), tuple(_utf8(v) for v in f.get(1, [])), tuple(_utf8(v) for v in f.get(2, [])),
                  tuple(attrs), domain)


def _tensor(fh: BinaryIO, span) -> tuple[str, int, tuple[int, ...], tuple[int, int] | None]:
    """(name, data type, dims, raw_data span) of an initializer, without reading its data."""
    start, length = span
    head, raw = bytearray(), None
    fh.seek(start)
    for number, wire, value in _fields(fh, start + length):
        if number in _EXTERNAL:
            raise InvalidRequest("an initializer refers to external data: functions must hold their weights inline")
        if number == 9 and wire == LEN:
            if raw is not None:
                raise InvalidRequest("an initializer has raw_data twice")
            raw = value
            continue
        if number not in _TENSOR_HEAD:
            raise InvalidRequest(f"an initializer has field {number} (only dims, data_type, name and raw_data are "
                                 "allowed)")
        head += _reencode(number, wire, value, fh)
    f = _message(bytes(head), _TENSOR_HEAD, "an initializer")
    dtype = _ints(f.get(2))
    return _text(f.get(8)), dtype[-1] if dtype else 0, tuple(_ints(f.get(1))), raw


def _reencode(number: int, wire: int, value, fh: BinaryIO) -> bytes:
    """A small field back in wire format (for :func:`_message`)."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    if wire == VARINT:
        return varint(number << 3) + varint(value)
    if wire == LEN:
        here = fh.tell()
        data = _read(fh, value, "an initializer field")
        fh.seek(here)
        return varint(number << 3 | LEN) + varint(len(data)) + data
    return varint(number << 3 | wire) + value


def _value_info(data: bytes) -> tuple[str, int, tuple]:
    """(name, element type, dims) of a graph input or output; a dim is an int or None (symbolic)."""
    f = _message(data, _VALUE_INFO, "a graph input or output")
    t = _message((f.get(2) or [b""])[-1], _TYPE, "a type")
    tt = _message((t.get(1) or [b""])[-1], _TENSOR_TYPE, "a tensor type")
    dims = []
    for raw in _message((tt.get(2) or [b""])[-1], _SHAPE, "a shape").get(1, []):
        d = _message(raw, _DIM, "a dimension")
        dims.append(_ints(d.get(1))[-1] if 1 in d else None)
    return _text(f.get(1)), (_ints(tt.get(1)) or [0])[-1], tuple(dims)


def _metadata(pairs: list[bytes]) -> FunctionSpec:
    meta = {}
    for raw in pairs:
        p = _message(raw, _PAIR, "a metadata entry")
        meta[_text(p.get(1))] = _text(p.get(2))
    if meta.get(abi.META_ABI) != abi.ABI_VERSION:
        raise InvalidRequest(f"not a faasmoe expert function of ABI {abi.ABI_VERSION} (metadata {abi.META_ABI}="
                             f"{meta.get(abi.META_ABI)!r})")
    try:
        experts = tuple(int(e) for e in meta[abi.META_EXPERTS].split(","))
        precision = abi.FP32
        if abi.META_PRECISION in meta or abi.META_BLOCK_SIZE in meta:
            precision = abi.Precision(meta.get(abi.META_PRECISION, ""), int(meta.get(abi.META_BLOCK_SIZE, "0")))
            if not precision.quantized:
                raise ConfigError("a float32 function names no precision or block size")
        spec = FunctionSpec(int(meta[abi.META_LAYER]), experts, int(meta[abi.META_HIDDEN]),
                            int(meta[abi.META_INTERMEDIATE]), meta.get(abi.META_MODEL, ""), precision)
    except (KeyError, ValueError, ConfigError) as err:
        raise InvalidRequest(f"bad or missing ABI metadata ({err})") from None
    if not 0 < len(experts) <= abi.MAX_EXPERTS or len(set(experts)) != len(experts) or min(experts) < 0:
        raise InvalidRequest(f"expert ids {meta[abi.META_EXPERTS][:80]!r}: 1 to {abi.MAX_EXPERTS} distinct ids >= 0")
    if not (0 <= spec.layer < 1 << 16 and 0 < spec.hidden_size <= abi.MAX_HIDDEN
            and 0 < spec.intermediate_size <= abi.MAX_INTERMEDIATE):
        raise InvalidRequest(f"layer {spec.layer}, hidden size {spec.hidden_size} or intermediate size "
                             f"{spec.intermediate_size} out of range")
    return spec


def check_function(path: str | Path) -> FunctionSpec:
    """Validate the function file at ``path``; its spec, or InvalidRequest with the reason."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > abi.MAX_FUNCTION_BYTES:
            raise InvalidRequest(f"{size} bytes, over the {abi.MAX_FUNCTION_BYTES}-byte limit of a function")
        model: dict[int, list] = {}
        for number, wire, value in _fields(fh, size):
            spec = _MODEL.get(number)
            if spec is None:
                raise InvalidRequest(f"the model has field {number} (local functions, training info or unknown "
                                     "content), which the function ABI does not allow")
            if spec[0] != wire:
                raise InvalidRequest(f"model.{spec[1]} has the wrong wire type")
            model.setdefault(number, []).append(value)
        if len(model.get(7, [])) != 1:
            raise InvalidRequest("the model must have exactly one graph")
        if _ints(model.get(1)) != [abi.IR_VERSION]:
            raise InvalidRequest(f"IR version {_ints(model.get(1))}, the ABI uses {abi.IR_VERSION}")
        opsets = [_message(_read(fh, s, "opset_import"), _OPSET, "an opset import") for s in model.get(8, [])]
        spec = _metadata([_read(fh, s, "metadata") for s in model.get(14, [])])
        imports = [(DOMAINS.get(_text(o.get(1)), "?"), _ints(o.get(2))) for o in opsets]
        want = [(domain, [version]) for domain, version in abi.opset_imports(spec.precision)]
        if imports != want:
            raise InvalidRequest(f"opset imports must be {', '.join(f'{d or chr(34)*2}:{v[0]}' for d, v in want)} "
                                 f"for a {spec.precision.label} function")
        _check_graph(fh, model[7][0], spec)
    return spec


def _check_graph(fh: BinaryIO, span, spec: FunctionSpec) -> None:
    start, length = span
    ops, inputs, outputs, tensors = [], [], [], {}
    expected_ops = abi.graph_ops(spec.expert_ids, spec.hidden_size, spec.intermediate_size, spec.precision)
    limit = (len(expected_ops) + len(spec.expert_ids) + 2      # nodes, inputs, output
             + len(abi.initializers(spec.expert_ids, 1, 1, spec.precision)))   # any more parts and it cannot match
    fh.seek(start)
    for number, wire, value in _fields(fh, start + length):
        if len(ops) + len(inputs) + len(outputs) + len(tensors) > 2 * limit:
            raise InvalidRequest("the graph has more parts than the ABI's for its experts")
        if number not in _GRAPH or wire != LEN:
            raise InvalidRequest(f"the graph has field {number} (value_info, sparse initializers, quantization "
                                 "annotations or unknown content), which the function ABI does not allow")
        here = fh.tell()
        if number == 1:
            ops.append(_node(_read(fh, value, "a node")))
        elif number == 11:
            inputs.append(_value_info(_read(fh, value, "a graph input")))
        elif number == 12:
            outputs.append(_value_info(_read(fh, value, "a graph output")))
        elif number == 5:
            name, dtype, dims, raw = _tensor(fh, value)
            if name in tensors:
                raise InvalidRequest(f"initializer {name!r} appears twice")
            tensors[name] = (dtype, dims, raw)
        fh.seek(here)
    experts, hidden, inter = spec.expert_ids, spec.hidden_size, spec.intermediate_size
    if ops != expected_ops:
        bad, want = next(((op, w) for op, w in zip(ops, expected_ops) if op != w), (None, None))
        if bad is not None and bad.domain != want.domain:
            raise InvalidRequest(f"operator {bad.op_type} is in domain {bad.domain or 'ai.onnx'!r}; the ABI's "
                                 f"{want.op_type} is in {want.domain or 'ai.onnx'!r}")
        known = {o.op_type for o in expected_ops}
        if any(op.op_type not in known for op in ops):
            unknown = sorted({op.op_type for op in ops} - known)
            raise InvalidRequest(f"operators {unknown} are not part of the function ABI")
        raise InvalidRequest(f"the graph is not the ABI's for {spec.precision.label} experts {list(experts)[:8]}: "
                             f"{len(ops)} nodes vs {len(expected_ops)}" + (f", first difference at {bad.op_type} "
                                                                           f"{bad.outputs}" if bad else ""))
    want_inputs = [(abi.HIDDEN_INPUT, abi.FLOAT, 2)] + [(abi.rows_input(j), abi.INT64, 1) for j in range(len(experts))]
    if [(n, t, len(d)) for n, t, d in inputs] != want_inputs or inputs[0][2][1] != hidden:
        raise InvalidRequest(f"inputs must be {abi.HIDDEN_INPUT} float32 [n, {hidden}] and rows_0..rows_"
                             f"{len(experts) - 1} int64 [n_j]")
    if [(n, t) for n, t, _ in outputs] != [(abi.OUTPUT, abi.FLOAT)] or outputs[0][2][1:] != (hidden,):
        raise InvalidRequest(f"the output must be {abi.OUTPUT} float32 [m, {hidden}]")
    want = abi.initializers(experts, hidden, inter, spec.precision)
    if {k: (t, d) for k, (t, d, _) in tensors.items()} != want:
        odd = sorted(set(tensors) ^ set(want)) or sorted(k for k in want if tensors[k][:2] != want[k])
        raise InvalidRequest(f"initializers differ from the ABI's (names, data types or dims): {odd[:4]}")
    for name, (dtype, dims, raw) in tensors.items():
        need = math.prod(dims) * ITEM_BYTES[dtype]
        if raw is None or raw[1] != need:
            raise InvalidRequest(f"initializer {name!r} holds {0 if raw is None else raw[1]} bytes, its dims need "
                                 f"{need}")
    for name, value in abi.constant_values(inter).items():
        fh.seek(tensors[name][2][0])
        if struct.unpack("<q", fh.read(8))[0] != value:
            raise InvalidRequest(f"constant {name} must be {value}")
