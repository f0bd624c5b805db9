"""Fusion rules: each turns a traced pattern into one onnxruntime contrib op (domain com.microsoft).

Rules run in this order (matmul_3d first: its bias Adds are what skip_layernorm and gelu absorb; rotary before
attention: attention then sees RotaryEmbedding outputs as its q and k):

    matmul_3d       Reshape-Gemm-Reshape projection   -> MatMul (+ Add bias) on the (B, T, K) activation
    rotary          GPT-J interleaved partial rotary  -> RotaryEmbedding(interleaved=1, rotary_embedding_dim)
    attention       QK^T*scale+mask, softmax, @V, KV  -> MultiHeadAttention (past/present in the graph's names)
    skip_layernorm  residual Add + LayerNorm          -> SkipLayerNormalization (+ a MatMul's bias)
    gelu            gelu_new (tanh approximation)     -> FastGelu (+ a MatMul's bias)

Kernels on onnxruntime's CPU provider, for whoever does fp16 next (checked on onnxruntime 1.32 by
tests/graphs/test_contrib_kernels.py, which builds each op as we emit it and runs it in float32 and float16):
    RotaryEmbedding         float and float16 CPU kernels (3D input with num_heads, interleaved=1, partial dim);
                            cos_cache / sin_cache must have the input's dtype.
    MultiHeadAttention      float and float16 CPU kernels, with attention_bias (B, 1, T, P+T) and past/present;
                            the bias must have the model dtype, so a fp16 graph needs fp16's min (-65504), not
                            fp32's, as its "masked" value (transformers' eager mask in fp16 already is).
                            GPT-J's fp32 scores (traced_form casts q and k up) are not expressible: MHA's fp16
                            kernel accumulates QK^T itself; check for overflow on real GPT-J weights.
    SkipLayerNormalization  float and float16 CPU kernels; outputs 1 and 2 (mean, inv std) are float32 whatever the
                            input dtype, so leave them unnamed (we do not use them).
    FastGelu                float and float16 CPU kernels.
    GroupQueryAttention     float and float16 CPU kernels but head_size must be a multiple of 8, and seqlens_k assumes
                            right padding; not emitted (MultiHeadAttention takes our left-padded mask as is).
"""

from __future__ import annotations

from .attention import fuse_attention
from .gelu import fuse_gelu
from .matmul_3d import fuse_matmul_3d
from .rotary import fuse_rotary
from .skip_layernorm import fuse_skip_layernorm

RULES = [
    ("matmul_3d", fuse_matmul_3d),
    ("rotary", fuse_rotary),
    ("attention", fuse_attention),
    ("skip_layernorm", fuse_skip_layernorm),
    ("gelu", fuse_gelu),
]

__all__ = ["RULES", "fuse_attention", "fuse_gelu", "fuse_matmul_3d", "fuse_rotary", "fuse_skip_layernorm"]
