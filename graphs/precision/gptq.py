"""GPTQ (Frantar et al. 2022, arXiv 2210.17323) in MatMulNBits' symmetric block layout (numpy only).

Round to nearest and the scale search (nbits.py) quantize every weight on its own. GPTQ quantizes the input
channels of W (K, N) one at a time and moves each channel's rounding error onto the channels not yet quantized, in
the direction that least changes the MatMul's output on the calibration activations X (tokens, K):

    H = X^T X / tokens + damp * mean(diag) * I          (K, K), from exporter/calibrate.py
    U = upper Cholesky factor of H^-1                   H^-1 = U^T U
    for k = 0 .. K-1:                                   rows of W (input channels); every output column at once
        at the first row of a block: scale s (N,) from the block's current rows (nbits' weighted search, weighted by
                                     diag(H), so s fits the weights GPTQ has already corrected)
        q_k   = clip(round(W_k / s), -2^(b-1), 2^(b-1) - 1)
        e_k   = (W_k - s q_k) / U[k, k]
        W_j  -= U[k, j] e_k           for j > k         (the error compensation)

The updates are applied lazily in batches of rows (the paper's "lazy batch updates"): inside a batch of
LAZY_BATCH rows only that batch is updated row by row; the rows after it get the whole batch's correction in one
matrix product. Output columns are independent, so a caller may quantize W a slice of columns at a time with the
same `prepare` result. The codes and scales are symmetric (MatMulNBits' default zero point 2^(b-1)), as nbits.py's.

A Hessian may also come lazily (`HessianSource`: a streamed export makes each one when its weight is quantized,
exporter/layerwise.py). A large one handed over so (K > IN_PLACE_MIN_K, GPT-J-6B's fc_out: 16384 x 16384 float32,
1 GiB) is factored in place, in float32 as GPTQ's own implementation does, with LAPACK's potrf / potri (SciPy, the
export extra): the numpy path below makes about 8 float64 copies of it.
"""

from __future__ import annotations

import numpy as np

from . import nbits

DAMP = 0.01  # fraction of the mean diagonal added to H (the paper's 1 %): keeps H^-1 well conditioned
LAZY_BATCH = 128  # rows per lazy batch (rounded to whole blocks)
_DAMP_RETRIES = 4  # a Hessian that is not positive definite after damping gets 10x more, this many times
IN_PLACE_MIN_K = 4096  # a handed-over Hessian with K above this is factored in place (float32)
_ROWS = 1024  # rows at a time when checking or clearing a large Hessian (temporaries of _ROWS x K)


class HessianSource:
    """A Hessian made only when its weight is quantized, and told the result (exporter/layerwise.py: each block's
    inputs come from the blocks quantized before it). The protocol graphs/precision/quantize.py reads."""

    def hessian(self) -> np.ndarray:
        """(K, K) float32 mean x x^T, a fresh array the caller may overwrite."""
        raise NotImplementedError

    def quantized(self, packed: np.ndarray, scales: np.ndarray, bits: int, block_size: int) -> None:
        """The weight's codes and scales (quantize_blocks' layout), once computed."""
        raise NotImplementedError


class NotPositiveDefinite(ValueError):
    """The Hessian is not positive definite even with damping."""


class Prepared:
    """What GPTQ needs from a Hessian, computed once per MatMul: U (Kp, Kp) float32 and the scale search's weights
    (Kp,): diag(H) as nbits.py weights it (a floor on real channels, zero on padding)."""

    def __init__(self, u: np.ndarray, weights: np.ndarray, damp: float):
        self.u, self.weights, self.damp = u, weights, damp


