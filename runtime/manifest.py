"""Read, write and verify an artifact's manifest.json (the contract in docs/ARTIFACT.md).

Pure stdlib: the exporter imports `write_manifest`, `checksum_files`, `FORMAT_VERSION` from here to write the
manifest, and the runtime uses `read_manifest` to refuse anything incomplete, newer, or modified.

Verification policy (`read_manifest(dir, verify=...)`):

- ``"full"``: hash every listed file with sha256 on every load.
- ``"size"``: check that every listed file exists with the listed size; no hashing.
- ``"auto"`` (default): check sizes always, and hash fully unless a previous full verification of the same file is
  cached. The cache lives in ``$GPTEXPORT_CACHE_DIR/verified.json`` (default ``~/.cache/gptexport``) and is keyed
  by the file's realpath; an entry stores (size, mtime_ns, ctime_ns, inode, device, sha256 from the manifest) and
  is used only when all still match, so any rewrite, touch, copy or manifest change forces a fresh hash. ctime
  matters: an in-place rewrite keeps the inode and `os.utime` can restore the mtime, but nothing short of
  changing the clock restores the ctime. This makes reloading a 12 GB artifact fast while still catching
  modification. A file that changes while it is hashed is not cached.

  The cache is itself an input an attacker could forge, so it is trusted only when the file and its directory
  belong to this user and are not writable by group or others (and neither is a symlink); otherwise every load
  hashes in full. Writes go to a temp file and ``os.replace`` (readers never see half a file); concurrent
  writers merge with the file as it is at save time (a lost race costs a re-hash, never a false "verified").
  Failures to read or write the cache are ignored: it is an optimisation, never a source of trust beyond the
  facts above.

Pinning (`load_manifest(dir, manifest_sha256=...)`): checksums show that the files match the manifest, not that the
manifest is the one that was exported (whoever can replace model.onnx can rewrite manifest.json). A deployment
that pins the sha256 of manifest.json (gptexport prints it) has the runtime refuse any other manifest; the digest
is taken of the very bytes that are parsed.

Files a loader reads itself (the graph without external data, the tokenizer) can be verified with
`read_verified`, which hashes the bytes it returns, so nothing can swap the file between hashing and use.

Every file named in ``files`` must be a plain name inside the directory (no separator, no ``..``, not absolute,
not a symlink), so a manifest cannot point the runtime (or ONNX external data) outside the artifact.
"""

import hashlib
import json
import os
import re
import stat
import tempfile
from pathlib import Path

from .errors import ArtifactError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
VERIFY_MODES = ("auto", "full", "size")
REQUIRED_KEYS = ("format_version", "model", "config", "dtype", "kv_dtype", "inputs", "outputs",
                 "special_tokens", "files")
REQUIRED_CONFIG_KEYS = ("num_layers", "num_heads", "head_size", "vocab_size", "max_positions")
_CHUNK = 16 * 1024 * 1024
_CACHE_NAME = "verified.json"
_CACHE_ENTRIES = 4096  # files remembered; the oldest are dropped


def file_entry(path) -> dict:
    """Size and sha256 of one file, read in 16 MiB chunks.

    Args:
        path: the file.
    Returns:
        ``{"size": int, "sha256": hex str}``.
    """
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def checksum_files(directory) -> dict:
    """Entries for every regular file of `directory` except manifest.json, sorted by name.

    Args:
        directory: the artifact directory.
    Returns:
        ``{name: {"size", "sha256"}}``; symlinks, subdirectories and hidden temp files are skipped.
    """
    directory = Path(directory)
    names = sorted(p.name for p in directory.iterdir()
                   if p.is_file() and not p.is_symlink() and p.name != MANIFEST_NAME
                   and not p.name.startswith(".manifest"))
    return {name: file_entry(directory / name) for name in names}


def write_manifest(directory, manifest: dict) -> dict:
    """Write manifest.json atomically, adding "files" (checksums of every other file).

    Args:
        directory: the artifact directory, with all other files already written.
        manifest: the manifest without "files" (an existing "files" is replaced).
    Returns:
        The manifest as written.
    """
    directory = Path(directory)
    full = dict(manifest)
    full.setdefault("format_version", FORMAT_VERSION)
    full["files"] = checksum_files(directory)
    replace_manifest_file(directory, full)
    return full


