"""What an ONNX graph file reads besides itself, found without the `onnx` package (the runtime install has none).

A minimal protobuf walk over the few fields that matter: the graph's inputs and outputs (names) and every
tensor's external-data `location` -- initializers, sparse initializers, tensor attributes of nodes, nested
subgraphs and model-local functions. Everything else is skipped by length, so a graph file of a few MB is
scanned in milliseconds. Used to check that every weight a graph loads comes from the artifact's one,
hashed weight store, and that the graph's I/O is the one the manifest records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qvl.errors import QvlError

# field numbers from onnx.proto3
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INIT, _GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_SPARSE = 1, 5, 11, 12, 15
_FUNC_NODE = 7
_NODE_ATTR = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 8, 13, 14
_VALUEINFO_NAME = 1
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_MAX_DEPTH = 64


class _Corrupt(Exception):
    pass


@dataclass
class GraphRefs:
    inputs: list[str] = field(default_factory=list)  # main graph inputs that are not initializers
    outputs: list[str] = field(default_factory=list)
    initializers: set[str] = field(default_factory=set)
    external: dict[str, str | None] = field(default_factory=dict)  # tensor name -> location (None: EXTERNAL, no location)


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= end or shift > 63:
            raise _Corrupt("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, value or (start, end) of a length-delimited payload) of one message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = _varint(buf, pos, end)
            yield num, wt, val
        elif wt == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _Corrupt("length past the end of its message")
            yield num, wt, (pos, pos + n)
            pos += n
        elif wt == 1:
            pos += 8
        elif wt == 5:
            pos += 4
        else:
            raise _Corrupt(f"unsupported wire type {wt}")
        if pos > end:
            raise _Corrupt("field past the end of its message")


def _text(buf: memoryview, span: tuple[int, int]) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", "replace")


def _tensor(buf, span, refs: GraphRefs, top: bool) -> None:
    name, location, external = "", None, False
    for num, wt, val in _fields(buf, *span):
        if num == _TENSOR_NAME and wt == 2:
            name = _text(buf, val)
        elif num == _TENSOR_LOCATION and wt == 0:
            external = external or val == 1
        elif num == _TENSOR_EXTERNAL and wt == 2:
            external = True
            key = value = None
            for n2, w2, v2 in _fields(buf, *val):
                if w2 == 2 and n2 == _ENTRY_KEY:
                    key = _text(buf, v2)
                elif w2 == 2 and n2 == _ENTRY_VALUE:
                    value = _text(buf, v2)
            if key == "location":
                location = value
    if top:
        refs.initializers.add(name)
    if external:
        refs.external[name or f"<unnamed #{len(refs.external)}>"] = location


def _sparse(buf, span, refs, top) -> None:
    for num, wt, val in _fields(buf, *span):
        if wt == 2 and num in (_SPARSE_VALUES, _SPARSE_INDICES):
            _tensor(buf, val, refs, top and num == _SPARSE_VALUES)


def _nodes_of(buf, span, refs, depth, node_field) -> None:
    for num, wt, val in _fields(buf, *span):
        if num == node_field and wt == 2:
            for n2, w2, v2 in _fields(buf, *val):
                if n2 == _NODE_ATTR and w2 == 2:
                    _attribute(buf, v2, refs, depth)


def _attribute(buf, span, refs, depth) -> None:
    for num, wt, val in _fields(buf, *span):
        if wt != 2:
            continue
        if num in (_ATTR_T, _ATTR_TENSORS):
            _tensor(buf, val, refs, False)
        elif num in (_ATTR_SPARSE, _ATTR_SPARSES):
            _sparse(buf, val, refs, False)
        elif num in (_ATTR_G, _ATTR_GRAPHS):
            _graph(buf, val, refs, depth + 1, top=False)


def _graph(buf, span, refs: GraphRefs, depth: int, top: bool) -> None:
    if depth > _MAX_DEPTH:
        raise _Corrupt("subgraphs nested too deep")
    for num, wt, val in _fields(buf, *span):
        if wt != 2:
            continue
        if num == _GRAPH_INIT:
            _tensor(buf, val, refs, top)
        elif num == _GRAPH_SPARSE:
            _sparse(buf, val, refs, top)
        elif num == _GRAPH_NODE:
            for n2, w2, v2 in _fields(buf, *val):
                if n2 == _NODE_ATTR and w2 == 2:
                    _attribute(buf, v2, refs, depth)
        elif top and num in (_GRAPH_INPUT, _GRAPH_OUTPUT):
            name = next((_text(buf, v2) for n2, w2, v2 in _fields(buf, *val) if n2 == _VALUEINFO_NAME and w2 == 2), "")
            (refs.inputs if num == _GRAPH_INPUT else refs.outputs).append(name)


def scan_graph(path: Path) -> GraphRefs:
    """Inputs, outputs and external-data references of the ONNX model file `path` (QvlError if unparsable)."""
    path = Path(path)
    try:
        data = memoryview(path.read_bytes())
    except OSError as exc:
        raise QvlError(f"cannot read artifact graph {path.name}: {exc.strerror or exc}") from None
    refs = GraphRefs()
    try:
        seen_graph = False
        for num, wt, val in _fields(data, 0, len(data)):
            if num == _MODEL_GRAPH and wt == 2:
                _graph(data, val, refs, 0, top=True)
                seen_graph = True
            elif num == _MODEL_FUNCTIONS and wt == 2:
                _nodes_of(data, val, refs, 1, _FUNC_NODE)
        if not seen_graph:
            raise _Corrupt("no graph")
    except _Corrupt as exc:
        raise QvlError(f"artifact graph {path.name} is not a valid ONNX model ({exc})") from None
    refs.inputs = [n for n in refs.inputs if n not in refs.initializers]
    return refs
