"""Whether bytes are an ONNX model that keeps every tensor inside itself: a small protobuf walk with the standard
library (deployment hosts have no ``onnx`` package), used wherever a zoo's model file is read."""
from __future__ import annotations

from pathlib import Path

from klas_runtime.errors import ZooError

MANIFEST = "manifest.json"  # named in the refusal (klas_runtime.manifest.MANIFEST; not imported: no cycle)

# ONNX protobuf field numbers (onnx/onnx.proto) of the messages that can hold tensors, directly or in subgraphs.
_MSG_FIELDS = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {},
}
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _MAX_DEPTH = 13, 14, 64


class _NotProtobuf(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _NotProtobuf("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf, pos: int, end: int):
    """(field number, wire type, value or (start, end) of a length-delimited payload) of one message."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _NotProtobuf("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield field, wire, value
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise _NotProtobuf("truncated fixed-size field")
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _NotProtobuf("length past the end")
            yield field, wire, (pos, pos + n)
            pos += n
        else:  # groups (3, 4) are not used by ONNX; 6, 7 do not exist
            raise _NotProtobuf(f"wire type {wire}")


def _external_tensor(buf, kind: str, start: int, end: int, depth: int = 0) -> bool:
    """Whether the message of ``kind`` at buf[start:end] (or a tensor in a subgraph of it) uses external data."""
    if depth > _MAX_DEPTH:
        raise _NotProtobuf("nesting too deep")
    inner = _MSG_FIELDS[kind]
    for field, wire, value in _fields(buf, start, end):
        if kind == "tensor":
            if field == _TENSOR_EXTERNAL_DATA and wire == 2:
                return True
            if field == _TENSOR_DATA_LOCATION and wire == 0 and value != 0:
                return True
        elif field in inner and wire == 2 and _external_tensor(buf, inner[field], *value, depth + 1):
            return True
    return False


def check_onnx_bytes(data: bytes, path: Path | str) -> None:
    """Refuse bytes that are not an ONNX model, or whose tensors keep their data in external files.

    Models run from the hashed bytes; external data would be read from another file (relative to the current
    directory, for a model loaded from memory) that the manifest does not cover, so it is refused, never resolved.
    A small protobuf walk of ModelProto (graphs, nodes, attributes, subgraphs, functions, sparse tensors) with the
    standard library: no ``onnx`` package on deployment hosts."""
    buf = memoryview(data)
    try:
        top = {field: value for field, wire, value in _fields(buf, 0, len(buf))
               if (field, wire) in ((1, 0), (7, 2))}
        if 1 not in top or 7 not in top:
            raise _NotProtobuf("no ir_version or graph")
        external = _external_tensor(buf, "model", 0, len(buf))
    except (_NotProtobuf, IndexError) as e:
        raise ZooError(f"{path}: not an ONNX model (unreadable protobuf: {e})") from None
    if external:
        raise ZooError(f"{path}: the model keeps tensors in external data files, which {MANIFEST} does not cover "
                        f"and would be read from outside the zoo; refusing it (export with the weights inside the "
                        f".onnx file)")


def _string(buf, start: int, end: int) -> str:
    return bytes(buf[start:end]).decode("utf-8", errors="replace")


def _value_info(buf, start: int, end: int) -> tuple[str, list]:
    """(name, dims) of a ValueInfoProto: dims are ints, names of symbolic dims, or None (unknown)."""
    name, dims = "", None
    for field, wire, value in _fields(buf, start, end):
        if field == 1 and wire == 2:
            name = _string(buf, *value)
        elif field == 2 and wire == 2:  # TypeProto -> tensor_type (1) -> shape (2) -> dim (1)
            for f1, w1, v1 in _fields(buf, *value):
                if f1 == 1 and w1 == 2:
                    for f2, w2, v2 in _fields(buf, *v1):
                        if f2 == 2 and w2 == 2:
                            dims = []
                            for f3, w3, v3 in _fields(buf, *v2):
                                if f3 == 1 and w3 == 2:
                                    dim = None
                                    for f4, w4, v4 in _fields(buf, *v3):
                                        dim = v4 if (f4, w4) == (1, 0) else _string(buf, *v4) if (f4, w4) == (2, 2) \
                                            else dim
                                    dims.append(dim)
    return name, dims


def onnx_facts(data: bytes, path: Path | str) -> dict:
    """What an ONNX file says of itself, read without onnxruntime: ``metadata`` (metadata_props as a dict) and the
    graph's ``inputs`` / ``outputs`` as (name, dims) pairs -- what every reader of a zoo compares with the manifest
    entry before trusting the file under that entry's name."""
    buf = memoryview(data)
    meta, inputs, outputs = {}, [], []
    try:
        for field, wire, value in _fields(buf, 0, len(buf)):
            if field == 14 and wire == 2:  # metadata_props: StringStringEntryProto {key 1, value 2}
                kv = {f: _string(buf, *v) for f, w, v in _fields(buf, *value) if w == 2}
                meta[kv.get(1, "")] = kv.get(2, "")
            elif field == 7 and wire == 2:  # graph: input 11, output 12
                for f, w, v in _fields(buf, *value):
                    if w == 2 and f in (11, 12):
                        (inputs if f == 11 else outputs).append(_value_info(buf, *v))
    except (_NotProtobuf, IndexError) as e:
        raise ZooError(f"{path}: not an ONNX model (unreadable protobuf: {e})") from None
    return dict(metadata=meta, inputs=inputs, outputs=outputs)
