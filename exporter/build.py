"""The export job: load, trace, passes, save, validate, finish; written atomically.

Everything is written into a hidden temporary directory beside the target, and the target appears only by a
rename at the very end, so a failed or killed export never leaves a directory that looks complete (the manifest,
which marks completion, is written last, inside the temporary directory).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from gptexport.runtime.manifest import FORMAT_VERSION, MANIFEST_NAME, checksum_files

from .passes import run_passes
from .presets import ExportError

EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # bytes of weights above which they go to model.onnx.data (protobuf limit)
_INLINE_BYTES = 1024  # tensors this small stay in the graph: shape constants must be readable for shape inference
MODEL_FILE, DATA_FILE, TOKENIZER_FILE = "model.onnx", "model.onnx.data", "tokenizer.json"
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


@dataclass
class ExportResult:
    output: Path
    manifest: dict
    timings: dict = field(default_factory=dict)


class _Reporter:
    """Prints one line per step; the CLI swaps in a rich progress display."""

    def __init__(self, on_step=None):
        self.on_step = on_step or (lambda name, state, seconds: None)
        self.timings = {}

    @contextmanager
    def step(self, name: str):
        self.on_step(name, "start", 0.0)
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)
        self.on_step(name, "done", self.timings[name])


def default_output(name: str, dtype: str) -> str:
    short = {"float32": "fp32", "float16": "fp16"}.get(dtype, dtype)  # int8, int4 as they are
    return f"{name}-onnx-{short}"


def _check_target(target: Path, force: bool) -> None:
    if target.exists() and not force:
        raise ExportError(f"output directory {str(target)!r} already exists; pass --force to replace it")
    if target.exists() and not target.is_dir():
        raise ExportError(f"output path {str(target)!r} exists and is not a directory")
    if target.exists():
        why = _not_replaceable(target)
        if why:
            raise ExportError(f"--force replaces only an empty directory or a gptexport artifact; {str(target)!r} "
                              f"{why}: nothing was touched (choose another -o)")
    if not target.parent.exists():
        raise ExportError(f"parent directory of {str(target)!r} does not exist")


def _not_replaceable(target: Path) -> str | None:
    """Why --force must not remove the existing directory `target`, or None when it may.

    Only an empty directory, or an artifact of ours holding nothing but its manifest and the files the manifest
    lists, is replaced: `-o . --force` or `-o ~ --force` must never delete a directory of the user's.
    """
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        return "is the current directory or one above it"
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return None
    try:
        manifest = json.loads((target / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"is not empty and has no readable {MANIFEST_NAME} of a gptexport artifact"
    if not (isinstance(manifest, dict) and isinstance(manifest.get("producer"), dict)
            and manifest["producer"].get("name") == "gptexport" and isinstance(manifest.get("files"), dict)):
        return f"is not empty and its {MANIFEST_NAME} is not a gptexport artifact's"
    foreign = [name for name in entries if name != MANIFEST_NAME and name not in manifest["files"]]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"is a gptexport artifact but also holds files its manifest does not list ({shown})"
    return None


def check_options(opts: ExportOptions) -> None:
    """Refuse option combinations that cannot work, before any work is done.

    Raises:
        ExportError: an unknown kv_layout, or shared_buffer without fusion (it rewrites the fused attention).
    """
    if opts.kv_layout not in KV_LAYOUTS:
        raise ExportError(f"unknown kv layout {opts.kv_layout!r}; choose one of: {', '.join(KV_LAYOUTS)}")
    if opts.kv_layout == "shared_buffer" and not opts.fuse:
        raise ExportError("--kv-layout shared_buffer cannot be combined with --no-fuse: the in-place KV cache "
                          "rewrites the fused attention (drop --no-fuse, or use --kv-layout concat)")


def _weight_bytes(ir_model) -> int:
    return sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)


def save_graph(ir_model, directory: Path, threshold: int) -> None:
    """Write model.onnx, with the weights in model.onnx.data when they exceed `threshold` bytes."""
    import onnx_ir as ir

    path = directory / MODEL_FILE
    if _weight_bytes(ir_model) > threshold:
        ir.save(ir_model, str(path), external_data=DATA_FILE, size_threshold_bytes=_INLINE_BYTES)
    else:
        ir.save(ir_model, str(path))


def _manifest(loaded, facts, ir_model, opts, passes: dict) -> dict:
    from gptexport.graphs.signature import DTYPE_NAMES, io_spec

    from . import __version__

    config = loaded.model.config
    kv = next(v for v in ir_model.graph.inputs if v.name.startswith("past_key_values."))
    eos = config.eos_token_id if config.eos_token_id is not None else 50256
    return {
        "format_version": FORMAT_VERSION,
        "producer": {"name": "gptexport", "version": __version__},
        "model": {"name": loaded.name, "architecture": loaded.architecture.name, "source": loaded.source,
                  "random_weights": loaded.random_weights, "seed": loaded.seed, "revision": loaded.revision},
        "tokenizer": tokenizer_record(loaded),
        "config": facts,
        "dtype": opts.dtype,
        "kv_dtype": DTYPE_NAMES[kv.dtype],
        "inputs": io_spec(ir_model.graph.inputs),
        "outputs": io_spec(ir_model.graph.outputs),
        "special_tokens": {"bos_token_id": config.bos_token_id if config.bos_token_id is not None else eos,
                           "eos_token_id": eos, "pad_token_id": eos},
        "generation": {"max_new_tokens": 32, "do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                       "repetition_penalty": 1.0},
        "passes": passes,
        "validation": {"passed": None, "skipped": True},
    }


def tokenizer_record(loaded) -> dict:
    """The manifest's `tokenizer`: where tokenizer.json came from, and its size."""
    origin = loaded.tokenizer_origin
    if origin == "gpt2" and loaded.source != "preset":
        note = "the checkpoint ships no tokenizer files: GPT-2's vocabulary was used"
    else:
        note = "GPT-2's vocabulary (a preset)" if origin == "gpt2" else "the checkpoint's own tokenizer"
    return {"origin": origin, "fallback": origin == "gpt2" and loaded.source != "preset", "note": note,
            "vocab_size": loaded.tokenizer.get_vocab_size(with_added_tokens=True)}


