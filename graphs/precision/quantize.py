"""Weight quantization for CPU: int8 and int4 MatMulNBits (symmetric blocks), our own math in numpy.

onnxruntime's stock quantizers failed on our exports (one refused an optimized graph, one skipped every MatMul), so
these passes find the weight MatMuls themselves, on unfused and fused graphs alike:

    MatMul(x, W)                  W a 2-D float32 initializer (K, N)          GPT-J Linear, lm_head, GPT-2 MatMul+Add
    MatMul(x, Transpose(W))       W (N, K) stored transposed                  GPT-2's tied lm_head
    Gemm(x, W, c; transB)         GPT-2 Conv1D traced as addmm; c becomes the quantized node's bias

and rewrite each as

    MatMulNBits(x, B uint8 (N, K/bs, bs*bits/8), scales (N*K/bs,), -, -, bias; K, N, bits, block_size,
                accuracy_level)
        symmetric per block of `block_size` along K, no zero_points input (MatMulNBits' default zero point
        2^(bits-1)); scales from nbits.py (round to nearest or error-minimising search, optionally weighted by
        calibration activations). accuracy_level 4: the activations are quantized to int8 per block of K for each
        row (token) inside the kernel, and the CPU uses int8 dot products.

`quantize_int8` emits bits=8, `quantize_int4` bits=4 with a recorded rule of MatMuls kept at 8 bits (by default
the lm_head, the most sensitive one: its error reaches the logits directly). Two other int8 forms:

    kernel="token"    activations quantized per token (row) in the graph, uint8 with zero point 128; weights int8
                      with one scale per output column (the same round to nearest / search / GPTQ, one block of K);
                      com.microsoft MatMulIntegerToFloat (onnxruntime's integer GEMM, int32 sums). Batch-invariant
                      like MatMulNBits, and 2-4x faster than it wherever several rows go through a MatMul at once
                      (MatMulNBits' 8-bit path is slow at M > 1; BENCHMARKS.md). See _token_nodes.
    kernel="hybrid"   the token kernel for every MatMul but the lm_head, which gets the nbits kernel: at one row per
                      call (batch-1 decode) MatMulNBits reads the 768 x 50257 lm_head 1.8x faster than
                      MatMulIntegerToFloat, while the body's smaller MatMuls keep the token kernel's speed at M > 1.
    kernel="dynamic"  DynamicQuantizeMatMul (activations quantized per tensor, weights per column), the older form:
                      fast, but one activation scale spans the batch, so a row's output depends on its batch-mates.

Not quantized, with the reason recorded: MatMuls whose B is an activation (attention scores and context), weights
that are not 2-D or not float32 (e.g. after fp16), Gemm with transA or alpha/beta != 1, and a K smaller than the
block. Embedding Gathers keep their float32 table (the tied GPT-2 lm_head has its own transposed copy of the table
in the traced graph, and that copy is quantized): a Gather reads one row per token, so its weight costs memory,
not time, and quantizing it changes every input of the network.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from . import gptq, nbits

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
    source_name: str = ""  # the initializer's own name (the torch parameter's): what calibration is keyed by

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
_SEARCH_VALUES = 1 << 22  # weights per chunk of the block quantizer (its search holds a few float temporaries)


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


def _nbits_by_columns(w: np.ndarray, bits: int, block_size: int, method: str,
                      importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """nbits.quantize_blocks over chunks of output columns (each column is independent): the same result (N-major),
    temporaries of about _SEARCH_VALUES values whatever the weight's size."""
    step = max(1, min(_COLUMNS, _SEARCH_VALUES // max(w.shape[0], 1)))
    parts = [nbits.quantize_blocks(w[:, c:c + step], bits, block_size, method, importance)
             for c in range(0, w.shape[1], step)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _gptq_by_columns(load, k: int, bits: int, block_size: int,
                     hessian: np.ndarray | gptq.HessianSource) -> tuple[np.ndarray, np.ndarray]:
    """gptq.quantize_blocks of load() (K, N) over chunks of output columns (GPTQ treats each output column on its
    own; H^-1 is factored once). The Hessian is prepared before the weight is read: a lazy one
    (gptq.HessianSource) runs the model's modules to be made (GPT-J-6B's 0.8 GB lm_head would be held twice), and
    is told the result."""
    lazy = not isinstance(hessian, np.ndarray)
    prepared = gptq.prepare_source(hessian, k, block_size) if lazy else gptq.prepare(hessian, k, block_size)
    w = load()
    if w.shape[0] != k:
        raise ValueError(f"weight has K {w.shape[0]}, its Hessian {k}")
    step = max(1, min(_COLUMNS, _SEARCH_VALUES // max(w.shape[0], 1)))
    parts = [gptq.quantize_blocks(w[:, c:c + step], bits, block_size, prepared) for c in range(0, w.shape[1], step)]
    del prepared  # U (K, K): 1 GiB for GPT-J-6B's fc_out
    out = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if lazy:
        hessian.quantized(*out, bits, block_size)
    return out


def _int8_by_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """quantize_int8_columns over chunks of output columns."""
    q, scale = np.empty(w.shape, np.int8), np.empty(w.shape[1], np.float32)
    for c in range(0, w.shape[1], _COLUMNS):
        q[:, c:c + _COLUMNS], scale[c:c + _COLUMNS] = quantize_int8_columns(w[:, c:c + _COLUMNS])
    return q, scale


# ---- finding weight MatMuls -------------------------------------------------------------------------------------

def weight_matmul(node: ir.Node) -> WeightMatMul:
    """Read a MatMul / Gemm as x @ W (+ bias), else Skip with the reason."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
        raise Skip(f"{node.op_type} is not MatMul or Gemm")
    x, b = node.inputs[0], node.inputs[1]
    # a value shape inference did not reach (e.g. the lm_head's input after the logits_to_keep Slice) has no dtype
    # of its own: MatMul's A has its output's dtype
    dtype = None if x is None else x.dtype or node.outputs[0].dtype
    if x is None or dtype != FLOAT:
        raise Skip(f"activation dtype {getattr(dtype, 'name', None)}, the quantized kernels take float32")
    w, transposed, source = _constant(b)
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
    return WeightMatMul(node, x, w, transposed, b.name, bias, source)


def _constant(value: ir.Value | None) -> tuple[ir.TensorProtocol | None, bool, str]:
    """(tensor, transposed, initializer name) for an initializer or Transpose(perm 1,0) of one; (None, False, "")
    for an activation."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is not None:
        return tensor, False, value.name
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == "Transpose":
        perm = producer.attributes.get("perm")
        inner = ir.convenience.get_const_tensor(producer.inputs[0])
        if inner is not None and len(inner.shape) == 2 and (perm is None or list(perm.value) == [1, 0]):
            return inner, True, producer.inputs[0].name
    return None, False, ""


# ---- the passes -------------------------------------------------------------------------------------------------

KERNELS = ("nbits", "token", "hybrid", "dynamic")
MIN_BLOCK = 16  # the smallest MatMulNBits block: a MatMul with a smaller K stays float32
LM_HEAD = "lm_head"  # a keep_8bit rule entry: the MatMul that computes the logits
# How the codes and scales of a weight are chosen: nbits.py's round to nearest and weighted scale search, and
# GPTQ (gptq.py: error compensation with each MatMul's calibration Hessian; the search where a MatMul has none).
METHODS = (*nbits.METHODS, "gptq")


@dataclass
class NBitsSummary:
    """What quantize_int4 / quantize_int8 did, for the manifest: bits per MatMul, which rule kept which at 8 bits,
    and which MatMuls had calibration statistics."""

    bits: dict[str, int] = field(default_factory=dict)  # node name -> bits
    kept_8bit: dict[str, str] = field(default_factory=dict)  # node name -> the rule entry that matched
    kept_float: dict[str, str] = field(default_factory=dict)  # node name -> the keep_float entry that matched
    calibrated: list[str] = field(default_factory=list)  # node names quantized with activation importance
    gptq: list[str] = field(default_factory=list)  # node names quantized by GPTQ (with their Hessian)
    smaller_blocks: dict[str, int] = field(default_factory=dict)  # node name -> its block, where K < block_size

    def record(self) -> dict:
        counts = {b: sum(1 for v in self.bits.values() if v == b) for b in sorted(set(self.bits.values()))}
        out = {"matmuls_by_bits": {str(b): n for b, n in counts.items()}, "kept_8bit": dict(self.kept_8bit),
               "calibrated_matmuls": len(self.calibrated), "gptq_matmuls": len(self.gptq)}
        if self.kept_float:
            out["kept_float"] = dict(self.kept_float)
        if self.smaller_blocks:
            out["smaller_blocks"] = dict(self.smaller_blocks)
        return out


def quantize_int8(model: ir.Model, report: dict[str, str] | None = None, *, kernel: str = "nbits",
                  block_size: int = 32, accuracy_level: int = 4, method: str = "search",
                  importance: dict[str, np.ndarray] | None = None, summary: NBitsSummary | None = None,
                  hessians: dict[str, np.ndarray] | None = None, keep_float: tuple[str, ...] = ()) -> int:
    """Replace weight MatMuls with int8 ones.

    Args:
        model: changed in place; float32 graph, unfused or fused.
        report: if given, filled with node name -> reason for every MatMul/Gemm not quantized.
        kernel: "nbits": MatMulNBits bits=8, symmetric blocks of `block_size` along K, activations quantized per
            token and block (accuracy_level 4). "token": MatMulIntegerToFloat, activations uint8 per token quantized
            in the graph, weights int8 per output column (the graph's opset becomes 21). "hybrid": token, with
            the lm_head on nbits. "dynamic":
            DynamicQuantizeMatMul (activations per tensor, weights per output column), the older form.
        block_size, accuracy_level: as quantize_int4 (nbits kernel only).
        method, importance, summary, hessians, keep_float: as quantize_int4 (nbits and token kernels; the token
            kernel's weights are one block of K per column).
    Returns:
        the number of MatMuls quantized.
    Raises:
        ValueError: an unknown kernel, method or a bad block_size.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r}: expected one of {', '.join(KERNELS)}")
    if kernel in ("nbits", "token", "hybrid"):
        return _quantize_nbits(model, 8, block_size, accuracy_level, method, importance, (), report, summary,
                               hessians, keep_float, token=kernel != "nbits", head_nbits=kernel == "hybrid")

    def rewrite(site: WeightMatMul) -> ir.Node:
        k, n = site.shape
        parts = _Shared(lambda: _int8_by_columns(site.load()), parts=2)
        qw = _initializer(model.graph, f"{site.weight_name}_int8", ir.DataType.INT8, (k, n), parts, 0)
        sw = _initializer(model.graph, f"{site.weight_name}_scale", FLOAT, (n,), parts, 1)
        return ir.Node(MS, "DynamicQuantizeMatMul", _trim([site.x, qw, sw, None, site.bias]),
                       name=f"{site.node.name or site.weight_name}/DynamicQuantizeMatMul")

    return _quantize(model, lambda site: rewrite, report, min_k=lambda site: 1)


def quantize_int4(model: ir.Model, block_size: int = 32, accuracy_level: int = 4,
                  report: dict[str, str] | None = None, *, method: str = "search",
                  importance: dict[str, np.ndarray] | None = None, keep_8bit: tuple[str, ...] = (LM_HEAD,),
                  summary: NBitsSummary | None = None, hessians: dict[str, np.ndarray] | None = None,
                  keep_float: tuple[str, ...] = ()) -> int:
    """Replace weight MatMuls with com.microsoft MatMulNBits: 4-bit symmetric blocks, chosen ones at 8 bits.

    Args:
        model: changed in place; float32 graph, unfused or fused.
        block_size: weights per scale along K (power of two, >= 16); a MatMul whose K is smaller gets the largest
            power of two <= K (recorded in summary.smaller_blocks), one with K < 16 is skipped.
        accuracy_level: MatMulNBits' compute type for A; 4 = int8, so the CPU uses int8 dot products.
        report: if given, filled with node name -> reason for every MatMul/Gemm not quantized.
        method: "search" (error-minimising scales, nbits.py), "rtn" (round to nearest) or "gptq" (gptq.py: error
            compensation with `hessians`; a MatMul without a Hessian gets the search).
        importance: initializer name -> (K,) mean squared activation of each input channel (calibration); the
            search weights each weight's error by it. MatMuls without an entry use uniform weights.
        hessians: initializer name -> (K, K) mean x x^T of the MatMul's input over the calibration tokens (gptq),
            or a gptq.HessianSource that makes it when the weight is quantized (a streamed export).
        keep_8bit: the rule for sensitive MatMuls kept at 8 bits: LM_HEAD ("lm_head", the MatMul computing the
            logits) and/or fnmatch patterns over initializer or node names ("*h.0.mlp.c_proj*").
        summary: if given, filled with the bits of each MatMul and what the rule matched.
        keep_float: MatMuls left in float32 (same entries as keep_8bit), e.g. the lm_head where the float table is
            shared with the embedding and the artifact size matters more than the lm_head's speed.
    Returns:
        the number of MatMuls quantized (at 4 or 8 bits).
    Raises:
        ValueError: block_size is not a power of two >= 16, or an unknown method.
    """
    return _quantize_nbits(model, 4, block_size, accuracy_level, method, importance, keep_8bit, report, summary,
                           hessians, keep_float)


def _quantize_nbits(model, bits, block_size, accuracy_level, method, importance, keep_8bit, report, summary,
                    hessians=None, keep_float=(), token=False, head_nbits=False) -> int:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size {block_size}: expected a power of two >= 16 (16, 32, 64, 128, 256)")
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    summary = NBitsSummary() if summary is None else summary
    importance, hessians = importance or {}, hessians or {}
    lm_head = lm_head_node(model.graph)

    def matches(site: WeightMatMul, entries) -> str | None:
        for entry in entries:
            if site.node is lm_head if entry == LM_HEAD else any(
                    fnmatch.fnmatchcase(name, entry) for name in (site.source_name, site.node.name)):
                return entry
        return None

    def site_bits(site: WeightMatMul) -> int:
        entry = matches(site, keep_8bit)
        if entry is not None:
            summary.kept_8bit[site.node.name] = entry
            return 8
        return bits

    def rewriter(site: WeightMatMul):
        entry = matches(site, keep_float)
        if entry is not None:
            summary.kept_float[site.node.name] = entry
            return None
        b = site_bits(site)
        weights = importance.get(site.source_name)
        hessian = hessians.get(site.source_name) if method == "gptq" else None
        summary.bits[site.node.name] = b
        if weights is not None:
            summary.calibrated.append(site.node.name)
        if hessian is not None:
            summary.gptq.append(site.node.name)
        how = "search" if method == "gptq" else method  # a MatMul without a Hessian: the weighted search
        if token and not (head_nbits and site.node is lm_head):
            return lambda site: _token_nodes(model.graph, site, how, weights, hessian, quantized)
        bs = fitting_block(site.shape[0], block_size)
        if bs != block_size:
            summary.smaller_blocks[site.node.name] = bs
        return lambda site: _nbits_node(model.graph, site, b, bs, accuracy_level, how, weights, hessian)

    quantized: dict = {}  # token kernel: activation -> its (codes, scales), shared by the MatMuls reading it
    count = _quantize(model, rewriter, report,
                      min_k=lambda site: 1 if token and not (head_nbits and site.node is lm_head) else MIN_BLOCK)
    if token and count:
        _require_opset(model, TOKEN_OPSET)
    return count


def fitting_block(k: int, block_size: int) -> int:
    """block_size, or for K below it the largest power of two <= K (K=64 at block 128: 64), so a narrow model's
    MatMuls are quantized, not padded to half-empty blocks or left in float32."""
    return block_size if k >= block_size else 1 << (k.bit_length() - 1)


def _nbits_node(graph: ir.Graph, site: WeightMatMul, bits: int, block_size: int, accuracy_level: int, method: str,
                importance: np.ndarray | None, hessian: np.ndarray | None = None) -> ir.Node:
    k, n = site.shape
    blocks = -(-k // block_size)
    if importance is not None and np.asarray(importance).shape != (k,):
        raise ValueError(f"importance of {site.source_name!r} has shape {np.asarray(importance).shape}, K is {k}")
    if hessian is not None:
        parts = _Shared(lambda: _gptq_by_columns(site.load, k, bits, block_size, hessian), parts=2)
    else:
        parts = _Shared(lambda: _nbits_by_columns(site.load(), bits, block_size, method, importance), parts=2)
    name = site.weight_name
    inputs = [site.x, _initializer(graph, f"{name}_q{bits}", ir.DataType.UINT8,
                                   (n, blocks, block_size * bits // 8), parts, 0),
              _initializer(graph, f"{name}_scales", FLOAT, (n * blocks,), parts, 1), None, None, site.bias]
    attrs = [ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", bits),
             ir.AttrInt64("block_size", block_size), ir.AttrInt64("accuracy_level", accuracy_level)]
    return ir.Node(MS, "MatMulNBits", _trim(inputs), attrs,
                   name=f"{site.node.name or site.weight_name}/MatMulNBits")


# ---- the token kernel --------------------------------------------------------------------------------------------

TOKEN_OPSET = 21  # QuantizeLinear's block_size (one block of K per row: a scale per token) is opset 21
# The smallest activation scale: a row of zeros quantizes to codes of zero instead of dividing by zero.
TOKEN_MIN_SCALE = 1e-30
# ONNX ops whose meaning changed between opsets 20 and 21 (the others only gained types): the token kernel raises a
# graph's opset to 21 and refuses one that holds any of these.
_CHANGED_IN_21 = ("GroupNormalization",)


def _token_nodes(graph: ir.Graph, site: WeightMatMul, method: str, importance: np.ndarray | None,
                 hessian: np.ndarray | None, quantized: dict) -> list[ir.Node]:
    """x @ W + b with x quantized per token (row) and W per output column, integer accumulation in int32:

        x (.., K) -- Abs -- ReduceMax(K, keepdims) -- Mul(1/127) -- Max(min) -- xs (.., 1)       [once per x]
          |                                          Shape(xs) -- ConstantOfShape(128) -- zp      [once per x]
          +-- QuantizeLinear(x, xs, zp; axis -1, block_size K) -- xq uint8 (.., K)            [once per x]
        MatMulIntegerToFloat(xq, W int8 (K, N), xs, ws (N,), 128) -- Add(b) -- y (.., N)

    Each row's codes, scale and int32 sums depend on that row alone, so its output is the same bits batched with
    any other rows or alone. The bias is added after the kernel: MatMulIntegerToFloat scales its own bias by a
    non-scalar A scale (onnxruntime 1.32 applies that scale to the whole output, bias included); onnxruntime's
    optimizer folds the Add into the next SkipLayerNormalization or FastGelu. uint8 codes with zero point 128
    rather than int8 ones: onnxruntime's x86 integer GEMM (MLAS, VNNI and AMX) has its fast kernels for
    uint8 x int8; int8 x int8 measured 10-20x slower here."""
    k, n = site.shape
    name = site.node.name or site.weight_name
    nodes = []
    if site.x not in quantized:
        nodes, quantized[site.x] = _token_quantize(graph, site.x, k, name.rsplit("/", 1)[0] + "/token_quant")
    xq, xs = quantized[site.x]
    if hessian is not None:
        compute = lambda: _codes_int8(*_gptq_by_columns(site.load, k, 8, k, hessian), k)  # noqa: E731
    else:
        compute = lambda: _codes_int8(*_nbits_by_columns(site.load(), 8, k, method, importance), k)  # noqa: E731
    parts = _Shared(compute, parts=2)
    w = _initializer(graph, f"{site.weight_name}_int8", ir.DataType.INT8, (k, n), parts, 0)
    ws = _initializer(graph, f"{site.weight_name}_scale", FLOAT, (n,), parts, 1)
    zp = _shared_constant(graph, "token_quant/zero_point", np.array(128, np.uint8))
    matmul = ir.Node(MS, "MatMulIntegerToFloat", [xq, w, xs, ws, zp], name=f"{name}/MatMulIntegerToFloat")
    if site.bias is None:
        return [*nodes, matmul]
    return [*nodes, matmul, ir.Node("", "Add", [matmul.outputs[0], site.bias], name=f"{name}/bias/Add")]


def _token_quantize(graph: ir.Graph, x: ir.Value, k: int, prefix: str) -> tuple[list[ir.Node], tuple[ir.Value, ir.Value]]:
    """The nodes quantizing x (.., K) to uint8 per row: (nodes, (codes (.., K), scales (.., 1))).

    The zero points (.., 1) are made for each x from its own scales' shape. Sharing them between activations whose
    recorded shapes agree is not safe: a traced graph's symbolic dims can name different sizes (the lm_head's input
    after the last-token Slice is recorded as (batch, sequence, K)), which QuantizeLinear refuses at run time."""
    axes = _shared_constant(graph, "token_quant/axes", np.array([-1], np.int64))
    inv = _shared_constant(graph, "token_quant/inv_127", np.array(1 / 127, np.float32))
    floor = _shared_constant(graph, "token_quant/min_scale", np.array(TOKEN_MIN_SCALE, np.float32))
    absolute = ir.Node("", "Abs", [x], name=f"{prefix}/Abs")
    peak = ir.Node("", "ReduceMax", [absolute.outputs[0], axes], [ir.AttrInt64("keepdims", 1)],
                   name=f"{prefix}/ReduceMax")
    scaled = ir.Node("", "Mul", [peak.outputs[0], inv], name=f"{prefix}/Mul")
    scale = ir.Node("", "Max", [scaled.outputs[0], floor], name=f"{prefix}/Max")
    scale.outputs[0].name, scale.outputs[0].dtype = f"{prefix}/scale", FLOAT
    shape = ir.Node("", "Shape", [scale.outputs[0]], name=f"{prefix}/Shape")
    zero = ir.Node("", "ConstantOfShape", [shape.outputs[0]],
                   [ir.AttrTensor("value", ir.tensor(np.array([128], np.uint8)))], name=f"{prefix}/ConstantOfShape")
    zero.outputs[0].name, zero.outputs[0].dtype = f"{prefix}/zero_point", ir.DataType.UINT8
    codes = ir.Node("", "QuantizeLinear", [x, scale.outputs[0], zero.outputs[0]],
                    [ir.AttrInt64("axis", -1), ir.AttrInt64("block_size", k)], name=f"{prefix}/QuantizeLinear")
    codes.outputs[0].name, codes.outputs[0].dtype = f"{prefix}/codes", ir.DataType.UINT8
    return [absolute, peak, scaled, scale, shape, zero, codes], (codes.outputs[0], scale.outputs[0])


def _codes_int8(packed: np.ndarray, scales: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One block of K per column in MatMulNBits' 8-bit layout (N, 1, K) uint8 offset by 128 -> int8 (K, N)."""
    n = packed.shape[0]
    q = (packed.reshape(n, -1)[:, :k].astype(np.int16) - 128).astype(np.int8)
    return np.ascontiguousarray(q.T), scales.reshape(n).astype(np.float32)


def _shared_constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """One initializer per graph for a constant many nodes read."""
    if name not in graph.initializers:
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
        graph.register_initializer(value)
    return graph.initializers[name]


def _require_opset(model: ir.Model, version: int) -> None:
    """Raise the default domain's opset to `version` (the ops in between only gained types, checked)."""
    if model.opset_imports.get("", 1) >= version:
        return
    changed = sorted({n.op_type for n in model.graph.all_nodes() if n.domain in ("", "ai.onnx")
                      and n.op_type in _CHANGED_IN_21})
    if changed:
        raise ValueError(f"the token kernel needs opset {version}, and {', '.join(changed)} changed meaning there")
    model.opset_imports[""] = version


_PASS_THROUGH = ("Add", "Cast", "Reshape", "Identity", "Squeeze", "Unsqueeze")


def lm_head_node(graph: ir.Graph) -> ir.Node | None:
    """The MatMul/Gemm computing the graph output "logits" (through bias Adds, Casts and Reshapes), or None."""
    outputs = [v for v in graph.outputs if v.name == "logits"]
    node = outputs[0].producer() if outputs else None
    while node is not None and node.op_type in _PASS_THROUGH:
        nxt = [v.producer() for v in node.inputs if v is not None and v.producer() is not None
               and ir.convenience.get_const_tensor(v) is None]
        node = nxt[0] if len(nxt) == 1 else None
    return node if node is not None and node.op_type in ("MatMul", "Gemm") else None


def _quantize(model: ir.Model, rewriter, report: dict[str, str] | None, min_k) -> int:
    """rewriter(site) -> (site -> new node), decided for every site before any rewrite (so the lm_head is found
    on the unchanged graph)."""
    graph, count = model.graph, 0
    report = {} if report is None else report
    plans = []
    for node in [n for n in graph if n.op_type in ("MatMul", "Gemm") and n.domain in ("", "ai.onnx")]:
        try:
            site = weight_matmul(node)
            if site.shape[0] < min_k(site):
                raise Skip(f"K={site.shape[0]} is smaller than one block ({min_k(site)})")
        except Skip as reason:
            report[node.name or node.op_type] = str(reason)
            continue
        rewrite = rewriter(site)
        if rewrite is None:
            report[node.name or node.op_type] = "kept float32 by the keep_float rule"
            continue
        plans.append((site, rewrite))
    for site, rewrite in plans:
        node = site.node
        new = rewrite(site)
        new_nodes = new if isinstance(new, list) else [new]
        for one in new_nodes:
            graph.insert_before(node, one)
        new = new_nodes[-1]
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
