"""The exporter's "passes" step: fusion (checked against the counts each architecture must reach), then precision.

The graph rewriting itself lives in graphs/ (onnx only); this module decides what runs, records it for the
manifest, and says loudly when a fusion rule fell short (an error with --strict).
"""

from __future__ import annotations

from .presets import ExportError

DTYPES = ("float32", "float16", "int8", "int4")
INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4  # MatMulNBits computes with int8 dot products on the CPU


def run_passes(ir_model, architecture: str, facts: dict, fuse: bool = True, dtype: str = "float32",
               strict: bool = False) -> dict:
    """Rewrite the traced graph in place and return the manifest's `passes` section.

    Args:
        ir_model: the traced onnx_ir.Model.
        architecture: "gpt2" or "gptj".
        facts: the architecture facts.
        fuse: run the fusion rules.
        dtype: one of DTYPES.
        strict: a fusion count below the architecture's expected count is an error, not a warning.
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
    _precision(ir_model, dtype, section)
    return section


def _fuse(ir_model, architecture, facts, section, strict) -> None:
    from gptexport.graphs.pipeline import expected_counts, fuse, shortfalls

    report = fuse(ir_model, architecture, facts)
    section["counts"].update(report.counts)
    section["expected"] = expected_counts(architecture, facts)
    section["shortfalls"] = shortfalls(report, section["expected"])
    if section["shortfalls"] and strict:
        raise ExportError("fusion fell short (--strict): " + "; ".join(section["shortfalls"]))


def _precision(ir_model, dtype, section) -> None:
    from gptexport.graphs.precision import quantize_int4, quantize_int8, to_fp16

    skipped: dict = {}
    if dtype == "float16":
        section["counts"]["fp16_initializers"] = to_fp16(ir_model, report=skipped)
    elif dtype == "int8":
        section["counts"]["int8_matmuls"] = quantize_int8(ir_model, report=skipped)
    elif dtype == "int4":
        section["counts"]["int4_matmuls"] = quantize_int4(ir_model, block_size=INT4_BLOCK_SIZE,
                                                          accuracy_level=INT4_ACCURACY_LEVEL, report=skipped)
        section["int4"] = {"block_size": INT4_BLOCK_SIZE, "accuracy_level": INT4_ACCURACY_LEVEL}
    section["skipped"] = skipped
