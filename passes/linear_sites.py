"""Linear sites shared by the weight passes (`precision.py`, `qdq_int8.py`, `sparsity.py`) and calibration.

A linear site is a `MatMul(x, W)` / `Gemm(x, W[, bias])` with a constant 2-D float32 weight (`as_linear`);
each is attributed to a layer key (`decoder.layers.3`, `vision.blocks.5`, `vision.merger`, `decoder.lm_head`)
from its `pkg.torch.onnx.name_scopes` metadata, a `qvl.layer` stamp or its weight's initializer name
(`layer_key`), which is what the accuracy budgets roll back; `matches_keep` is the one `keep_fp32` matching rule.

The lm_head is `decoder.lm_head` whether tied (its weight is the embedding table `embed_tokens.weight`) or untied
(its own `lm_head.weight`). An untied decoder's embedding table is read only by the runtime's host-side lookup, so
no node uses it: it travels with the decoder model as its `host_embedding` (below), not as an initializer.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qvl.passes.base import Skip

EMBEDDING_NAME = "embed_tokens.weight"  # the export's [vocab, hidden] embedding table (toolchain/export/exporter.py)
LM_HEAD_NAME = "lm_head.weight"  # an untied checkpoint's own [vocab, hidden] lm_head matrix
LM_HEAD_LAYER = "decoder.lm_head"
EMBEDDING_LAYER = "decoder.embed_tokens"  # an untied decoder's host embedding table (the precision pass's layer key)
HOST_EMBEDDING = "qvl.host_embedding"  # key of `host_embedding` in the decoder graph's `meta`
_ROOT_PREFIXES = ("model.language_model.", "model.visual.", "language_model.", "visual.", "model.", "lm.")


def name_scopes(node: ir.Node) -> list[str]:
    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not raw:
        return []
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return []
    return [s for s in scopes if isinstance(s, str) and s]


def module_path(node: ir.Node, weight_name: str | None) -> str | None:
    """The node's torch module path (`lm.layers.0.self_attn.q_proj`), from metadata or the weight name."""
    dotted = [s for s in name_scopes(node) if "." in s]
    if dotted:
        return max(dotted, key=len)
    if weight_name and "." in weight_name:
        return weight_name.rsplit(".", 1)[0] if weight_name.endswith((".weight", ".bias")) else weight_name
    return None


def layer_key(node: ir.Node, graph_name: str, weight_name: str | None) -> str:
    """`decoder.layers.3` / `vision.blocks.5` / `vision.merger` / `decoder.lm_head` / `<graph>.<node>`."""
    if weight_name in (EMBEDDING_NAME, LM_HEAD_NAME) or node.metadata_props.get("qvl.layer") == LM_HEAD_LAYER:
        return LM_HEAD_LAYER
    if node.metadata_props.get("qvl.layer"):
        return node.metadata_props["qvl.layer"]
    path = module_path(node, weight_name)
    if path is None:
        return f"{graph_name}.{node.name}"
    for prefix in _ROOT_PREFIXES:
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    parts = path.split(".")
    if len(parts) >= 2 and parts[1].isdigit():
        return f"{graph_name}.{parts[0]}.{parts[1]}"
    return f"{graph_name}.{parts[0]}"


@dataclass
class Linear:
    node: ir.Node
    activation: ir.Value
    weight: ir.Value
    bias: ir.Value | None
    w_nk: bool  # weight stored [N, K] (Gemm transB=1) rather than [K, N]
    k: int
    n: int


