"""Load an artifact for serving: a shared_buffer artifact as it is; a concat one converted once, or as it is.

A default (`concat`) artifact whose attention is fused is rewritten into the in-place variant by
graphs/shared_kv.py (onnx-ir, no torch; part of the `serve` extra) into `$GPTEXPORT_CACHE_DIR/serve/` the first
time it is served, and the converted copy (verified by its own manifest) is what runs. Without onnx-ir, or for an
unfused artifact, the concat graph itself is served on the slower path (runtime/slots.py, `ConcatSlots`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from ..manifest import cache_path, read_manifest
from ..model import Model, load

SHARED = "shared_buffer"


def load_for_serving(artifact, provider: str = "cpu", threads: int | None = None) -> tuple[Model, str]:
    """Load `artifact` for the scheduler.

    Returns:
        (the Model, a short note on the KV path for the startup line).
    Raises:
        ArtifactError, ProviderError: as `runtime.load`.
    """
    directory = Path(artifact)
    manifest = read_manifest(directory, verify="auto")  # the source is verified before anything reads it
    if manifest.get("kv_layout") == SHARED:
        return load(directory, provider, threads=threads), "kv shared_buffer (in place)"
    converted, why = _convert(directory, manifest)
    if converted is not None:
        return load(converted, provider, threads=threads), f"kv shared_buffer (converted from concat: {converted})"
    return (load(directory, provider, threads=threads),
            f"kv concat: slower path, one run per sequence each step ({why})")


def _convert(directory: Path, manifest: dict):
    """(the converted artifact dir, None) or (None, why not)."""
    if not manifest.get("passes", {}).get("fused"):
        return None, "the artifact is not fused; re-export with --kv-layout shared_buffer"
    try:
        from gptexport.graphs.fusion._match import Reject
        from gptexport.graphs.shared_kv import write_artifact
    except ImportError:
        return None, "install onnx-ir (pip install 'gptexport[serve]') to convert it at load"
    key = hashlib.sha256(repr(sorted((k, v["sha256"]) for k, v in manifest["files"].items())).encode())
    target = cache_path().parent / "serve" / f"{directory.resolve().name}-{key.hexdigest()[:16]}"
    if (target / "manifest.json").exists():
        return target, None
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        write_artifact(directory, staging)
        os.replace(staging, target)
    except Reject as e:
        return None, f"its graph cannot be converted: {e}"
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, None
