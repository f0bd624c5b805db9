"""The export job: load, trace, passes, save, validate, finish; written atomically.

Everything is written into a hidden staging directory beside the target (exporter/artifact.py), and the target
appears only by a rename at the very end, so a failed or killed export never leaves a directory that looks complete
(the manifest, which marks completion, is moved in last).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# The writer's names stay importable from here (tests and scripts use build.MODEL_FILE and friends).
from .artifact import (DATA_FILE, EXTERNAL_DATA_THRESHOLD, MODEL_FILE, STALE_SECONDS, TOKENIZER_FILE,  # noqa: F401
                       Reporter, open_session, publish, save_graph, staged, write_artifact, write_manifest_file)
from .presets import ExportError
from .tasks import TEXT_GENERATION

STEPS = ["load", "trace", "passes", "save", "validate", "finish"]
# "concat": the default graph (past + new K/V concatenated each step; Optimum-compatible). "shared_buffer": the
# in-place variant of graphs/shared_kv.py (GroupQueryAttention writing into one preallocated buffer per request).
KV_LAYOUTS = ("concat", "shared_buffer")


@dataclass
class ExportOptions:
    model: str
    output: str | None = None
    random_weights: bool = False
    seed: int = 0
    force: bool = False
    validate: bool = True
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    dtype: str = "float32"
    trust_remote_code: bool = False
    fuse: bool = True
    strict: bool = False
    stream: bool | None = None  # stream weights into the file (None: only when the model does not fit in memory)
    kv_layout: str = "concat"  # one of KV_LAYOUTS
    # int8 / int4 (exporter/passes.py): block size along K, scale method, int8 kernel, MatMuls kept at 8 bits in
    # int4 (beyond the lm_head), calibration text files (none: the fp32 model's own samples)
    block_size: int | None = None  # None: the precision's default (passes.DEFAULT_BLOCK_SIZE: int4 128, int8 32)
    quant_method: str = "gptq"  # one of passes.QUANT_METHODS; a streamed model gets "search" (no Hessians)
    int8_kernel: str | None = None  # None: the task's default (passes.default_int8_kernel)
    rescore_top_k: int | None = None  # int8/int4 tied lm_head: candidates rescored in float32 (None: default; 0: off)
    keep_8bit: tuple = ()
    calibration: tuple = ()
    validation_text: list[str] | None = None  # files whose text the validation scores (None: the model's samples)
    task: str | None = None  # an Optimum task name (exporter/tasks.py); None: the checkpoint's own
    num_labels: int | None = None  # --random-weights: labels of a classification head


@dataclass
class ExportResult:
    output: Path
    manifest: dict
    timings: dict = field(default_factory=dict)


def default_output(name: str, dtype: str) -> str:
    short = {"float32": "fp32", "float16": "fp16"}.get(dtype, dtype)  # int8, int4 as they are
    return f"{name}-onnx-{short}"


def check_options(opts: ExportOptions) -> None:
    """Refuse option combinations that cannot work, before any work is done.

    Raises:
        ExportError: an unknown kv_layout, or shared_buffer without fusion (it rewrites the fused attention).
    """
    if opts.kv_layout not in KV_LAYOUTS:
        raise ExportError(f"unknown kv layout {opts.kv_layout!r}; choose one of: {', '.join(KV_LAYOUTS)}")
    from .passes import BLOCK_SIZES, INT8_KERNELS, QUANT_METHODS

    if opts.block_size is not None and opts.block_size not in BLOCK_SIZES:
        raise ExportError(f"block size {opts.block_size}: choose one of {', '.join(map(str, BLOCK_SIZES))}")
    if opts.quant_method not in QUANT_METHODS:
        raise ExportError(f"unknown quantization method {opts.quant_method!r}; choose one of: "
                          f"{', '.join(QUANT_METHODS)}")
    if opts.int8_kernel is not None and opts.int8_kernel not in INT8_KERNELS:
        raise ExportError(f"unknown int8 kernel {opts.int8_kernel!r}; choose one of: {', '.join(INT8_KERNELS)}")
    if opts.rescore_top_k is not None and opts.rescore_top_k < 0:
        raise ExportError(f"--rescore-top-k {opts.rescore_top_k}: expected 0 (off) or a number of candidates")
    for name in opts.calibration:
        if not Path(name).is_file():
            raise ExportError(f"--calibration {name!r}: no such file; pass text files to calibrate on")
    if opts.validation_text:
        from .validate import validation_texts

        validation_texts(opts)  # an unreadable file is refused before any work
    if opts.kv_layout == "shared_buffer" and not opts.fuse:
        raise ExportError("--kv-layout shared_buffer cannot be combined with --no-fuse: the in-place KV cache "
                          "rewrites the fused attention (drop --no-fuse, or use --kv-layout concat)")


def _validate(loaded, facts: dict, opts: ExportOptions, staging: Path, manifest: dict) -> dict:
    """Against torch when the model is in memory; else the reduced-config check plus a structural check."""
    special = manifest["special_tokens"]
    # validation pads with it and forces min_new_tokens; a model without eos (None) pads with its pad id
    eos = next((t for t in (special["eos_token_id"], special["pad_token_id"]) if t is not None), 0)
    if loaded.weights is None:
        from .validate import validate, validation_texts

        result = validate(loaded.model, facts, loaded.tokenizer, str(staging), open_session(staging), opts.dtype,
                          eos, manifest=manifest, texts=validation_texts(opts))
        result["method"] = "full: this artifact against its torch model"
        return result
    from .validate import validate_streamed

    return validate_streamed(loaded, facts, opts, staging, manifest, eos)


def failed_checks(v: dict) -> str:
    """The checks a failed validation failed, with their figures: never only figures that are within limits."""
    where = f" of the reduced {v['reduced_config']['num_layers']}-layer export" if "reduced_config" in v else ""
    failed = []
    if "failed_checks" in v:  # the validator judged its own figures (exporter/validate.py: judge)
        failed += [c if c.startswith("full artifact:") else f"{c}{where}" for c in v["failed_checks"]]
    elif v.get("logits_max_abs_diff", 0.0) > v.get("logits_tolerance", float("inf")):
        failed.append(f"logits max abs diff{where} {v['logits_max_abs_diff']:.3g} above the tolerance "
                      f"{v['logits_tolerance']}")
    if "failed_checks" not in v and v.get("greedy_agreement", 1.0) < v.get("min_greedy_agreement", 0.0):
        failed.append(f"greedy agreement{where} {v['greedy_agreement']:.3f} below the required "
                      f"{v['min_greedy_agreement']}")
    structural = v.get("structural") or {}
    if structural.get("passed") is False:
        failed.append("structural check of the artifact: " + "; ".join(structural.get("problems") or ["failed"]))
    return "; ".join(failed) or f"a check not named in the result ({', '.join(sorted(v))})"


def export(opts: ExportOptions, on_step=None) -> ExportResult:
    """Export opts.model into an artifact directory.

    Args:
        opts: what to export and where.
        on_step: callback(step, "start"|"done", seconds) for progress display.
    Returns:
        ExportResult with the output path, the manifest written and per-step timings.
    Raises:
        ExportError: bad input (before any work), or a validation that failed (nothing is published).
    """
    from .load import load, resolve_config

    check_options(opts)
    report = Reporter(on_step)
    if opts.output is None:
        name = resolve_config(opts.model, opts.trust_remote_code)[1]
        opts.output = default_output(name, opts.dtype)
    target = Path(opts.output).expanduser().resolve()
    with staged(target, opts.force) as staging:
        manifest = _export_into(opts, staging, report, load)
        publish(staging, target, manifest)
    return ExportResult(target, manifest, report.timings)


def _export_into(opts: ExportOptions, staging: Path, report: Reporter, load) -> dict:
    with report.step("load"):
        loaded = load(opts.model, random_weights=opts.random_weights, seed=opts.seed,
                      trust_remote_code=opts.trust_remote_code, stream=opts.stream, task=opts.task,
                      num_labels=opts.num_labels)
        facts = loaded.architecture.facts(loaded.model.config)
    head = loaded.task != TEXT_GENERATION
    if head:  # one forward, no cache (exporter/heads.py)
        from .heads import write_head_artifact

        if opts.kv_layout != "concat":
            raise ExportError(f"--kv-layout {opts.kv_layout} is for text-generation; task {loaded.task!r} has no "
                              f"cache")
        manifest = write_head_artifact(loaded, facts, opts, staging, report)
    else:
        manifest = write_artifact(loaded, facts, opts, staging, report)
    if opts.validate:
        with report.step("validate"):
            if head:
                from .heads_validate import validate_head

                manifest["validation"] = validate_head(loaded, staging, manifest, opts.dtype)
            else:
                manifest["validation"] = _validate(loaded, facts, opts, staging, manifest)
        if not manifest["validation"]["passed"]:
            raise ExportError(f"validation failed: {failed_checks(manifest['validation'])}; nothing was written "
                              f"(--no-validate skips the check)")
    with report.step("finish"):
        if loaded.weights is not None:
            manifest["streamed"] = True
        manifest["timings"] = dict(report.timings)
    return manifest
