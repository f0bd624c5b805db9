"""Weight quantization for CPU: int8 (DynamicQuantizeMatMul) and int4 (MatMulNBits), our own math in numpy.

onnxruntime's stock quantizers failed on our exports (one refused an optimized graph, one skipped every MatMul), so
these passes find the weight MatMuls themselves, on unfused and fused graphs alike:

    MatMul(x, W)                  W a 2-D float32 initializer (K, N)          GPT-J Linear, lm_head, GPT-2 MatMul+Add
    MatMul(x, Transpose(W))       W (N, K) stored transposed
    Gemm(x, W, c; transB)         GPT-2 Conv1D traced as addmm; c becomes the quantized node's bias

and rewrite each as

    int8  DynamicQuantizeMatMul(x, Wq int8 (K, N), scale (N,), bias)   x quantized per call to uint8 (per tensor);
          W symmetric per output column: scale_n = max|W[:, n]| / 127, no zero point.
    int4  MatMulNBits(x, B uint8 (N, K/bs, bs/2), scales (N*K/bs,), zero_points, bias; K, N, bits=4, block_size,
          accuracy_level)   asymmetric per block of `block_size` along K: scale = (max - min) / 15 with 0 in range,
          zero point round(-min / scale); two 4-bit values per byte, the even k in the low nibble.

Not quantized, with the reason recorded: MatMuls whose B is an activation (attention scores and context), weights
that are not 2-D or not float32 (e.g. after fp16), Gemm with transA or alpha/beta != 1, and for int4 a K smaller
than the block. Embedding Gathers keep their float32 table (the tied GPT-2 lm_head has its own transposed copy of
the table in the traced graph, and that copy is quantized): a Gather reads one row per token, so its weight costs
memory, not time, and quantizing it changes every input of the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

MS = "com.microsoft"
FLOAT = ir.DataType.FLOAT


class Skip(Exception):
    """A MatMul that is not a quantizable weight MatMul; the message is the reason."""


@dataclass
class WeightMatMul:
    """A MatMul/Gemm computing x @ W (+ bias) with a constant W, read only when `load` is called.

    The weight may not be in memory (exporter/stream.py streams it from a checkpoint when the model is saved), so
    finding the sites reads shapes and dtypes only, and the rewrites quantize when the new tensors are written.
    """

    node: ir.Node
    x: ir.Value
    tensor: ir.TensorProtocol  # the initializer as stored: (K, N), or (N, K) when transposed
    transposed: bool
    weight_name: str
    bias: ir.Value | None

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N)."""
        rows, cols = (int(d) for d in self.tensor.shape)
        return (cols, rows) if self.transposed else (rows, cols)

    def load(self) -> np.ndarray:
        """W (K, N) float32 (a transposed view where the initializer is stored (N, K))."""
        w = self.tensor.numpy()
        return w.T if self.transposed else w

    @property
    def weight(self) -> np.ndarray:
        return self.load()


_COLUMNS = 4096  # output columns quantized at a time: temporaries of K x 4096 values, not of the whole weight


class _Shared:
    """Several tensors computed together (packed weights, scales, zero points): computed once when the first is
    read, dropped once all have been, so saving holds one weight's results at a time."""

    def __init__(self, compute, parts: int):
        self.compute, self.parts, self.result, self.taken = compute, parts, None, set()

    def get(self, index: int) -> np.ndarray:
        if self.result is None or index in self.taken:
            self.result, self.taken = self.compute(), set()
        out = self.result[index]
        self.taken.add(index)
        if len(self.taken) == self.parts:
            self.result = None
        return out


# ---- the math (numpy) -------------------------------------------------------------------------------------------

