"""The exporter's "passes" step: fusion (checked against the counts each architecture must reach), then precision.

The graph rewriting itself lives in graphs/ (onnx only); this module decides what runs, records it for the
manifest, and says loudly when a fusion rule fell short (an error with --strict).
"""

from __future__ import annotations

from .presets import ExportError

DTYPES = ("float32", "float16", "int8", "int4")
BLOCK_SIZES = (32, 64, 128)
# Weights per scale along K when --block-size is not given. int4: 128, whose GPTQ still beats onnxruntime's stock
# RTN at its default 32 on both trained checkpoints and decodes 1.2-1.3x faster (BENCHMARKS.md, "block 128 by
# default"). int8: 32; at 128 int8 misses the top-1 target on gpt2-ci (99.36 % < 99.5 %).
DEFAULT_BLOCK_SIZE = {"int4": 128, "int8": 32}
INT4_BLOCK_SIZE = DEFAULT_BLOCK_SIZE["int4"]
INT4_ACCURACY_LEVEL = 4  # MatMulNBits computes with int8 dot products on the CPU (activations int8 per token/block)
QUANT_METHODS = ("gptq", "search", "rtn")
INT8_KERNELS = ("nbits", "token", "hybrid", "dynamic")
# The int8 kernel when --int8-kernel is not given: text generation, and the head tasks. A head runs one forward over
# the whole input (every MatMul sees M = batch x sequence rows at once) and has no 50257-wide lm_head, so the token
# kernel is 1.8-3.1x Optimum's int8 and 2-3x nbits there (BENCHMARKS.md, bench/heads_bench.py), batch-invariant too.
TEXT_INT8_KERNEL, HEAD_INT8_KERNEL = "nbits", "token"


def default_int8_kernel(task: str) -> str:
    """The int8 kernel a task gets when --int8-kernel is not given."""
    return TEXT_INT8_KERNEL if task == "text-generation" else HEAD_INT8_KERNEL


# the manifest's words for each method (`gptexport validate` reads them back)
METHOD_TEXT = {"search": "error-minimising scale search weighted by calibration activations",
               "gptq": "GPTQ: rounding error compensated through each MatMul's calibration Hessian, block scales by "
                       "the weighted search",
               "rtn": "round to nearest"}
# The sensitive MatMuls int4 keeps at 8 bits: the lm_head (its error goes straight into the logits; measured in
# BENCHMARKS.md). More entries (fnmatch patterns over weight names) come from --keep-8bit.
KEEP_8BIT = ("lm_head",)


def run_passes(ir_model, architecture: str, facts: dict, fuse: bool = True, dtype: str = "float32",
               strict: bool = False, quant: dict | None = None) -> dict:
    """Rewrite the traced graph in place and return the manifest's `passes` section.

    Args:
        ir_model: the traced onnx_ir.Model.
        architecture: "gpt2" or "gptj".
        facts: the architecture facts.
        fuse: run the fusion rules.
        dtype: one of DTYPES.
        strict: a fusion count below the architecture's expected count is an error, not a warning.
        quant: int8/int4 settings: block_size, method, kernel (int8), keep_8bit (int4), importance (initializer
            name -> (K,) mean x^2) and calibration (its manifest record); defaults where absent.
    Returns:
        {"fused", "counts", "expected", "shortfalls", "precision", "skipped"}.
    Raises:
        ExportError: unknown dtype, or (with strict) a fusion rule that fell short, naming the rule and why.
    """
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    section = {"fused": fuse, "counts": {}, "expected": {}, "shortfalls": [], "precision": dtype, "skipped": {}}
    if fuse:
        _fuse(ir_model, architecture, facts, section, strict)
    _precision(ir_model, dtype, section, quant or {})
    return section


def _fuse(ir_model, architecture, facts, section, strict) -> None:
    from gptexport.graphs.pipeline import expected_counts, fuse, shortfalls

    report = fuse(ir_model, architecture, facts)
    section["counts"].update(report.counts)
    section["expected"] = expected_counts(architecture, facts)
    section["shortfalls"] = shortfalls(report, section["expected"])
    if section["shortfalls"] and strict:
        raise ExportError("fusion fell short (--strict): " + "; ".join(section["shortfalls"]))


