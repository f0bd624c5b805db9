"""Symmetric k-bit block quantization in MatMulNBits' layout, with error-minimising scales (numpy only).

Each block of `block_size` weights along K gets one float32 scale s and integer codes q in [-2^(b-1), 2^(b-1) - 1]:
w ~= s * q. MatMulNBits stores q + 2^(b-1) unsigned (8 for 4 bits, 128 for 8 bits) and, with no zero_points input,
subtracts that default zero point: symmetric, which is what edge CPUs need (onnxruntime issue 29853: asymmetric
4-bit weights with int8 compute give wrong results at M=1 on AVX2-only CPUs; symmetric ones take the other path).

Round to nearest (`rtn`) maps each block's largest |w| to the end of the range. `search` (llama.cpp's
make_qx_quants, restated) tries a fan of scales around that one, and for each candidate's codes refits the scale by
weighted least squares:

    q_c = clip(round(w / c), -qmax, qmax - 1)          c: SEARCH_STEPS candidates per block
    s_c = sum(a * w * q_c) / sum(a * q_c^2)             the best scale for those codes
    keep the c with the largest sum(a*w*q_c)^2 / sum(a*q_c^2)   (= the smallest sum(a * (w - s_c q_c)^2))

then recomputes the codes for the chosen scale and refits once more. `a` is the importance of each input channel k:
the mean of x_k^2 over calibration activations (what reaches this MatMul; llama.cpp's importance matrix), so the
error is minimised where the activations are large: the output error sum_k x_k (w_k - s q_k) is what matters, not
the weight error itself. Without calibration a = 1.
"""

from __future__ import annotations

import numpy as np

# Scale candidates tried per block: the extreme |w| mapped to the end of the range moved by i/5 (i = -4..4), at the
# negative end and at the positive one: 18 candidates (llama.cpp tries 19 at one end; measured here, the second end
# helps more than a finer step, and the cost is linear in the count: GPT-J-6B's 6e9 weights are all searched).
SEARCH_STEPS = tuple(i / 5 for i in range(-4, 5))
METHODS = ("rtn", "search")


def quantize_blocks(w: np.ndarray, bits: int, block_size: int, method: str = "search",
                    importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block quantization of w (K, N) along K.

    Args:
        w: (K, N) float32; K is padded with zeros to a whole number of blocks.
        bits: 4 or 8.
        block_size: weights per scale (a power of two >= 16).
        method: "rtn" (round to nearest) or "search" (error-minimising scales, see the module docstring).
        importance: (K,) non-negative weights of the input channels (mean x^2), or None for uniform.
    Returns:
        packed uint8 (N, n_blocks, block_size * bits / 8), scales float32 (N * n_blocks,).
    Raises:
        ValueError: bits, method or importance that this function does not handle.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits {bits}: expected 4 or 8")
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    k, n = w.shape
    blocks = -(-k // block_size)
    wt = np.zeros((n, blocks * block_size), np.float32)
    wt[:, :k] = w.T
    wt = wt.reshape(n, blocks, block_size)  # (N, n_blocks, bs)
    a = _block_importance(importance, k, blocks, block_size)  # (1, n_blocks, bs)
    codes, scale = (_rtn if method == "rtn" else _search)(wt, 2 ** (bits - 1), a)
    return pack(codes, bits), scale.reshape(-1)


def dequantize_blocks(packed: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of quantize_blocks: (K, N) float32."""
    n, blocks = packed.shape[0], packed.shape[1]
    q = unpack(packed, bits).astype(np.float32) - 2 ** (bits - 1)  # (N, n_blocks, bs)
    return (q * scales.reshape(n, blocks)[..., None]).reshape(n, -1)[:, :k].T


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Signed codes -> MatMulNBits bytes (offset by 2^(b-1); for 4 bits the even element in the low nibble)."""
    u = (codes + 2 ** (bits - 1)).astype(np.uint8)
    return u if bits == 8 else (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits bytes -> unsigned codes (0..2^b - 1)."""
    if bits == 8:
        return packed
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0x0F, packed >> 4
    return out


def _block_importance(importance, k: int, blocks: int, block_size: int) -> np.ndarray:
    """(1, n_blocks, bs) weights: the importance per input channel, zero on padding; ones when None."""
    a = np.zeros(blocks * block_size, np.float32)
    if importance is None:
        a[:k] = 1.0
    else:
        importance = np.asarray(importance, np.float32).reshape(-1)
        if importance.shape != (k,) or not np.isfinite(importance).all() or (importance < 0).any():
            raise ValueError(f"importance must be {k} finite non-negative values, got shape {importance.shape}")
        # a floor keeps channels no calibration token reached from being ignored altogether
        a[:k] = importance + max(float(importance.mean()), 1e-30) * 1e-3
    return a.reshape(1, blocks, block_size)


def _extreme(wt: np.ndarray) -> np.ndarray:
    """The signed value of largest |w| per block: (N, n_blocks)."""
    index = np.abs(wt).argmax(axis=-1)[..., None]
    return np.take_along_axis(wt, index, axis=-1)[..., 0]


def _codes(wt: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    safe = np.where(scale != 0, scale, 1.0).astype(np.float32)[..., None]
    q = wt / safe  # a division, not a reciprocal's product: ties round as onnxruntime's quantizer does
    np.rint(q, out=q)
    return np.clip(q, -qmax, qmax - 1, out=q)


def _rtn(wt: np.ndarray, qmax: int, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The largest |w| of each block to code -qmax (its sign flipped into the scale), as llama.cpp's Q4_0."""
    scale = _extreme(wt) / np.float32(-qmax)
    return _codes(wt, scale, qmax).astype(np.int16), scale


def _refit(wt: np.ndarray, q: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares scale for fixed codes and the gain sum(a w q)^2 / sum(a q^2) (larger: smaller error)."""
    aq = a * q
    awq = np.einsum("...k,...k->...", aq, wt)
    aqq = np.einsum("...k,...k->...", aq, q)
    ok = aqq > 0
    scale = np.where(ok, awq / np.where(ok, aqq, 1.0), 0.0)
    return scale, np.where(ok, awq * scale, 0.0)


def _search(wt: np.ndarray, qmax: int, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    extreme = _extreme(wt)
    best_scale, best_gain = _refit(wt, _codes(wt, extreme / -qmax, qmax), a)  # RTN's codes, refitted
    for end in (-qmax, qmax - 1):  # the extreme mapped near the negative end, then near the positive end
        for step in SEARCH_STEPS:
            q = _codes(wt, extreme / (end + (step if end < 0 else -step)), qmax)
            scale, gain = _refit(wt, q, a)
            better = gain > best_gain
            best_scale, best_gain = np.where(better, scale, best_scale), np.where(better, gain, best_gain)
    # the nearest codes for the chosen scale are at least as good as the candidate's; refit the scale to them
    q = _codes(wt, best_scale, qmax)
    scale, _ = _refit(wt, q, a)
    return q.astype(np.int16), scale.astype(np.float32)
