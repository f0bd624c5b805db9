"""Fusion rules: each turns a traced pattern into one onnxruntime contrib op (domain com.microsoft).

Rules run in this order (rotary first: attention then sees RotaryEmbedding outputs as its q and k):

    rotary          GPT-J interleaved partial rotary  -> RotaryEmbedding(interleaved=1, rotary_embedding_dim)
    attention       QK^T*scale+mask, softmax, @V, KV  -> MultiHeadAttention (past/present in the graph's names)
    skip_layernorm  residual Add + LayerNorm          -> SkipLayerNormalization (+ a MatMul's bias)
    gelu            gelu_new (tanh approximation)     -> FastGelu (+ a MatMul's bias)

Kernels on onnxruntime's CPU provider (checked on onnxruntime 1.32; for whoever does fp16 next):
    RotaryEmbedding         float and float16 CPU kernels (MLFloat16 registered in contrib_ops/cpu/bert).
    MultiHeadAttention      float and float16 CPU kernels; fp16 attention_bias must also be fp16.
    SkipLayerNormalization  float and float16 CPU kernels (fp16 math done in fp32 internally).
    FastGelu                float only on CPU: an fp16 graph needs FastGelu left in fp32 with Casts around it,
                            or the unfused tanh formula, or the CUDA provider (which has fp16).
    GroupQueryAttention     (not used, see attention.py) float and float16 CPU kernels.
Keep these in step with graphs/fusion/tests of fp16 once that exists; verify with tests/graphs/test_fp16_kernels
(TODO) rather than trusting this comment.
"""

from __future__ import annotations

from .attention import fuse_attention
from .gelu import fuse_gelu
from .rotary import fuse_rotary
from .skip_layernorm import fuse_skip_layernorm

RULES = [
    ("rotary", fuse_rotary),
    ("attention", fuse_attention),
    ("skip_layernorm", fuse_skip_layernorm),
    ("gelu", fuse_gelu),
]

__all__ = ["RULES", "fuse_attention", "fuse_gelu", "fuse_rotary", "fuse_skip_layernorm"]