def replace_manifest_file(directory: Path, manifest: dict) -> None:
    """Write `manifest` as directory/manifest.json atomically: a temp file in the same directory, fsync, rename
    (a reader sees the old manifest or the new one, never part of one; a failure leaves the old one)."""
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, Path(directory) / MANIFEST_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(directory, verify: str = "auto", manifest: dict | None = None) -> dict:
    """Load manifest.json and verify the artifact against it.

    Args:
        directory: the artifact directory.
        verify: "auto", "full" or "size" (see the module docstring).
        manifest: use this dict instead of reading manifest.json (the exporter validates a staged artifact
            before it writes the file that marks it complete); it is checked exactly like a read one.
    Returns:
        The manifest dict.
    Raises:
        ArtifactError: one line naming what is wrong (missing, newer, incomplete, modified), or an unknown
            `verify` mode.
    """
    return load_manifest(directory, verify, manifest)[0]


def load_manifest(directory, verify: str = "auto", manifest: dict | None = None, manifest_sha256=None,
                  deferred=()) -> tuple:
    """`read_manifest`, plus the manifest's own digest, an optional pin on it, and files left to the caller.

    Args:
        directory, verify, manifest: as `read_manifest`.
        manifest_sha256: refuse a manifest.json whose sha256 is not this (64 hex digits); None: no pin.
        deferred: names whose size is checked here but whose content the caller verifies with `read_verified`
            as it reads them.
    Returns:
        (manifest dict, sha256 hex of manifest.json's bytes; None for a `manifest` dict).
    Raises:
        ArtifactError: as `read_manifest`; a malformed pin; a manifest whose digest is not the pinned one; a pin
            together with a `manifest` dict.
    """
    if verify not in VERIFY_MODES:
        raise ArtifactError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    pin = check_pin(manifest_sha256)
    directory = Path(directory)
    digest = None
    if manifest is None:
        manifest, digest = _load_json(directory)
    elif pin is not None:
        raise ArtifactError("manifest_sha256 pins manifest.json; it cannot check a manifest passed as a dict")
    elif not directory.is_dir():
        raise ArtifactError(f"artifact directory {directory} does not exist")
    if pin is not None and digest != pin:
        raise ArtifactError(f"{directory / MANIFEST_NAME} has sha256 {digest}, not the pinned {pin}: refusing a "
                            "manifest that is not the one exported")
    _check_version(directory, manifest)
    _check_keys(directory, manifest)
    _verify_files(directory, manifest["files"], verify, deferred)
    return manifest, digest


def check_pin(manifest_sha256):
    """The pin as lower-case hex, or None.

    Raises:
        ArtifactError: not 64 hex digits.
    """
    if manifest_sha256 is None:
        return None
    if not isinstance(manifest_sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", manifest_sha256.strip()):
        shown = repr(manifest_sha256) if len(repr(manifest_sha256)) <= 80 else repr(manifest_sha256)[:77] + "..."
        raise ArtifactError(f"manifest_sha256 must be a sha256 digest (64 hex digits), got {shown}")
    return manifest_sha256.strip().lower()


def manifest_digest(directory) -> str:
    """sha256 hex of `directory`/manifest.json as it is now (what gptexport prints and a deployment pins).

    Raises:
        ArtifactError: no directory, or no readable manifest.json.
    """
    return _read_json_bytes(Path(directory))[1]


def _read_json_bytes(directory: Path) -> tuple:
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {directory} does not exist")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a complete gptexport artifact (no {MANIFEST_NAME}); "
                            "re-run gptexport")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e.strerror or e}") from None
    return raw, hashlib.sha256(raw).hexdigest()


def _load_json(directory: Path) -> tuple:
    """(manifest, sha256 of the bytes parsed): one read, so the digest is of exactly what is used."""
    raw, digest = _read_json_bytes(directory)
    path = directory / MANIFEST_NAME
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); re-run gptexport") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is not a JSON object; re-run gptexport")
    return manifest, digest


def _check_version(directory: Path, manifest: dict) -> None:
    version = manifest.get("format_version")
    if version is None:
        return  # reported with the other missing keys
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"{directory / MANIFEST_NAME}: format_version must be a positive integer, "
                            f"got {version!r}")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{directory / MANIFEST_NAME}: format_version {version} is newer than this runtime "
                            f"supports ({FORMAT_VERSION}); upgrade gptexport")


def _check_keys(directory: Path, manifest: dict) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    config = manifest.get("config")
    if isinstance(config, dict):
        missing += [f"config.{k}" for k in REQUIRED_CONFIG_KEYS if k not in config]
    elif "config" in manifest:
        missing += [f"config.{k}" for k in REQUIRED_CONFIG_KEYS]
    if "files" in manifest and not isinstance(manifest["files"], dict):
        missing.append("files (must be an object)")
    if missing:
        raise ArtifactError(f"{directory / MANIFEST_NAME} is missing required keys: {', '.join(missing)}; "
                            "re-run gptexport")


