"""`gptexport validate DIR`: validate an artifact that exists (exported with --no-validate, or to check it again).

    manifest.json ─▶ every file's sha256 checked ─▶ the checkpoint loaded again (the manifest's, or --checkpoint)
        ─▶ the export's own validation (exporter/validate.py; streamed like the export for a streamed artifact)
        ─▶ passed: `validation` replaced in manifest.json (a temp file, fsync, rename: never half written)
           failed: nothing written, ExportError (the command line exits 2 with one line)

The checkpoint is loaded as the export loaded it: a preset or local directory with random weights gets the
manifest's seed and, when the export was streamed, the streamed generator (exporter/stream.py RandomWeights), since
in-memory random weights come from torch's init and streamed ones from numpy: the same seed, different numbers.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from gptexport.runtime.errors import ArtifactError
from gptexport.runtime.manifest import MANIFEST_NAME, manifest_digest, read_manifest, replace_manifest_file

from .build import ExportOptions, ExportResult, failed_checks
from .passes import KEEP_8BIT, METHOD_TEXT
from .presets import ExportError
from .tasks import TEXT_GENERATION

STEPS = ["load", "validate", "record"]


def read_artifact(directory: str) -> tuple[Path, dict, str]:
    """(resolved dir, manifest, manifest sha256) of an artifact whose files all match their checksums.

    Raises:
        ExportError: not a directory, no manifest, or a file that differs from the manifest.
    """
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise ExportError(f"ARTIFACT_DIR {directory!r} is not a directory; give a directory gptexport wrote")
    if not (path / MANIFEST_NAME).is_file():
        raise ExportError(f"ARTIFACT_DIR {directory!r} has no {MANIFEST_NAME}: not a gptexport artifact")
    try:
        digest = manifest_digest(path)
        manifest = read_manifest(path, verify="full")
    except ArtifactError as err:
        raise ExportError(f"ARTIFACT_DIR {directory!r}: {err}") from None
    if (manifest.get("producer") or {}).get("name") != "gptexport" or "source" not in manifest["model"]:
        raise ExportError(f"ARTIFACT_DIR {directory!r} was not written by gptexport's exporter (an adopted "
                          f"artifact is validated by `gptexport adopt --checkpoint`)")
    return path.resolve(), manifest, digest


def checkpoint_of(manifest: dict, checkpoint: str | None) -> str:
    """What to load: --checkpoint, else what the manifest records (a preset name, a hub id, a local directory)."""
    if checkpoint:
        return checkpoint
    model = manifest["model"]
    if model.get("checkpoint"):
        return model["checkpoint"]
    if model["source"] == "preset":  # manifests older than `model.checkpoint`: a preset's name is its own
        return model["name"]
    raise ExportError(f"the manifest does not record where model {model['name']!r} ({model['source']}) came from; "
                      f"pass --checkpoint DIR")


def options_of(manifest: dict, validation_text=(), calibration=()) -> ExportOptions:
    """The ExportOptions that made the artifact, as far as the manifest records them (validate_streamed re-exports
    a reduced config with them)."""
    passes = manifest.get("passes") or {}
    quant = passes.get("quantization") or {}
    methods = {text: name for name, text in METHOD_TEXT.items()}
    opts = ExportOptions(model=manifest["model"]["name"], dtype=manifest["dtype"], fuse=bool(passes.get("fused")),
                         kv_layout=manifest.get("kv_layout", "concat"),
                         validation_text=list(validation_text) or None, calibration=tuple(calibration))
    rescore = passes.get("rescore") or {}
    if "rescore" in passes:  # an artifact from before the pass has none: it was not rescored
        opts.rescore_top_k = rescore["top_k"] if rescore.get("applied") else 0
    elif opts.dtype in ("int8", "int4"):
        opts.rescore_top_k = 0
    if quant.get("kernel") == "DynamicQuantizeMatMul":
        opts.int8_kernel = "dynamic"
    if quant.get("kernel") == "MatMulIntegerToFloat":
        opts.int8_kernel, opts.quant_method = "token", methods.get(quant.get("method"), "search")
        if (quant.get("lm_head") or {}).get("kernel") == "MatMulNBits":
            opts.int8_kernel, opts.block_size = "hybrid", quant["lm_head"]["block_size"]
    if quant.get("kernel") == "MatMulNBits":
        opts.int8_kernel = "nbits" if opts.dtype == "int8" else None
        opts.block_size, opts.quant_method = quant["block_size"], methods.get(quant.get("method"), "search")
        rule = (quant.get("rule_8bit") or {}).get("rule", KEEP_8BIT)
        opts.keep_8bit = tuple(r for r in rule if r not in KEEP_8BIT)
    return opts


def _load(manifest: dict, source: str):
    from .load import load

    model = manifest["model"]
    streamed = bool(manifest.get("streamed"))
    # random weights are only the same numbers by the same generator; real ones may stream when they do not fit
    stream = True if streamed else (False if model["random_weights"] else None)
    labels = manifest.get("labels")
    loaded = load(source, random_weights=bool(model["random_weights"]), seed=model.get("seed") or 0,
                  stream=stream, task=manifest.get("task", TEXT_GENERATION),
                  num_labels=len(labels) if labels and model["random_weights"] else None)
    facts = loaded.architecture.facts(loaded.model.config)
    differ = [f"{k} {facts.get(k)!r} there, {v!r} in the manifest" for k, v in manifest["config"].items()
              if facts.get(k) != v]
    if loaded.architecture.name != model["architecture"]:
        differ.insert(0, f"architecture {loaded.architecture.name} there, {model['architecture']} in the manifest")
    if differ:
        raise ExportError(f"checkpoint {source!r} is not the artifact's model: {'; '.join(differ)}")
    return loaded, facts


def validate_artifact(directory: str, checkpoint: str | None = None, validation_text=(), calibration=(),
                      on_step=None) -> ExportResult:
    """Run the export's validation on an existing artifact and record it in its manifest when it passes.

    Args:
        directory: the artifact directory.
        checkpoint: what to validate against (default: what the manifest records).
        validation_text: text files to score (default: the fp32 model's own samples, as the export does).
        calibration: a streamed artifact's --calibration files (its reduced export is quantized again with them).
        on_step: callback(step, "start"|"done", seconds), as for `export`.
    Returns:
        ExportResult(directory, the manifest written, timings).
    Raises:
        ExportError: bad input, a checkpoint that is not the artifact's model, a failed validation (the artifact
            is left as it was), or an artifact changed while it was validated.
    """
    from .artifact import Reporter
    from .build import _validate

    path, manifest, digest = read_artifact(directory)
    report = Reporter(on_step)
    source = checkpoint_of(manifest, checkpoint)
    opts = options_of(manifest, validation_text, calibration)
    if opts.validation_text:
        from .validate import validation_texts

        validation_texts(opts)  # an unreadable file is refused before the model is loaded
    with report.step("load"):
        loaded, facts = _load(manifest, source)
    with report.step("validate"):
        if loaded.task != TEXT_GENERATION:
            from .heads_validate import validate_head

            result = validate_head(loaded, path, manifest, manifest["dtype"])
        else:
            result = _validate(loaded, facts, opts, path, manifest)
    if not result["passed"]:
        raise ExportError(f"validation failed: {failed_checks(result)}; {path} was left as it was")
    with report.step("record"):
        result["validated_by"] = {"command": "gptexport validate", "checkpoint": source,
                                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        manifest = {**manifest, "validation": result}
        replace_manifest(path, manifest, digest)
    return ExportResult(path, manifest, report.timings)


def replace_manifest(directory: Path, manifest: dict, expected_digest: str) -> None:
    """Write manifest.json atomically (temp file in the same dir, fsync, rename, fsync of the dir), refusing when the
    manifest on disk is no longer the one validated (another writer in between)."""
    if manifest_digest(directory) != expected_digest:
        raise ExportError(f"{directory}/{MANIFEST_NAME} changed while it was validated; nothing was written")
    replace_manifest_file(directory, manifest)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
