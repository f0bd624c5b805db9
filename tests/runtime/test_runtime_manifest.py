"""Manifest contract: writing, each refusal, checksum verification and the verify cache."""

import json
import os

import pytest

from gptexport.runtime.errors import ArtifactError
from gptexport.runtime.manifest import FORMAT_VERSION, MANIFEST_NAME, cache_path, checksum_files, file_entry, \
    read_manifest, write_manifest


def _edit(directory, **changes):
    path = directory / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    path.write_text(json.dumps(manifest))
    return manifest


def test_file_entry_matches_hashlib(tmp_path):
    import hashlib
    data = os.urandom(100_000)
    (tmp_path / "x.bin").write_bytes(data)
    assert file_entry(tmp_path / "x.bin") == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_checksum_files_lists_regular_files_sorted_without_manifest(tmp_path):
    (tmp_path / "b").write_text("b")
    (tmp_path / "a").write_text("a")
    (tmp_path / MANIFEST_NAME).write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert list(checksum_files(tmp_path)) == ["a", "b"]


def test_write_manifest_is_atomic_and_readable(artifact):
    manifest = read_manifest(artifact, verify="full")
    assert manifest["format_version"] == FORMAT_VERSION
    assert set(manifest["files"]) == {"model.onnx", "tokenizer.json"}
    assert not [p for p in artifact.iterdir() if p.name.startswith(".manifest")]  # no temp file left


def test_missing_directory(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        read_manifest(tmp_path / "nope")


def test_missing_manifest(artifact):
    (artifact / MANIFEST_NAME).unlink()
    with pytest.raises(ArtifactError, match=r"not a complete gptexport artifact \(no manifest.json\); re-run"):
        read_manifest(artifact)


def test_unparsable_manifest(artifact):
    (artifact / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(artifact)


def test_newer_format_version(artifact):
    _edit(artifact, format_version=2)
    with pytest.raises(ArtifactError, match=r"format_version 2 is newer than this runtime supports \(1\); "
                                            r"upgrade gptexport"):
        read_manifest(artifact)


def test_missing_keys_listed_at_once(artifact):
    _edit(artifact, kv_dtype=None, inputs=None, config={"num_layers": 2})
    with pytest.raises(ArtifactError) as info:
        read_manifest(artifact)
    message = str(info.value)
    for key in ("kv_dtype", "inputs", "config.num_heads", "config.max_positions"):
        assert key in message
    assert "\n" not in message


def test_listed_file_missing(artifact):
    (artifact / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="tokenizer.json is listed in the manifest but missing"):
        read_manifest(artifact)


def test_size_mismatch(artifact):
    with open(artifact / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="size of model.onnx"):
        read_manifest(artifact, verify="size")


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checksum_mismatch(artifact):
    _flip_a_byte(artifact / "model.onnx")
    with pytest.raises(ArtifactError, match="checksum of model.onnx does not match the manifest: "
                                            "the artifact was modified or corrupted"):
        read_manifest(artifact, verify="full")
    read_manifest(artifact, verify="size")  # same size: the size policy does not notice, by design


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "sub/model.onnx", "..", ""])
def test_names_outside_the_directory_refused(artifact, name):
    manifest = json.loads((artifact / MANIFEST_NAME).read_text())
    manifest["files"][name] = {"size": 1, "sha256": "0" * 64}
    (artifact / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="not a plain file name"):
        read_manifest(artifact)


def test_symlinked_file_refused(artifact, tmp_path):
    target = tmp_path / "elsewhere.data"
    target.write_bytes(b"x")
    (artifact / "model.onnx.data").symlink_to(target)
    manifest = json.loads((artifact / MANIFEST_NAME).read_text())
    manifest["files"]["model.onnx.data"] = {"size": 1, "sha256": file_entry(target)["sha256"]}
    (artifact / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="symlink"):
        read_manifest(artifact)


def test_unknown_verify_mode(artifact):
    with pytest.raises(ArtifactError, match="verify must be one of auto, full, size"):
        read_manifest(artifact, verify="fast")


def test_auto_caches_a_full_verification(artifact, cache_dir, monkeypatch):
    assert not cache_path().exists()
    read_manifest(artifact)  # hashes and records
    cache = json.loads(cache_path().read_text())
    assert os.path.realpath(artifact / "model.onnx") in cache
    import gptexport.runtime.manifest as m
    calls = []
    monkeypatch.setattr(m, "file_entry", lambda p: calls.append(p) or file_entry(p))
    read_manifest(artifact)
    assert calls == []  # served from the cache


def test_auto_cache_invalidated_by_modification(artifact):
    read_manifest(artifact)
    path = artifact / "model.onnx"
    stat = path.stat()
    _flip_a_byte(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(ArtifactError, match="checksum of model.onnx"):
        read_manifest(artifact)


def test_auto_cache_invalidated_by_manifest_change(artifact, monkeypatch):
    read_manifest(artifact)
    manifest = json.loads((artifact / MANIFEST_NAME).read_text())
    manifest["files"]["model.onnx"]["sha256"] = "0" * 64
    (artifact / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="checksum of model.onnx"):
        read_manifest(artifact)


def test_unwritable_cache_is_ignored(artifact, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("GPTEXPORT_CACHE_DIR", str(blocker / "sub"))
    assert read_manifest(artifact)["format_version"] == 1