def _session(directory: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(directory / MODEL_FILE), options, providers=["CPUExecutionProvider"])


def write_artifact(loaded, facts: dict, opts: ExportOptions, directory: Path, report: _Reporter) -> dict:
    """Trace, passes and save into `directory`; the same code for in-memory and streamed weights.

    Returns:
        the manifest, with the checksums of the files written but not itself written: manifest.json marks a
        complete artifact, so it is written only when the export is published.
    """
    from .trace import trace

    with report.step("trace"):
        try:
            ir_model = trace(loaded.model, facts, loaded.weights)
        except KeyError as err:
            raise ExportError(f"cannot stream the weights: {err.args[0]}") from None
    with report.step("passes"):
        passes = run_passes(ir_model, loaded.architecture.name, facts, fuse=opts.fuse, dtype=opts.dtype,
                            strict=opts.strict)
        shared = _to_shared_kv(ir_model) if opts.kv_layout == "shared_buffer" else None  # after precision
    with report.step("save"):  # streamed weights are read, converted and written here, one at a time
        save_graph(ir_model, directory, opts.external_data_threshold)
        loaded.tokenizer.save(str(directory / TOKENIZER_FILE))
        manifest = _manifest(loaded, facts, ir_model, opts, passes)
        if shared is not None:
            from gptexport.graphs.shared_kv import record

            record(manifest, ir_model, shared)
        manifest["files"] = checksum_files(directory)
    return manifest


def _to_shared_kv(ir_model) -> int:
    """The in-place KV-cache rewrite (graphs/shared_kv.py) of the fused graph; returns the attentions rewritten.

    Raises:
        ExportError: the fused graph does not fit the variant (e.g. attention fusion fell short), with the reason.
    """
    from gptexport.graphs.fusion._match import Reject
    from gptexport.graphs.shared_kv import to_shared_kv

    try:
        return to_shared_kv(ir_model)
    except Reject as err:
        raise ExportError(f"--kv-layout shared_buffer: cannot rewrite this graph: {err}") from None