def quantize_int8_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column. w (K, N) -> q int8 (K, N), scale float32 (N,); w ~= q * scale."""
    scale = np.abs(w).max(axis=0) / 127.0  # (N,)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale


def quantize_int4_blocks(w: np.ndarray, block_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric 4-bit quantization in blocks along K, in MatMulNBits' layout.

    Args:
        w: (K, N) float32; K is padded with zeros to a whole number of blocks.
        block_size: values per block, a power of two >= 16.
    Returns:
        packed uint8 (N, n_blocks, block_size / 2), scales float32 (N * n_blocks,),
        zero_points uint8 (N * ceil(n_blocks / 2),), two per byte, the first block in the low nibble.
    """
    k, n = w.shape
    blocks = -(-k // block_size)
    wt = np.zeros((n, blocks * block_size), np.float32)
    wt[:, :k] = w.T
    wt = wt.reshape(n, blocks, block_size)  # (N, n_blocks, bs)
    lo = np.minimum(wt.min(axis=-1), 0.0)  # 0 must be exact: padding and ReLU-like zeros
    hi = np.maximum(wt.max(axis=-1), 0.0)
    scale = (hi - lo) / 15.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # (N, n_blocks)
    zero = np.clip(np.rint(-lo / scale), 0, 15).astype(np.uint8)
    q = np.clip(np.rint(wt / scale[..., None]) + zero[..., None], 0, 15).astype(np.uint8)
    return pack_nibbles(q), scale.reshape(-1), pack_nibbles(_pad_even(zero)).reshape(-1)


def dequantize_int4_blocks(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, k: int) -> np.ndarray:
    """Inverse of quantize_int4_blocks: (K, N) float32."""
    n, blocks, _ = packed.shape
    q = unpack_nibbles(packed).astype(np.float32)  # (N, n_blocks, bs)
    zero = unpack_nibbles(zero_points.reshape(n, -1))[:, :blocks].astype(np.float32)  # (N, n_blocks)
    w = (q - zero[..., None]) * scales.reshape(n, blocks)[..., None]
    return w.reshape(n, -1)[:, :k].T


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Values 0..15 along the last axis (even length) -> bytes: element 2j low nibble, 2j+1 high nibble."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0x0F, packed >> 4
    return out


def _int4_by_columns(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_int4_blocks over chunks of output columns: the same result (N-major), bounded temporaries."""
    parts = [quantize_int4_blocks(w[:, c:c + _COLUMNS], block_size) for c in range(0, w.shape[1], _COLUMNS)]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def _int8_by_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """quantize_int8_columns over chunks of output columns."""
    q, scale = np.empty(w.shape, np.int8), np.empty(w.shape[1], np.float32)
    for c in range(0, w.shape[1], _COLUMNS):
        q[:, c:c + _COLUMNS], scale[c:c + _COLUMNS] = quantize_int8_columns(w[:, c:c + _COLUMNS])
    return q, scale


def _pad_even(a: np.ndarray) -> np.ndarray:
    return a if a.shape[-1] % 2 == 0 else np.concatenate([a, np.zeros((*a.shape[:-1], 1), a.dtype)], axis=-1)


# ---- finding weight MatMuls -------------------------------------------------------------------------------------

def weight_matmul(node: ir.Node) -> WeightMatMul:
    """Read a MatMul / Gemm as x @ W (+ bias), else Skip with the reason."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
        raise Skip(f"{node.op_type} is not MatMul or Gemm")
    x, b = node.inputs[0], node.inputs[1]
    if x is None or x.dtype != FLOAT:
        raise Skip(f"activation dtype {getattr(x, 'dtype', None)}, the quantized kernels take float32")
    w, transposed = _constant(b)
    if w is None:
        raise Skip(f"B {b.name!r} is an activation, not a weight (e.g. attention scores)")
    if len(w.shape) != 2:
        raise Skip(f"weight {b.name!r} has rank {len(w.shape)}, expected 2")
    if w.dtype != FLOAT:
        raise Skip(f"weight {b.name!r} is {w.dtype.name.lower()}, expected float32 (quantize before any fp16 pass)")
    bias = None
    if node.op_type == "Gemm":
        attr = lambda name, default: node.attributes[name].value if name in node.attributes else default  # noqa
        if attr("transA", 0) or attr("alpha", 1.0) != 1.0 or attr("beta", 1.0) != 1.0:
            raise Skip("Gemm with transA or alpha/beta != 1")
        transposed ^= bool(attr("transB", 0))
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        c = ir.convenience.get_const_tensor(bias) if bias is not None else None
        n = int(w.shape[0 if transposed else 1])
        if bias is not None and (c is None or tuple(c.shape) != (n,) or c.dtype != FLOAT):
            raise Skip(f"Gemm bias {bias.name!r} is not a constant float32 vector of N values")
    return WeightMatMul(node, x, w, transposed, b.name, bias)


def _constant(value: ir.Value | None) -> tuple[ir.TensorProtocol | None, bool]:
    """(tensor, transposed) for an initializer or Transpose(perm 1,0) of one; (None, False) for an activation."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is not None:
        return tensor, False
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == "Transpose":
        perm = producer.attributes.get("perm")
        inner = ir.convenience.get_const_tensor(producer.inputs[0])
        if inner is not None and len(inner.shape) == 2 and (perm is None or list(perm.value) == [1, 0]):
            return inner, True
    return None, False


# ---- the passes -------------------------------------------------------------------------------------------------

def quantize_int8(model: ir.Model, report: dict[str, str] | None = None) -> int:
    """Replace weight MatMuls with com.microsoft DynamicQuantizeMatMul (int8 weights, per-column scales).

    Args:
        model: changed in place; float32 graph, unfused or fused.
        report: if given, filled with node name -> reason for every MatMul/Gemm not quantized.
    Returns:
        the number of MatMuls quantized.
    """
    def rewrite(site: WeightMatMul) -> ir.Node:
        k, n = site.shape
        parts = _Shared(lambda: _int8_by_columns(site.load()), parts=2)
        qw = _initializer(model.graph, f"{site.weight_name}_int8", ir.DataType.INT8, (k, n), parts, 0)
        sw = _initializer(model.graph, f"{site.weight_name}_scale", FLOAT, (n,), parts, 1)
        return ir.Node(MS, "DynamicQuantizeMatMul", _trim([site.x, qw, sw, None, site.bias]),
                       name=f"{site.node.name}/DynamicQuantizeMatMul")

    return _quantize(model, rewrite, report, min_k=1)


def quantize_int4(model: ir.Model, block_size: int = 32, accuracy_level: int = 4,
                  report: dict[str, str] | None = None) -> int:
    """Replace weight MatMuls with com.microsoft MatMulNBits (4-bit asymmetric blocks along K).

    Args:
        model: changed in place; float32 graph, unfused or fused.
        block_size: weights per scale/zero point along K (power of two, >= 16).
        accuracy_level: MatMulNBits' compute type for A; 4 = int8, so the CPU uses int8 dot products.
        report: if given, filled with node name -> reason for every MatMul/Gemm not quantized.
    Returns:
        the number of MatMuls quantized.
    Raises:
        ValueError: block_size is not a power of two >= 16.
    """
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size {block_size}: expected a power of two >= 16 (16, 32, 64, 128, 256)")

    def rewrite(site: WeightMatMul) -> ir.Node:
        k, n = site.shape
        blocks = -(-k // block_size)
        parts = _Shared(lambda: _int4_by_columns(site.load(), block_size), parts=3)
        u8, graph, name = ir.DataType.UINT8, model.graph, site.weight_name
        inputs = [site.x, _initializer(graph, f"{name}_int4", u8, (n, blocks, block_size // 2), parts, 0),
                  _initializer(graph, f"{name}_scales", FLOAT, (n * blocks,), parts, 1),
                  _initializer(graph, f"{name}_zero_points", u8, (n * -(-blocks // 2),), parts, 2), None, site.bias]
        attrs = [ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", 4),
                 ir.AttrInt64("block_size", block_size), ir.AttrInt64("accuracy_level", accuracy_level)]
        return ir.Node(MS, "MatMulNBits", _trim(inputs), attrs,
                       name=f"{site.node.name}/MatMulNBits")

    return _quantize(model, rewrite, report, min_k=block_size)


def _quantize(model: ir.Model, rewrite, report: dict[str, str] | None, min_k: int) -> int:
    graph, count = model.graph, 0
    report = {} if report is None else report
    for node in [n for n in graph if n.op_type in ("MatMul", "Gemm") and n.domain in ("", "ai.onnx")]:
        try:
            site = weight_matmul(node)
            if site.shape[0] < min_k:
                raise Skip(f"K={site.shape[0]} is smaller than one block ({min_k})")
        except Skip as reason:
            report[node.name or node.op_type] = str(reason)
            continue
        new = rewrite(site)
        graph.insert_before(node, new)
        old = node.outputs[0]
        new.outputs[0].type, new.outputs[0].shape = old.type, old.shape
        name = old.name
        ir.convenience.replace_all_uses_with(old, new.outputs[0], replace_graph_outputs=True)
        old.name, new.outputs[0].name = f"{name}_float", name
        graph.remove(node, safe=True)
        count += 1
    model.opset_imports.setdefault(MS, 1)
    _drop_unused(graph)
    return count


def _trim(inputs: list) -> list:
    while inputs and inputs[-1] is None:
        inputs = inputs[:-1]
    return inputs


def _initializer(graph: ir.Graph, name: str, dtype: ir.DataType, shape: tuple, parts: _Shared,
                 index: int) -> ir.Value:
    """A new initializer whose value is part `index` of `parts`, computed when it is first read."""
    tensor = ir.LazyTensor(lambda: ir.tensor(parts.get(index)), dtype=dtype, shape=ir.Shape(shape), name=name)
    value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _drop_unused(graph: ir.Graph) -> None:
    """Remove the float weights (and their Transposes) nothing reads any more."""
    for node in [n for n in graph if n.op_type == "Transpose" and not n.outputs[0].uses()
                 and n.outputs[0] not in graph.outputs]:
        graph.remove(node, safe=True)
    for name, value in list(graph.initializers.items()):
        if not value.uses() and value not in graph.outputs and value not in graph.inputs:
            del graph.initializers[name]
