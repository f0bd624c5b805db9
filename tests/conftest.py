"""Shared fixtures: tiny random checkpoints on disk (safetensors + tokenizer.json) and their exports.

Each tiny architecture is saved as a real local checkpoint directory and exported once per session, so the
tests exercise the same path a user takes with a downloaded model: local dir -> gptexport -> artifact.
"""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("GPTEXPORT_CACHE_DIR", "/tmp/gptexport-test-cache")



class _OldNames:
    """The repository's exporter/, graphs/ and runtime/ folders are importable from its root under their bare
    names; only `gptexport.*` is installed, so a test importing a bare name would pass here and fail for a user."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("exporter", "graphs", "runtime"):
            raise ImportError(f"import {name!r} as 'gptexport.{name}': the bare name is not installed")
        return None


sys.meta_path.insert(0, _OldNames())

from tiny_models import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """name -> a tiny checkpoint dir of tests/tiny_models.py (safetensors, fp32), made once, lazily; read-only
    (a test that alters one works on a copy)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = tmp_path_factory.mktemp(name)
            make_checkpoint(cache[name], name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """(name, **options) -> (checkpoint dir, artifact dir, manifest); each (name, options) exported once, lazily.

    `options` are ExportOptions fields (dtype, fuse, kv_layout, ...); none: the default export. Every export of one
    name reads the same checkpoint dir. Read-only: a test that alters an artifact works on a copy.
    """
    import dataclasses

    from gptexport.exporter.build import ExportOptions, export

    defaults = {f.name: f.default for f in dataclasses.fields(ExportOptions)}
    checkpoints, cache = {}, {}

    def get(name: str, **options):
        options = {k: v for k, v in options.items() if k not in defaults or v != defaults[k]}  # fuse=True: default
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            if name not in checkpoints:
                checkpoints[name] = tmp_path_factory.mktemp(name) / "checkpoint"
                checkpoints[name].mkdir()
                make_checkpoint(checkpoints[name], name)
            ckpt = checkpoints[name]
            label = "-".join(f"{k}={v}" for k, v in key[1])
            output = tmp_path_factory.mktemp(f"{name}-{label}" if label else name) / "artifact"
            result = export(ExportOptions(model=str(ckpt), output=str(output), **options))
            cache[key] = (ckpt, result.output, result.manifest)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def hf_model():
    """name -> the transformers model reloaded from the tiny checkpoint (eager attention, fp32)."""
    import transformers

    def load(ckpt):
        return transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), attn_implementation="eager").eval()

    return load


@pytest.fixture(scope="session")
def head_export(tmp_path_factory):
    """(arch, task[, dtype, int8_kernel]) -> (artifact dir, transformers model, manifest) of tests/heads_models.py; each
    exported once, lazily (issue 14's tasks beyond text generation)."""
    from heads_models import export_head

    cache = {}

    def get(arch: str, task: str, dtype: str = "float32", int8_kernel: str = "nbits"):
        key = (arch, task, dtype, int8_kernel)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{arch}-{task}-{dtype}-{int8_kernel}")
            cache[key] = export_head(root, arch, task, dtype, int8_kernel)
        return cache[key]

    return get


# Test files that must share a pytest-xdist worker (.ci/run: `-n 2 --dist loadgroup`); every other file is a group
# of its own, so a file's module fixtures (servers, exports) are made once, as in one process.
XDIST_GROUPS = {
    "packaging": "packaging",  # both build the checkout in place (build/, gptexport.egg-info): never at once
    "test_heads.py": "heads", "test_serve_heads.py": "heads",  # one set of head_export artifacts
    # one set of trained_export artifacts (gpt2-ci fp32 and int8, gptj-ci int4)
    "test_trained_validation.py": "trained", "test_rescore_trained.py": "trained",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "xdist_group(name): tests pytest-xdist runs on one worker (--dist loadgroup)")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks into the node ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = XDIST_GROUPS.get(item.path.name) or XDIST_GROUPS.get(item.path.parent.name) or item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