def _validate(loaded, facts: dict, opts: ExportOptions, staging: Path, manifest: dict) -> dict:
    """Against torch when the model is in memory; else the reduced-config check plus a structural check."""
    eos = manifest["special_tokens"]["eos_token_id"]
    if loaded.weights is None:
        from .validate import validate

        result = validate(loaded.model, facts, loaded.tokenizer, str(staging), _session(staging), opts.dtype, eos,
                          manifest=manifest)
        result["method"] = "full: this artifact against its torch model"
        return result
    from .validate import validate_streamed

    return validate_streamed(loaded, facts, opts, staging, manifest, eos)


def failed_checks(v: dict) -> str:
    """The checks a failed validation failed, with their figures: never only figures that are within limits."""
    where = f" of the reduced {v['reduced_config']['num_layers']}-layer export" if "reduced_config" in v else ""
    failed = []
    if v.get("logits_max_abs_diff", 0.0) > v.get("logits_tolerance", float("inf")):
        failed.append(f"logits max abs diff{where} {v['logits_max_abs_diff']:.3g} above the tolerance "
                      f"{v['logits_tolerance']}")
    if v.get("greedy_agreement", 1.0) < v.get("min_greedy_agreement", 0.0):
        failed.append(f"greedy agreement{where} {v['greedy_agreement']:.3f} below the required "
                      f"{v['min_greedy_agreement']}")
    structural = v.get("structural") or {}
    if structural.get("passed") is False:
        failed.append("structural check of the artifact: " + "; ".join(structural.get("problems") or ["failed"]))
    failed += [str(c) for c in v.get("failed_checks", [])]  # checks a validator names itself
    return "; ".join(failed) or f"a check not named in the result ({', '.join(sorted(v))})"


def _publish(staging: Path, target: Path) -> None:
    """Move the finished staging dir into place; an existing target (only with --force) goes last."""
    old = None
    if target.exists():
        _check_target(target, force=True)  # again: the directory may have changed while the export ran
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / "previous")
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
    report = _Reporter(on_step)
    if opts.output is None:
        name = resolve_config(opts.model, opts.trust_remote_code)[1]
        opts.output = default_output(name, opts.dtype)
    target = Path(opts.output).expanduser().resolve()
    _check_target(target, opts.force)
    _remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    pending = target.parent / f".{target.name}.manifest-{os.getpid()}.json"
    try:
        manifest = _export_into(opts, staging, report, load)
        # manifest.json marks completion: written beside the staging dir, moved in only after the rest is published
        write_manifest_file(pending, manifest)
        _publish(staging, target)
        os.replace(pending, target / MANIFEST_NAME)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        pending.unlink(missing_ok=True)
        raise
    return ExportResult(target, manifest, report.timings)


def write_manifest_file(path: Path, manifest: dict) -> None:
    """Write the manifest JSON (its "files" already computed) durably to `path`."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


STALE_SECONDS = 60


def _remove_stale_staging(target: Path) -> None:
    """Remove what killed earlier exports to the same target left: hidden staging dirs without a manifest.

    Only dirs untouched for STALE_SECONDS, so a concurrent export's live staging dir is left alone.
    """
    import time as _time

    for prefix in (f".{target.name}.partial-", f".{target.name}.manifest-", f".{target.name}.old-"):
        for path in target.parent.glob(prefix + "*"):
            if _time.time() - path.lstat().st_mtime <= STALE_SECONDS or path.is_symlink():
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _export_into(opts: ExportOptions, staging: Path, report: _Reporter, load) -> dict:
    with report.step("load"):
        loaded = load(opts.model, random_weights=opts.random_weights, seed=opts.seed,
                      trust_remote_code=opts.trust_remote_code, stream=opts.stream)
        facts = loaded.architecture.facts(loaded.model.config)
    manifest = write_artifact(loaded, facts, opts, staging, report)
    if opts.validate:
        with report.step("validate"):
            manifest["validation"] = _validate(loaded, facts, opts, staging, manifest)
        if not manifest["validation"]["passed"]:
            raise ExportError(f"validation failed: {failed_checks(manifest['validation'])}; nothing was written "
                              f"(--no-validate skips the check)")
    with report.step("finish"):
        if loaded.weights is not None:
            manifest["streamed"] = True
        manifest["timings"] = dict(report.timings)
    return manifest