def _check_name(directory: Path, name: str) -> Path:
    """A listed file must be a plain name inside the directory: no escape via '..', '/', or a symlink."""
    plain = (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
             and not os.path.isabs(name) and "\x00" not in name)
    if not plain:
        raise ArtifactError(f"manifest lists {name!r}, which is not a plain file name inside {directory}")
    path = directory / name
    if path.is_symlink():
        raise ArtifactError(f"{name} in {directory} is a symlink; artifact files must be regular files")
    return path


def _verify_files(directory: Path, files: dict, verify: str, deferred=()) -> None:
    cache = _load_cache() if verify == "auto" else {}
    changed = {}
    for name, entry in files.items():
        path = _check_name(directory, name)
        if not isinstance(entry, dict) or "size" not in entry or "sha256" not in entry:
            raise ArtifactError(f"manifest entry for {name} needs size and sha256; re-run gptexport")
        if not path.is_file():
            raise ArtifactError(f"{name} is listed in the manifest but missing from {directory}")
        st = path.stat()
        _check_size(name, st.st_size, entry)
        if verify == "size" or name in deferred:
            continue
        key, stamp = os.path.realpath(path), _stamp(st, entry["sha256"])
        if verify == "auto" and cache.get(key) == stamp:
            continue
        if file_entry(path)["sha256"] != entry["sha256"]:
            raise ArtifactError(f"checksum of {name} does not match the manifest: "
                                "the artifact was modified or corrupted")
        if _stamp(path.stat(), entry["sha256"]) == stamp:  # not modified while it was being hashed
            changed[key] = stamp
    if verify == "auto" and changed:
        _save_cache(changed)


def _check_size(name: str, size: int, entry: dict) -> None:
    if size != entry["size"]:
        raise ArtifactError(f"size of {name} is {size} bytes, the manifest says {entry['size']}: "
                            "the artifact was modified or truncated")


def read_verified(directory, name: str, manifest: dict, verify: str = "auto") -> bytes:
    """Read one listed file and verify the bytes read (not the file afterwards) against the manifest.

    Args:
        directory: the artifact directory.
        name: a file listed in manifest["files"].
        manifest: the manifest (from `load_manifest`).
        verify: as `read_manifest`: "full" hashes the bytes; "auto" hashes them unless the verify cache already
            holds this exact file (size, mtime, ctime, inode, device, sha256, all taken from the open file before
            and after the read); "size" checks the size only.
    Returns:
        The file's bytes.
    Raises:
        ArtifactError: not listed, a symlink, unreadable, a different size, or a checksum mismatch.
    """
    directory = Path(directory)
    entry = manifest["files"].get(name)
    if not isinstance(entry, dict):
        raise ArtifactError(f"{directory} has no {name} in its manifest; re-run gptexport")
    path = _check_name(directory, name)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        before = os.fstat(f.fileno())
        if not stat.S_ISREG(before.st_mode):
            raise ArtifactError(f"{name} in {directory} is not a regular file")
        _check_size(name, before.st_size, entry)
        data = f.read()
        after = os.fstat(f.fileno())
    _check_size(name, len(data), entry)
    if verify == "size":
        return data
    key, stamp = os.path.realpath(path), _stamp(before, entry["sha256"])
    unchanged = _stamp(after, entry["sha256"]) == stamp
    if verify == "auto" and unchanged and _load_cache().get(key) == stamp:
        return data
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ArtifactError(f"checksum of {name} does not match the manifest: "
                            "the artifact was modified or corrupted")
    if verify == "auto" and unchanged:
        _save_cache({key: stamp})
    return data


def _stamp(st: os.stat_result, sha256) -> list:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, sha256]


def cache_path() -> Path:
    """Where successful full verifications are remembered ($GPTEXPORT_CACHE_DIR or ~/.cache/gptexport)."""
    root = os.environ.get("GPTEXPORT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "gptexport")
    return Path(root) / _CACHE_NAME


def _trusted(path: Path) -> bool:
    """Owned by this user, not a symlink, not writable by group or others (else someone else could forge it)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not hasattr(os, "getuid"):
        return not os.path.islink(path)
    return not os.path.islink(path) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _load_cache() -> dict:
    path = cache_path()
    if not (_trusted(path.parent) and _trusted(path)):
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(new: dict) -> None:
    """Merge `new` entries into the cache file as it is now (other processes may have added theirs) and replace it."""
    path = cache_path()
    tmp = None
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _trusted(path.parent) or (os.path.lexists(path) and not _trusted(path)):
            return  # never write into a cache others could read back as trusted
        cache = _load_cache()
        for key, stamp in new.items():
            cache.pop(key, None)
            cache[key] = stamp  # most recent last, so trimming drops the oldest
        cache = dict(list(cache.items())[-_CACHE_ENTRIES:])
        fd, tmp = tempfile.mkstemp(prefix=".verified.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(cache, f)
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass  # an unwritable cache only costs a re-hash next time
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
