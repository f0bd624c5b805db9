"""The round-to-nearest reference an int8 / int4 export is judged against (graphs/precision: RTN_MARGIN).

A fixed KL limit cannot serve every model: quantization error grows with depth and with the square of the logits'
spread (bench/int4_depth.py), so an honest 4-bit GPT-J-6B measures 0.05 where a 2-layer model measures 0.002. What
does not change with scale is how an export compares with the plainest quantizer of the same weights. So the
validation also runs the torch model as plain round to nearest at the export's bits and blocks would compute it, on
the same text, and an export may be up to RTN_MARGIN times worse than that (and never beyond a ceiling):

    every Linear / Conv1D (the MatMuls the export quantizes; K >= 16)
        weight  W (K, N) -> blocks of `block` along K: s = the block's signed extreme / -2^(b-1),
                            q = clip(round(W / s), -2^(b-1), 2^(b-1) - 1), W' = s q          (nbits.py's "rtn")
                            bits: the export's; the lm_head 8 for int4 (its keep_8bit rule) and int8
        input   x (.., K) -> per row and block of `block` along K: s = max|x| / 127, x' = s round(x / s)
                            (MatMulNBits' accuracy_level 4: the activations' int8 quantization inside the kernel)

The swap happens in forward hooks, one module at a time (the weight is quantized as the module runs and restored
after), so it costs no second copy of the model and works unchanged on a streamed model whose blocks are loaded
one at a time (exporter/validate.py StreamedReference).
"""

from __future__ import annotations

import contextlib

import torch

from gptexport.graphs.precision.quantize import MIN_BLOCK, fitting_block

_HOOKED = ("Linear", "Conv1D")  # torch.nn.Linear (GPT-J, lm_head) and transformers' Conv1D (GPT-2)
ACTIVATION_MAX = 127.0  # int8 activations, symmetric


_CHUNK = 1 << 22  # weights rounded at a time: GPT-J-6B's lm_head (4096 x 50400) whole would take ~4 GB of temporaries


def rtn_weight(w: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """w (K, N) as symmetric round to nearest in blocks of `block` along K reconstructs it (nbits.py's "rtn"); a
    chunk of output columns at a time (each column's blocks are its own), so the temporaries stay small."""
    k, n = w.shape
    step = max(1, _CHUNK // max(k, 1))
    if n <= step:
        return _rtn_columns(w, bits, block)
    out = torch.empty(k, n, dtype=torch.float32)
    for c in range(0, n, step):
        out[:, c:c + step] = _rtn_columns(w[:, c:c + step], bits, block)
    return out


def _rtn_columns(w: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    k, n = w.shape
    blocks = -(-k // block)
    padded = torch.zeros(blocks * block, n, dtype=torch.float32)
    padded[:k] = w
    wt = padded.T.reshape(n, blocks, block)  # (N, n_blocks, bs)
    extreme = torch.gather(wt, -1, wt.abs().argmax(-1, keepdim=True))  # (N, n_blocks, 1), signed
    qmax = 2 ** (bits - 1)
    scale = extreme / -qmax
    q = torch.clamp(torch.round(wt / torch.where(scale != 0, scale, torch.ones_like(scale))), -qmax, qmax - 1)
    return (q * scale).reshape(n, -1)[:, :k].T.contiguous()


def quantized_activation(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (.., K) with each row's blocks of `block` along K quantized to int8 (symmetric, scale max|x| / 127)."""
    k = x.shape[-1]
    blocks = -(-k // block)
    padded = torch.nn.functional.pad(x.float(), (0, blocks * block - k)).reshape(*x.shape[:-1], blocks, block)
    scale = padded.abs().amax(-1, keepdim=True) / ACTIVATION_MAX
    safe = torch.where(scale != 0, scale, torch.ones_like(scale))
    return (torch.round(padded / safe) * scale).reshape(*x.shape[:-1], -1)[..., :k].to(x.dtype)


@contextlib.contextmanager
def rtn_forward(model, bits: int, block: int, lm_head_bits: int = 8):
    """Inside the context, `model` computes as the RTN export of it would (module docstring); restored after.

    Args:
        model: a transformers GPT-2 / GPT-J model (in memory, or streamed with its blocks loaded in hooks that run
            before these: StreamedReference registers on the blocks, these on the Linears inside).
        bits: 4 or 8, the export's.
        block: the export's block size along K (a MatMul with a smaller K gets the largest power of two that fits,
            one with K < 16 stays float, as graphs/precision does).
        lm_head_bits: bits of the module named lm_head (8: the int4 keep_8bit rule's default; int8's own).
    """
    handles, saved = [], {}  # id(module) -> its own weight while the RTN one stands in

    def before(module, args, bits, conv):
        w = module.weight.detach().float()
        w_kn = w if conv else w.T  # Conv1D holds (K, N); Linear (N, K)
        k = w_kn.shape[0]
        if k < MIN_BLOCK:
            return None
        bs = fitting_block(k, block)
        q = rtn_weight(w_kn, bits, bs)
        saved[id(module)] = module._parameters["weight"]
        module._parameters["weight"] = torch.nn.Parameter(q if conv else q.T.contiguous(), requires_grad=False)
        return (quantized_activation(args[0], bs), *args[1:])

    def after(module, args, output):
        own = saved.pop(id(module), None)
        if own is not None:
            module._parameters["weight"] = own

    for name, module in model.named_modules():
        if type(module).__name__ in _HOOKED and getattr(module, "weight", None) is not None:
            b = lm_head_bits if name.split(".")[-1] == "lm_head" else bits
            conv = type(module).__name__ == "Conv1D"
            handles.append(module.register_forward_pre_hook(lambda m, a, b=b, c=conv: before(m, a, b, c)))
            handles.append(module.register_forward_hook(after))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def export_bits(dtype: str, manifest: dict | None) -> tuple[int, int, int]:
    """(bits, block, lm_head bits) of an int8 / int4 export, from its manifest's passes (defaults where absent)."""
    from .passes import DEFAULT_BLOCK_SIZE

    quant = ((manifest or {}).get("passes") or {}).get("quantization") or {}
    bits = 4 if dtype == "int4" else 8
    block = int(quant.get("block_size") or DEFAULT_BLOCK_SIZE[dtype])
    rule = (quant.get("rule_8bit") or {}).get("rule", ["lm_head"]) if dtype == "int4" else ["lm_head"]
    return bits, block, 8 if "lm_head" in rule else bits