def gemm_attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def as_linear(node: ir.Node) -> Linear | str | None:
    """A convertible linear layer, a reason string (linear but not convertible), or None (not a linear layer)."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
        return None
    a, w = node.inputs[0], node.inputs[1]
    if w is None or w.const_value is None or not w.is_initializer():
        return None  # activation x activation (attention scores): not a weight layer
    if w.dtype != ir.DataType.FLOAT:
        return f"weight dtype {w.dtype} is not float32"
    shape = tuple(w.const_value.shape)
    if len(shape) != 2:
        return f"weight rank {len(shape)} is not 2"
    if a.dtype is not None and a.dtype != ir.DataType.FLOAT:
        return f"activation dtype {a.dtype} is not float32 (this pass keeps activations fp32)"
    if node.op_type == "MatMul":
        if a.shape is not None and a.shape.rank() < 2:
            return "rank-1 activation"
        return Linear(node, a, w, None, False, shape[0], shape[1])
    if gemm_attr(node, "transA", 0) != 0:
        return "Gemm transA=1"
    if gemm_attr(node, "alpha", 1.0) != 1.0:
        return "Gemm alpha != 1"
    trans_b = gemm_attr(node, "transB", 0) == 1
    k, n = (shape[1], shape[0]) if trans_b else shape
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None:
        if gemm_attr(node, "beta", 1.0) != 1.0:
            return "Gemm beta != 1"
        if bias.const_value is None or tuple(bias.const_value.shape) != (n,):
            return "Gemm bias is not a constant [N] vector"
    return Linear(node, a, w, bias, trans_b, k, n)


def matches_keep(keep: frozenset, node: ir.Node, graph_name: str, layer: str, weight_name: str, path: str | None) -> str | None:
    for name in (node.name, f"{graph_name}/{node.name}", layer, weight_name, *(name_scopes(node))):
        if name and name in keep:
            return name
    if path:
        for k in keep:
            if path.startswith(k + "."):
                return k
    return None


def linear_sites(model: ir.Model, graph_name: str) -> list[tuple[ir.Node, Linear | str, str]]:
    """(node, Linear or the reason it is not convertible, layer key) for every linear layer of the graph."""
    out = []
    for node in model.graph:
        lin = as_linear(node)
        if lin is not None:
            out.append((node, lin, layer_key(node, graph_name, node.inputs[1].name)))
    return out


def skip_site(report, entry: dict, node: ir.Node, layer: str, reason: str) -> None:
    """One skipped site: in the report (`Skip(node, "layer: reason")`) and in its layer's entry."""
    report.skipped.append(Skip(node.name, f"{layer}: {reason}"))
    entry.setdefault("reasons", []).append(f"{node.name}: {reason}")


def add_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """Register `array` as a new initializer named `base` (or `base.1`, `base.2`, ... if taken)."""
    name, i = base, 1
    while name in graph.initializers:
        name, i = f"{base}.{i}", i + 1
    array = np.ascontiguousarray(array)
    v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                 const_value=ir.tensor(array, name=name))
    graph.register_initializer(v)
    return v


# -- an untied decoder's host embedding ---------------------------------------------------------------------


def host_embedding(graph: ir.Graph) -> dict | None:
    """An untied decoder's token-embedding table, or None (tied: the table is the lm_head's own weight).

    `{"table": Value}` (dense float32 `[vocab, hidden]`), or after the precision pass the MatMulNBits parts
    `{"packed": Value, "scales": Value, "zero_points": Value | None, "bits": int, "block_size": int}`. The Values
    are not registered in the graph: no node reads the table (the runtime embeds tokens on the host), and the
    fusion passes' dead-code elimination would drop an unused initializer (ONNX Runtime and TensorRT would load
    one for nothing). It lives in the graph's `meta` (onnx-ir's in-memory store, never serialized), which in-place
    passes keep; `artifacts/writer.py` puts it in the weight store, records it as the manifest's `embedding` and
    restores it when it loads the artifact's graphs."""
    return graph.meta.get(HOST_EMBEDDING)


def set_host_embedding(graph: ir.Graph, parts: dict | None) -> None:
    if parts is None:
        graph.meta.pop(HOST_EMBEDDING, None)
    else:
        graph.meta[HOST_EMBEDDING] = parts


def host_value(name: str, array) -> ir.Value:
    """A constant Value for `host_embedding` (not registered in any graph); `array`: numpy or an ir tensor."""
    tensor = ir.tensor(np.ascontiguousarray(array), name=name) if isinstance(array, np.ndarray) else array
    return ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
