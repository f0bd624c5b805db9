"""Load an artifact for serving and say which KV path it gets.

A `shared_buffer` artifact is decoded in one batch over the preallocated in-place slots. A default (`concat`)
artifact is served as it is on the slower path (runtime/slots.py, `ConcatSlots`: the same tokens, one run per
sequence each step); the runtime never imports graphs/ or the exporter, so converting it is the user's one-off
step: `gptexport.exporter.artifact.convert_to_shared_buffer(src, dst)`, or a re-export with
`--kv-layout shared_buffer`.
"""

from __future__ import annotations

from ..model import Model, load

SHARED = "shared_buffer"


def load_for_serving(artifact, provider: str = "cpu", threads: int | None = None, manifest_sha256=None,
                     verify: str = "auto", spin_threads: bool = False) -> tuple[Model, str]:
    """Load `artifact` for the scheduler.

    Args:
        manifest_sha256: refuse the artifact unless its manifest.json has this sha256 (None: no pin).
        verify: checksum policy ("auto", "full", "size"; see runtime.manifest).
        spin_threads: let onnxruntime's idle intra-op threads spin (off: they sleep between runs, leaving the cores
            to the HTTP loop, the scheduler's Python and the other processes; see `session.session_options`).
    Returns:
        (the Model, a short note on its KV path for the startup line).
    Raises:
        ArtifactError, ProviderError: as `runtime.load`.
    """
    model = load(artifact, provider, verify=verify, threads=threads, manifest_sha256=manifest_sha256,
                 spin_threads=spin_threads)
    if model.manifest.get("kv_layout") == SHARED:
        return model, "kv shared_buffer: in place, one batched run per step"
    return model, ("kv concat: slower path, one run per sequence each step; for batching, re-export with "
                   "--kv-layout shared_buffer or convert it once with "
                   "gptexport.exporter.artifact.convert_to_shared_buffer")
