"""float16 weights and KV cache, with float32 islands where float16 overflows.

Every node gets a precision. Weights feeding float16 nodes become float16 initializers; activations crossing
between precisions get one Cast (shared by all consumers). Graph I/O: float inputs (the past KV) and every float
output except `logits` become float16, so KV inputs and outputs share one dtype and the runtime can feed a
present straight back as the next past. `logits` stays float32 (a Cast at the end): the runtime's sampling
(softmax, top-p, repetition penalty) works in float32, and logits are cheap next to the KV cache.

What stays float32, and why:

    attention scores   Q @ K^T ─Mul(scale)─Add(mask)─Softmax       unfused graphs
        The raw dot products overflow float16 (65504) before the scale is applied when the residual stream has
        large channels, as real GPT-2 / GPT-J do; transformers' GPT-J upcasts q and k to float32 for this reason.
        A fused MultiHeadAttention applies the scale inside its score GEMM, so it stays float16 (on CPU,
        onnxruntime computes it in float32 anyway, see kernels.py).
    ops with no float16 schema (kernels.FP16_CPU NONE: DynamicQuantizeMatMul, ...): the session would fail.
    anything named in `keep_fp32` (op types or node names).
    constant-only subgraphs that feed only float32 nodes (the additive mask feeding the scores): no round trip.

Constants beyond float16's range (the mask's "minus infinity", float32 min) are clamped to float16's finite
extremes, as transformers itself builds the mask in float16 (torch.finfo(float16).min); never inf, which would
turn a fully masked (left-padding) row into NaN.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from .kernels import fp16_schema_ok

FLOAT, HALF = ir.DataType.FLOAT, ir.DataType.FLOAT16
ATTENTION_SCORES = "attention_scores"  # keep_fp32 entry: the automatically found score islands
KEEP_FP32 = (ATTENTION_SCORES,)
FP32_OUTPUTS = ("logits",)
_HALF_MAX = float(np.finfo(np.float16).max)
_SHAPE_ONLY = {"Shape", "Size"}  # read only the shape of their input: any dtype will do
# Outputs typed U (statistics), float32 whatever the input dtype.
_STAT_OUTPUTS = {"LayerNormalization": (1, 2), "SkipLayerNormalization": (1, 2),
                 "SkipSimplifiedLayerNormalization": (1, 2)}
_SCORE_CHAIN = {"Add", "Sub", "Mul", "Div", "Where"}


def to_fp16(model: ir.Model, keep_fp32: Iterable[str] = KEEP_FP32, fp32_outputs: Iterable[str] = FP32_OUTPUTS,
            report: dict[str, str] | None = None) -> int:
    """Convert a float32 graph to float16 weights and KV I/O, keeping overflow-prone parts in float32.

    Args:
        model: the model, changed in place (unfused standard ONNX or fused com.microsoft graphs).
        keep_fp32: op types or node names to keep in float32; "attention_scores" (the default) keeps each
            Q @ K^T ... Softmax chain in float32. Pass () for a naive all-float16 graph (tests do, to show it fails).
        fp32_outputs: graph outputs that stay float32.
        report: if given, filled with name -> reason for every float32 node kept and every weight clamped.
    Returns:
        the number of initializers converted to float16.
    """
    graph = model.graph
    report = {} if report is None else report
    fp32 = _fp32_nodes(graph, set(keep_fp32), report)
    converter = _Converter(graph, fp32, report)
    for value in graph.inputs:
        if value.dtype == FLOAT:
            value.dtype = HALF
    for node in list(graph):
        converter.visit(node)
    _fix_outputs(graph, set(fp32_outputs))
    return converter.converted


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in (FLOAT, HALF)


def _is_const(value: ir.Value) -> bool:
    return value.const_value is not None or (value.producer() is not None and value.producer().op_type == "Constant")


def _touches_float(node: ir.Node) -> bool:
    return any(_is_float(v) for v in (*node.inputs, *node.outputs))


def _fp32_nodes(graph: ir.Graph, keep: set[str], report: dict[str, str]) -> set[ir.Node]:
    """The nodes that compute in float32: requested, score islands, no-fp16 ops, and constants feeding them."""
    fp32: set[ir.Node] = set()
    for node in graph:
        if not _touches_float(node):
            continue
        if node.op_type in keep or (node.name and node.name in keep):
            fp32.add(node)
            report[node.name or node.op_type] = f"kept float32: {node.op_type} listed in keep_fp32"
        elif not fp16_schema_ok(node.domain, node.op_type):
            fp32.add(node)
            report[node.name or node.op_type] = f"kept float32: {node.domain}.{node.op_type} takes no float16"
    if ATTENTION_SCORES in keep:
        for softmax in (n for n in graph if n.op_type == "Softmax" and n.domain in ("", "ai.onnx")):
            chain = _score_chain(softmax.inputs[0], depth=4)
            for node in chain or ():
                fp32.add(node)
                report[node.name or node.op_type] = "kept float32: attention scores overflow float16"
            fp32.add(softmax) if chain else None
    _absorb_constant_feeders(graph, fp32)
    return fp32


def _score_chain(value: ir.Value, depth: int) -> list[ir.Node] | None:
    """Nodes from an activation x activation MatMul through elementwise ops up to `value`, else None."""
    node = value.producer() if value is not None else None
    if node is None or depth == 0:
        return None
    if node.op_type == "MatMul" and not any(_is_const(v) for v in node.inputs):
        return [node]
    if node.op_type not in _SCORE_CHAIN:
        return None
    for operand in node.inputs:
        if _is_float(operand) and not _is_const(operand):
            chain = _score_chain(operand, depth - 1)
            if chain:
                return [*chain, node]
    return None


def _absorb_constant_feeders(graph: ir.Graph, fp32: set[ir.Node]) -> None:
    """Nodes with only constant float inputs whose float outputs all go to float32 nodes join them (the mask)."""
    outputs = set(graph.outputs)
    for node in reversed(list(graph)):
        if node in fp32 or not _touches_float(node):
            continue
        if any(_is_float(v) and not _is_const(v) for v in node.inputs):
            continue
        floats = [v for v in node.outputs if _is_float(v)]
        users = [u.node for v in floats for u in v.uses()]
        if floats and users and not any(v in outputs for v in floats) and all(u in fp32 for u in users):
            fp32.add(node)


class _Converter:
    """Walks nodes in order, giving each its precision: converts weights, inserts Casts, retypes outputs."""

    def __init__(self, graph: ir.Graph, fp32: set[ir.Node], report: dict[str, str]):
        self.graph, self.fp32, self.report = graph, fp32, report
        self.casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}
        self.copies: dict[ir.Value, ir.Value] = {}
        self.converted = 0

    def visit(self, node: ir.Node) -> None:
        if not _touches_float(node):
            return
        want = FLOAT if node in self.fp32 else HALF
        for index, value in enumerate(node.inputs):
            if not _is_float(value) or value.dtype == want or node.op_type in _SHAPE_ONLY:
                continue
            if node.op_type == "Cast" and index == 0:
                continue  # Cast reads any dtype
            node.replace_input_with(index, self._as(value, want, node))
        if want == HALF:
            self._retype_outputs(node)

    def _retype_outputs(self, node: ir.Node) -> None:
        stats = _STAT_OUTPUTS.get(node.op_type, ())
        for index, value in enumerate(node.outputs):
            if value.dtype == FLOAT and index not in stats:
                value.dtype = HALF
        to = node.attributes.get("to")
        if node.op_type == "Cast" and to is not None and to.value == FLOAT:
            node.attributes["to"] = ir.AttrInt64("to", HALF)
        for name in ("value",):  # Constant, ConstantOfShape
            attr = node.attributes.get(name)
            if node.op_type in ("Constant", "ConstantOfShape") and attr is not None and attr.value.dtype == FLOAT:
                node.attributes[name] = ir.AttrTensor(name, ir.tensor(_to_half(attr.value.numpy())))

    def _as(self, value: ir.Value, want: ir.DataType, consumer: ir.Node) -> ir.Value:
        if value.const_value is not None and value.is_initializer() and want == HALF:
            return self._half_weight(value)
        key = (value, want)
        if key not in self.casts:
            cast = ir.Node("", "Cast", [value], [ir.AttrInt64("to", want)],
                           name=f"{value.name}/Cast_to_{want.name.lower()}")
            out = cast.outputs[0]
            out.name, out.dtype, out.shape = f"{value.name}_{want.name.lower()}", want, value.shape
            producer = value.producer()
            if producer is not None and producer.graph is self.graph:
                self.graph.insert_after(producer, cast)
            else:
                self.graph.insert_before(consumer, cast)
            self.casts[key] = out
        return self.casts[key]

    def _half_weight(self, value: ir.Value) -> ir.Value:
        """The float16 version of a float32 initializer: in place if every user is float16, else a copy."""
        users = [u.node for u in value.uses() if u.node.op_type not in _SHAPE_ONLY]
        half = self._lazy_half(value)
        if all(u not in self.fp32 for u in users) and value not in self.graph.outputs:
            value.const_value = half(value.name)
            value.dtype = HALF
            self.converted += 1
            return value
        if value not in self.copies:
            copy = ir.Value(name=f"{value.name}_fp16", shape=value.shape, type=ir.TensorType(HALF),
                            const_value=half(f"{value.name}_fp16"))
            self.graph.register_initializer(copy)
            self.copies[value] = copy
            self.converted += 1
        return self.copies[value]


    def _lazy_half(self, value: ir.Value):
        """name -> the float16 tensor of `value`, converted when it is read (when the model is saved).

        The weights may not be in memory (exporter/stream.py streams them from a checkpoint): a tensor already in
        memory is checked for clamping now; a lazy one reports its clamped values when it is written.
        """
        source, report, key = value.const_value, self.report, value.name

        def convert() -> np.ndarray:
            array = source.numpy()
            clamped = sum(int((np.isfinite(part) & (np.abs(part) > _HALF_MAX)).sum()) for part in _chunks(array))
            if clamped:
                report[key] = f"clamped {clamped} values beyond float16 range to +-{_HALF_MAX:g}"
            return _to_half(array)

        if not isinstance(source, ir.LazyTensor):
            array = convert()
            return lambda name: ir.tensor(array, name=name)
        return lambda name: ir.LazyTensor(lambda: ir.tensor(convert()), dtype=HALF,
                                          shape=ir.Shape(source.shape), name=name)


_CHUNK = 1 << 24  # values converted at a time: temporaries of 64 MB, not the size of the largest weight


def _chunks(array: np.ndarray):
    """Views of about _CHUNK values each, along the first axis (the whole array when it is small)."""
    if array.ndim == 0 or array.size <= _CHUNK:
        yield array
        return
    rows = max(1, _CHUNK // (array.size // array.shape[0]))
    for start in range(0, array.shape[0], rows):
        yield array[start:start + rows]


def _to_half(array: np.ndarray) -> np.ndarray:
    """float16, clamped to its finite range; C-contiguous, converted in chunks of rows."""
    if array.ndim == 0 or array.size <= _CHUNK:
        return np.ascontiguousarray(np.clip(array, -_HALF_MAX, _HALF_MAX).astype(np.float16))
    out = np.empty(array.shape, np.float16)
    start = 0
    for part in _chunks(array):
        out[start:start + len(part)] = np.clip(part, -_HALF_MAX, _HALF_MAX)
        start += len(part)
    return out


def _fix_outputs(graph: ir.Graph, fp32_outputs: set[str]) -> None:
    """Float outputs: float32 where named in fp32_outputs, float16 otherwise; a Cast where the graph disagrees."""
    for index, value in enumerate(list(graph.outputs)):
        if not _is_float(value):
            continue
        want = FLOAT if value.name in fp32_outputs else HALF
        if value.dtype == want:
            continue
        name = value.name
        value.name = f"{name}_{value.dtype.name.lower()}"
        cast = ir.Node("", "Cast", [value], [ir.AttrInt64("to", want)], name=f"/model/{name}/Cast")
        out = cast.outputs[0]
        out.name, out.dtype, out.shape = name, want, value.shape
        graph.append(cast)
        graph.outputs[index] = out
