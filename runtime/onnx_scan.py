"""Find tensors an ONNX file keeps outside itself ("external data"), without the onnx package.

A bundle's manifest hashes each .onnx file, but ONNX Runtime also loads weights from files that a
graph names beside it, and no hash covers those. The runtime therefore refuses graphs with external
data. The runtime does not depend on `onnx`, so this walks the protobuf wire format itself, through
only the messages that can hold a TensorProto, skipping tensor payloads without copying them.
"""

from __future__ import annotations

# message -> {field number: message type of that (length-delimited) field}; other fields are skipped.
_MESSAGES: dict[str, dict[int, str]] = {
    "Model": {7: "Graph", 20: "TrainingInfo", 25: "Function"},
    "Graph": {1: "Node", 5: "Tensor", 15: "SparseTensor"},
    "Node": {5: "Attribute"},
    "Attribute": {5: "Tensor", 6: "Graph", 10: "Tensor", 11: "Graph", 22: "SparseTensor", 23: "SparseTensor"},
    "Function": {7: "Node", 11: "Attribute"},
    "TrainingInfo": {1: "Graph", 2: "Graph"},
    "SparseTensor": {1: "Tensor", 2: "Tensor"},
}
TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 8, 13, 14
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
MAX_DEPTH = 64  # nested graphs (If/Loop bodies) deeper than any real model


class NotOnnx(ValueError):
    """The bytes are not a well-formed ONNX protobuf."""


def external_tensors(data: bytes | memoryview) -> list[str]:
    """Names of the tensors whose data lives outside the file (unnamed ones as "?")."""
    found: list[str] = []
    _walk(memoryview(data), "Model", found, 0)
    return found


def _varint(data: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise NotOnnx("truncated or overlong varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _fields(data: memoryview):
    """(field number, wire type, value): an int for varints, a memoryview for length-delimited."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at)
        elif wire == 1:
            value, at = None, at + 8
        elif wire == 2:
            length, at = _varint(data, at)
            if at + length > len(data):
                raise NotOnnx("a field runs past the end of its message")
            value, at = data[at : at + length], at + length
        elif wire == 5:
            value, at = None, at + 4
        else:
            raise NotOnnx(f"wire type {wire} is not used by ONNX")
        if at > len(data):
            raise NotOnnx("truncated field")
        yield number, wire, value


def _walk(data: memoryview, message: str, found: list[str], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise NotOnnx(f"messages nest deeper than {MAX_DEPTH}")
    if message == "Tensor":
        _check_tensor(data, found)
        return
    children = _MESSAGES[message]
    for number, wire, value in _fields(data):
        if wire == 2 and number in children:
            _walk(value, children[number], found, depth + 1)


def _check_tensor(data: memoryview, found: list[str]) -> None:
    name, external = "?", False
    for number, wire, value in _fields(data):
        if number == TENSOR_NAME and wire == 2:
            name = bytes(value).decode("utf-8", "replace")
        elif (number == TENSOR_EXTERNAL_DATA and wire == 2) or (
            number == TENSOR_DATA_LOCATION and wire == 0 and value == EXTERNAL
        ):
            external = True
    if external:
        found.append(name)