def _precision(ir_model, dtype, section, quant: dict) -> None:
    from gptexport.graphs.precision import NBitsSummary, quantize_int4, quantize_int8, to_fp16

    skipped: dict = {}
    tied = _tied_lm_head(ir_model, dtype, quant, section)  # before the lm_head is quantized
    block = quant.get("block_size") or DEFAULT_BLOCK_SIZE.get(dtype, INT4_BLOCK_SIZE)
    method = quant.get("method", "search")
    importance, hessians = quant.get("importance"), quant.get("hessians")
    summary = NBitsSummary()
    if dtype == "float16":
        section["counts"]["fp16_initializers"] = to_fp16(ir_model, report=skipped)
    elif dtype == "int8":
        kernel = quant.get("kernel", "nbits")
        section["counts"]["int8_matmuls"] = quantize_int8(
            ir_model, report=skipped, kernel=kernel, block_size=block, accuracy_level=INT4_ACCURACY_LEVEL,
            method=method, importance=importance, summary=summary, hessians=hessians)
        if kernel == "dynamic":
            section["quantization"] = {"kernel": "DynamicQuantizeMatMul", "weights": "symmetric int8 per output column",
                                       "activations": "uint8 per tensor, per call"}
        elif kernel in ("token", "hybrid"):
            section["quantization"] = _token_record(method, quant, summary)
            if kernel == "hybrid":  # exporter/revalidate.py reads the lm_head's kernel back from here
                section["quantization"]["lm_head"] = {
                    "kernel": "MatMulNBits", "block_size": block, "accuracy_level": INT4_ACCURACY_LEVEL,
                    "why": "one row per call (batch-1 decode) reads the lm_head faster through MatMulNBits"}
        else:
            section["quantization"] = _nbits_record(8, block, method, quant, summary)
    elif dtype == "int4":
        keep = tuple(quant.get("keep_8bit", KEEP_8BIT))
        section["counts"]["int4_matmuls"] = quantize_int4(
            ir_model, block_size=block, accuracy_level=INT4_ACCURACY_LEVEL, report=skipped, method=method,
            importance=importance, keep_8bit=keep, summary=summary, hessians=hessians)
        section["int4"] = {"block_size": block, "accuracy_level": INT4_ACCURACY_LEVEL}
        section["quantization"] = _nbits_record(4, block, method, quant, summary)
        section["quantization"]["rule_8bit"] = {
            "rule": list(keep), "explain": "lm_head: the MatMul computing the logits; other entries: fnmatch "
                                          "patterns over weight names"}
    section["skipped"] = skipped
    if tied is not None:
        from gptexport.graphs.rescore import rescore_top_k

        section["counts"]["rescore_top_k"] = rescore_top_k(ir_model, tied, section["rescore"]["top_k"])


def _tied_lm_head(ir_model, dtype: str, quant: dict, section: dict):
    """int8/int4 text generation: the tied lm_head whose top candidates graphs/rescore.py rescores in float32, or
    None (the manifest's `rescore` says why not). quant["rescore_top_k"]: None the default k, 0 off; absent (head
    tasks, adopted graphs): not considered."""
    if dtype not in ("int8", "int4") or "rescore_top_k" not in quant:
        return None
    from gptexport.graphs.fusion._match import Reject
    from gptexport.graphs.rescore import DEFAULT_TOP_K, find_tied_lm_head

    k = DEFAULT_TOP_K if quant["rescore_top_k"] is None else quant["rescore_top_k"]
    if k == 0:
        section["rescore"] = {"applied": False, "reason": "turned off (--rescore-top-k 0)"}
        return None
    try:
        tied = find_tied_lm_head(ir_model)
    except Reject as reason:
        section["rescore"] = {"applied": False, "reason": str(reason)}
        return None
    section["rescore"] = {"applied": True, "top_k": k, "table": tied.table.name,
                          "explain": "the quantized lm_head's top-k logits of every row recomputed exactly from the "
                                     "float32 embedding table it is tied to (graphs/rescore.py)"}
    return tied


def _token_record(method: str, quant: dict, summary) -> dict:
    return {"kernel": "MatMulIntegerToFloat", "bits": 8, "symmetric": True,
            "weights": "symmetric int8, one scale per output column",
            "activations": "uint8 per token (one scale per row, zero point 128), quantized in the graph; int32 sums",
            "batch_invariant": True, "method": METHOD_TEXT[method],
            "calibration": quant.get("calibration", {"source": "none"}), **summary.record()}


def _nbits_record(bits: int, block: int, method: str, quant: dict, summary) -> dict:
    return {"kernel": "MatMulNBits", "bits": bits, "block_size": block, "accuracy_level": INT4_ACCURACY_LEVEL,
            "symmetric": True,
            "symmetric_why": "onnxruntime issue 29853: asymmetric 4-bit weights with int8 compute are wrong at M=1 "
                             "on AVX2-only CPUs",
            "activations": "int8 per token and block of K, inside the kernel (accuracy_level 4)",
            "method": METHOD_TEXT[method],
            "calibration": quant.get("calibration", {"source": "none"}), **summary.record()}
