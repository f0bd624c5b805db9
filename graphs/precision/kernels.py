"""Which ops have a float16 kernel on onnxruntime's CPU provider: measured, not assumed.

Measured on onnxruntime 1.32 (x86-64, AVX-512) by running a one-node float16 model and reading the optimized graph
back (tests/graphs/test_precision_kernels.py re-measures every entry, so this table cannot go stale silently):

    NATIVE   a float16 kernel runs the node as is.
    CAST     the schema admits float16 but the CPU provider has no float16 kernel; onnxruntime's
             InsertCastTransformer wraps the node in Cast(float16->float32) ... Cast(float32->float16) by itself
             when the session is created, so the graph runs, with the node's math in float32.
    NONE     the schema does not admit float16 at all: session creation fails. The fp16 pass must keep these
             nodes in float32 with Casts around them.

On x86 CPU nearly all arithmetic (MatMul, Gemm, Add, Mul, Softmax, Tanh, ...) is CAST: an fp16 artifact on CPU
stores weights and KV in fp16 and computes in fp32. We do not write those Casts into the graph ourselves: the same
artifact runs on CUDA, where every one of these ops has an fp16 kernel, and Casts in the graph would force fp32
there too. The pass writes Casts only for numerical reasons (what overflows) and for NONE ops.
"""

from __future__ import annotations

MS = "com.microsoft"
NATIVE, CAST, NONE = "native", "cast", "none"

FP16_CPU: dict[tuple[str, str], str] = {
    # Standard ONNX arithmetic: float16 runs through inserted Casts on x86 CPU.
    **{("", op): CAST for op in ("MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Pow", "Tanh", "Erf", "Sqrt",
                                 "Softmax", "Neg", "Where", "Sigmoid", "ReduceMean")},
    # Data movement and LayerNormalization have float16 kernels.
    **{("", op): NATIVE for op in ("LayerNormalization", "Concat", "Transpose", "Reshape", "Split", "Slice",
                                   "Gather", "Expand", "Max", "Unsqueeze", "Squeeze")},
    # Contrib ops the fusion passes emit (graphs/fusion/).
    (MS, "SkipLayerNormalization"): NATIVE,
    (MS, "SkipSimplifiedLayerNormalization"): NATIVE,
    (MS, "GroupQueryAttention"): NATIVE,
    (MS, "RotaryEmbedding"): NATIVE,
    (MS, "MatMulNBits"): NATIVE,
    (MS, "MultiHeadAttention"): CAST,
    (MS, "FastGelu"): CAST,
    (MS, "Gelu"): CAST,
    (MS, "BiasGelu"): CAST,
    (MS, "FusedMatMul"): CAST,
    # Quantized MatMuls take float32 activations only.
    (MS, "DynamicQuantizeMatMul"): NONE,
    (MS, "MatMulIntegerToFloat"): NONE,
    ("", "DynamicQuantizeLinear"): NONE,
}


def fp16_schema_ok(domain: str, op_type: str) -> bool:
    """False where float16 inputs make the session fail (the node must stay float32)."""
    return FP16_CPU.get(("" if domain == "ai.onnx" else domain, op_type)) != NONE
