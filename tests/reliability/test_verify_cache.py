"""The verify="auto" cache can be trusted: it never turns a modified file into a verified one.

Attacks on the cache itself (in-place rewrite with the mtime restored, a swapped manifest, a forged cache file
others could write, a symlinked cache) and its robustness (concurrent writers, failed writes) are each tested.
"""

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

import fake_artifact as fa
import gptexport.runtime.manifest as m
from gptexport.runtime.errors import ArtifactError
from gptexport.runtime.manifest import MANIFEST_NAME, cache_path, read_manifest


@pytest.fixture
def art(fake_built, tmp_path):
    directory = tmp_path / "art"
    shutil.copytree(fake_built, directory)
    return directory


def _tamper_in_place(path):
    """Flip one byte without changing size, inode or (restored) mtime: only the ctime still tells."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (st.st_size, st.st_ino, st.st_mtime_ns)


def test_in_place_rewrite_with_restored_mtime_is_caught(art):
    read_manifest(art)  # verified and cached
    _tamper_in_place(art / "model.onnx")
    with pytest.raises(ArtifactError, match="checksum of model.onnx does not match"):
        read_manifest(art)


def test_manifest_swapped_for_another_with_same_file_sizes(art, tmp_path):
    other = tmp_path / "other"
    fa.build(other, next_map=fa.chain("b", "zz"))  # same sizes, different table bytes
    assert json.loads((other / MANIFEST_NAME).read_text())["files"]["model.onnx"]["size"] == \
        (art / "model.onnx").stat().st_size
    read_manifest(art)
    read_manifest(other)
    shutil.copy(other / MANIFEST_NAME, art / MANIFEST_NAME)
    with pytest.raises(ArtifactError, match="checksum of model.onnx does not match"):
        read_manifest(art)


def _forge(art):
    """Tamper with model.onnx, then write a cache entry claiming the tampered file was verified."""
    read_manifest(art)
    path = art / "model.onnx"
    _tamper_in_place(path)
    sha = json.loads((art / MANIFEST_NAME).read_text())["files"]["model.onnx"]["sha256"]
    cache = json.loads(cache_path().read_text())
    cache[os.path.realpath(path)] = m._stamp(path.stat(), sha)
    cache_path().write_text(json.dumps(cache))


@pytest.mark.parametrize("target", ["file", "directory"])
def test_cache_writable_by_others_is_not_trusted(art, target):
    _forge(art)
    os.chmod(cache_path() if target == "file" else cache_path().parent, 0o777 if target == "directory" else 0o666)
    with pytest.raises(ArtifactError, match="checksum of model.onnx"):
        read_manifest(art)


def test_symlinked_cache_is_not_trusted(art, tmp_path):
    _forge(art)
    elsewhere = tmp_path / "forged.json"
    shutil.move(cache_path(), elsewhere)
    cache_path().symlink_to(elsewhere)
    with pytest.raises(ArtifactError, match="checksum of model.onnx"):
        read_manifest(art)
    assert cache_path().is_symlink()  # and nothing was written through it


def test_own_private_cache_is_used(art, monkeypatch):
    read_manifest(art)
    assert not cache_path().stat().st_mode & 0o077 and not cache_path().parent.stat().st_mode & 0o077
    monkeypatch.setattr(m, "file_entry", lambda p: pytest.fail("hashed although cached"))
    read_manifest(art)


def test_concurrent_writers_keep_a_valid_cache(fake_built, tmp_path):
    copies = []
    for i in range(8):
        copies.append(tmp_path / f"a{i}")
        shutil.copytree(fake_built, copies[-1])
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(read_manifest, copies * 3))
    cache = json.loads(cache_path().read_text())  # always a whole JSON file (written by os.replace)
    assert set(cache) <= {os.path.realpath(c / n) for c in copies for n in ("model.onnx", "tokenizer.json")}
    assert len(cache) >= 2
    assert not [p for p in cache_path().parent.iterdir() if p.name.endswith(".tmp")]


def test_merge_keeps_entries_of_other_processes(art, fake_built):
    read_manifest(art)
    before = json.loads(cache_path().read_text())
    m._save_cache({"/elsewhere/model.onnx": [1, 2, 3, 4, 5, "x"]})  # what another process adds
    after = json.loads(cache_path().read_text())
    assert set(after) == set(before) | {"/elsewhere/model.onnx"}


def test_failed_cache_write_leaves_no_temp_file(art, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(m.json, "dump", broken)
    assert read_manifest(art)["format_version"] == 1
    assert not [p for p in cache_path().parent.iterdir() if p.name.startswith(".verified.")]


def test_file_changed_while_hashing_is_not_cached(art, monkeypatch):
    real = m.file_entry

    def hash_then_touch(path):
        entry = real(path)
        os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))  # modified after being read
        return entry

    monkeypatch.setattr(m, "file_entry", hash_then_touch)
    read_manifest(art)
    assert not cache_path().exists() or json.loads(cache_path().read_text()) == {}