def prepare(hessian: np.ndarray, k: int, block_size: int, damp: float = DAMP, overwrite: bool = False) -> Prepared:
    """Damp H, pad it to whole blocks (padding rows are identity: no coupling), factor H^-1.

    Args:
        hessian: (K, K) mean x x^T over calibration tokens, symmetric positive semi-definite.
        k: K of the weight.
        block_size: the quantization block along K.
        damp: fraction of the mean diagonal added to the diagonal.
        overwrite: `hessian` is the caller's to destroy: a float32 one with K > IN_PLACE_MIN_K in whole blocks is
            factored in place (one try at `damp`: NotPositiveDefinite asks the caller for a fresh one).
    Returns:
        Prepared (U and the undamped diagonal, the scale search's importance).
    Raises:
        ValueError: a Hessian of the wrong shape, with non-finite values, a negative diagonal, or not positive
            definite even after damping.
    """
    if overwrite and k > IN_PLACE_MIN_K and k % block_size == 0 and isinstance(hessian, np.ndarray) \
            and hessian.dtype == np.float32 and hessian.shape == (k, k) and hessian.flags.c_contiguous:
        return _prepare_in_place(hessian, k, block_size, damp)
    h = np.asarray(hessian, np.float64)
    if h.shape != (k, k):
        raise ValueError(f"Hessian has shape {h.shape}, expected ({k}, {k})")
    if not np.isfinite(h).all():
        raise ValueError("Hessian has non-finite values")
    diag = np.diag(h).copy()
    if (diag < 0).any():
        raise ValueError(f"Hessian has a negative diagonal entry ({diag.min():.3g}): not X^T X")
    kp = -(-k // block_size) * block_size
    padded = np.eye(kp)
    padded[:k, :k] = (h + h.T) / 2
    dead = np.diag(padded) == 0  # a channel no calibration token reached: no coupling, plain rounding
    padded[dead, dead] = 1.0
    scale = float(np.mean(np.diag(padded)[:k])) or 1.0
    for attempt in range(_DAMP_RETRIES + 1):
        amount = damp * scale * 10 ** attempt
        try:
            lower = np.linalg.cholesky(padded + amount * np.eye(kp))
            break
        except np.linalg.LinAlgError:
            continue
    else:
        raise NotPositiveDefinite(f"Hessian is not positive definite even with damping {amount:.3g}")
    inverse = np.linalg.inv(lower)  # H^-1 = L^-T L^-1
    u = np.linalg.cholesky(inverse.T @ inverse).T  # upper: H^-1 = U^T U
    weights = nbits._block_importance(diag, k, kp // block_size, block_size).reshape(-1)
    return Prepared(u.astype(np.float32), weights, amount)


def _prepare_in_place(h: np.ndarray, k: int, block_size: int, damp: float) -> Prepared:
    """prepare() of a large float32 H, overwriting it with U: H = R^T R (potrf), H^-1 from R (potri), then
    U = the upper factor of H^-1 (potrf). The C-ordered symmetric H is read as its Fortran-ordered transpose (the
    same matrix), so LAPACK works on its memory without a copy."""
    from scipy.linalg import lapack

    for r in range(0, k, _ROWS):
        if not np.isfinite(h[r:r + _ROWS]).all():
            raise ValueError("Hessian has non-finite values")
    diag = np.diag(h).astype(np.float64)
    if (diag < 0).any():
        raise ValueError(f"Hessian has a negative diagonal entry ({diag.min():.3g}): not X^T X")
    dead = np.flatnonzero(diag == 0)  # a channel no calibration token reached: no coupling, plain rounding
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    amount = damp * (float(np.mean(np.where(diag == 0, 1.0, diag))) or 1.0)
    h.flat[::k + 1] += np.float32(amount)
    a = h.T  # Fortran-ordered view: LAPACK's own layout
    for step, call in (("potrf", lapack.spotrf), ("potri", lapack.spotri), ("potrf", lapack.spotrf)):
        a, info = call(a, lower=0, overwrite_c=1) if step == "potri" else call(a, lower=0, clean=0, overwrite_a=1)
        if info != 0:
            raise NotPositiveDefinite(f"Hessian is not positive definite with damping {amount:.3g} ({step} {info})")
    u = a  # upper: H^-1 = U^T U; below the diagonal, what potri and potrf left: cleared
    columns = np.arange(k)
    for r in range(0, k, _ROWS):
        rows = u[r:r + _ROWS]  # (R, K)
        rows[columns[None, :] < (r + np.arange(rows.shape[0]))[:, None]] = 0.0
    weights = nbits._block_importance(diag, k, k // block_size, block_size).reshape(-1)
    return Prepared(u, weights, amount)


def prepare_source(source: HessianSource, k: int, block_size: int, damp: float = DAMP) -> Prepared:
    """prepare() of a lazy Hessian, asking it for a fresh one with 10x the damping while it is not positive
    definite (the in-place factorisation destroys the one it tried)."""
    for attempt in range(_DAMP_RETRIES + 1):
        try:
            return prepare(source.hessian(), k, block_size, damp * 10 ** attempt, overwrite=True)
        except NotPositiveDefinite:
            if attempt == _DAMP_RETRIES:
                raise
    raise AssertionError("unreachable")


def quantize_blocks(w: np.ndarray, bits: int, block_size: int, prepared: Prepared,
                    scales: str = "search") -> tuple[np.ndarray, np.ndarray]:
    """GPTQ block quantization of w (K, N) along K, in nbits.quantize_blocks' output layout.

    Args:
        w: (K, N) float32.
        bits: 4 or 8.
        block_size: weights per scale (a power of two >= 16).
        prepared: prepare()'s result for this weight's K and block size.
        scales: how each block's scale is chosen from its current rows: "search" (nbits' weighted search) or
            "rtn" (largest |w| to the end of the range).
    Returns:
        packed uint8 (N, n_blocks, block_size * bits / 8), scales float32 (N * n_blocks,).
    Raises:
        ValueError: bits, scales or a prepared Hessian of another size.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits {bits}: expected 4 or 8")
    if scales not in nbits.METHODS:
        raise ValueError(f"scales {scales!r}: expected one of {', '.join(nbits.METHODS)}")
    k, n = w.shape
    blocks = -(-k // block_size)
    kp = blocks * block_size
    if prepared.u.shape != (kp, kp):
        raise ValueError(f"prepared Hessian is {prepared.u.shape[0]} rows, the weight needs {kp}")
    qmax = 2 ** (bits - 1)
    work = np.zeros((kp, n), np.float32)
    work[:k] = w
    codes = np.empty((kp, n), np.int16)
    scale = np.empty((blocks, n), np.float32)
    batch = block_size * max(1, LAZY_BATCH // block_size)
    u = prepared.u
    for i1 in range(0, kp, batch):
        i2 = min(i1 + batch, kp)
        rows = work[i1:i2]  # (B, N), updated in place row by row
        errors = np.empty_like(rows)
        for i in range(i2 - i1):
            row = i1 + i
            if row % block_size == 0:
                scale[row // block_size] = _block_scale(rows[i:i + block_size],
                                                        prepared.weights[row:row + block_size], qmax, scales)
            s = scale[row // block_size]
            q = np.clip(np.rint(rows[i] / np.where(s != 0, s, 1.0)), -qmax, qmax - 1)
            codes[row] = q
            errors[i] = (rows[i] - q * s) / u[row, row]
            rows[i + 1:] -= u[row, row + 1:i2, None] * errors[i]
        work[i2:] -= u[i1:i2, i2:].T @ errors  # the lazy batch's correction of every later row
    codes_t = codes.T.reshape(n, blocks, block_size)  # (N, n_blocks, bs)
    return nbits.pack(codes_t, bits), np.ascontiguousarray(scale.T).reshape(-1)


def _block_scale(rows: np.ndarray, weights: np.ndarray, qmax: int, method: str) -> np.ndarray:
    """(N,) scale of one block from its current rows (bs, N), by nbits' search or round to nearest."""
    wt = np.ascontiguousarray(rows.T)[:, None, :]  # (N, 1, bs)
    _, s = (nbits._rtn if method == "rtn" else nbits._search)(wt, qmax, weights[None, None, :])
    return s[:, 0]
