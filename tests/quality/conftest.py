"""Fixtures for quality tests: the trained checkpoints of tests/trained.py (trained on first use, then cached) and
their exports, each made once per session through the exporter's own validation."""

import pytest


@pytest.fixture(scope="session")
def trained_export(tmp_path_factory):
    """(preset, dtype) -> (checkpoint dir, artifact dir, manifest); exported (and validated) once, lazily."""
    import trained
    from gptexport.exporter.build import ExportOptions, export

    cache = {}

    def get(preset: str, dtype: str = "float32"):
        if (preset, dtype) not in cache:
            ckpt = trained.checkpoint(preset)
            out = tmp_path_factory.mktemp(f"{preset}-{dtype}") / "artifact"
            result = export(ExportOptions(model=str(ckpt), output=str(out), dtype=dtype))
            cache[preset, dtype] = (ckpt, result.output, result.manifest)
        return cache[preset, dtype]

    return get
