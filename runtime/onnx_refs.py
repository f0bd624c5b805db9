"""Find and check every external-data file an ONNX model refers to, without onnx and without parsing weights.

ONNX Runtime opens `TensorProto.external_data["location"]` relative to the model's directory, and it follows
`../`, absolute paths and symbolic links. A tampered or hostile model.onnx could therefore make the runtime read any
file the process can read. This module finds every location before ONNX Runtime sees the file, by walking the
protobuf wire format directly:

```
ModelProto -> graph (7) -> initializer (5) / sparse_initializer (15: values 1, indices 2) / node (1)
           -> functions (25) -> node (7)                  node -> attribute (5) -> t (5) / tensors (10)
           -> training_info (20) -> graphs (1, 2)                           -> sparse_tensor(s) (22, 23)
                                                                            -> g (6) / graphs (11)  (recurse)
TensorProto -> external_data (13) -> StringStringEntryProto key (1) / value (2)
```

The file is memory-mapped and every field we do not descend into (raw weights above all) is skipped by its length
prefix, never copied, so a 500 MB model.onnx is scanned in milliseconds. The walk uses an explicit stack, so a
deeply nested (hostile) graph cannot hit Python's recursion limit.
"""

import mmap
import os
from pathlib import Path

from .errors import ArtifactError

# Message kinds, and per kind: field number -> kind of the embedded message we descend into.
MODEL, GRAPH, NODE, ATTRIBUTE, TENSOR, SPARSE, FUNCTION, TRAINING, ENTRY = range(9)
_CHILDREN = {
    MODEL: {7: GRAPH, 25: FUNCTION, 20: TRAINING},
    GRAPH: {1: NODE, 5: TENSOR, 15: SPARSE},
    FUNCTION: {7: NODE},
    TRAINING: {1: GRAPH, 2: GRAPH},
    NODE: {5: ATTRIBUTE},
    ATTRIBUTE: {5: TENSOR, 10: TENSOR, 22: SPARSE, 23: SPARSE, 6: GRAPH, 11: GRAPH},
    SPARSE: {1: TENSOR, 2: TENSOR},
    TENSOR: {13: ENTRY},
    ENTRY: {},
}
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class _Malformed(Exception):
    pass


def _varint(buf, pos: int, end: int):
    """Decode a base-128 varint at `pos`; returns (value, next position)."""
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed(pos)
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _entry(buf, start: int, end: int):
    """(key, value) bytes of one StringStringEntryProto."""
    key = value = b""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        field, wire = tag >> 3, tag & 7
        if wire != _LEN:
            pos = _skip(buf, pos, end, wire)
            continue
        length, pos = _varint(buf, pos, end)
        if pos + length > end:
            raise _Malformed(pos)
        if field == 1:
            key = bytes(buf[pos:pos + length])
        elif field == 2:
            value = bytes(buf[pos:pos + length])
        pos += length
    return key, value


def _skip(buf, pos: int, end: int, wire: int) -> int:
    if wire == _VARINT:
        return _varint(buf, pos, end)[1]
    if wire in (_I64, _I32):
        pos += 8 if wire == _I64 else 4
    elif wire == _LEN:
        length, pos = _varint(buf, pos, end)
        pos += length
    else:  # groups (3, 4) are not used by onnx.proto; anything else is not protobuf
        raise _Malformed(pos)
    if pos > end:
        raise _Malformed(pos)
    return pos


def scan_locations(buf) -> list:
    """Every external-data location (bytes, in no particular order, duplicates kept) in a serialized ModelProto.

    Args:
        buf: the model bytes (bytes, memoryview or mmap).
    Returns:
        list of bytes.
    Raises:
        ValueError: the bytes are not a well-formed protobuf message (with the byte offset).
    """
    found = []
    stack = [(0, len(buf), MODEL)]
    while stack:
        pos, end, kind = stack.pop()
        children = _CHILDREN[kind]
        while pos < end:
            tag, pos = _varint(buf, pos, end)
            field, wire = tag >> 3, tag & 7
            child = children.get(field)
            if child is None or wire != _LEN:
                pos = _skip(buf, pos, end, wire)
                continue
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed(pos)
            if child == ENTRY:
                key, value = _entry(buf, pos, pos + length)
                if key == b"location":
                    found.append(value)
            else:
                stack.append((pos, pos + length, child))
            pos += length
    return found


def external_data_locations(model_path, data: bytes | None = None) -> list:
    """The external-data locations named in an ONNX file, as str, read through a memory map.

    Args:
        model_path: path to model.onnx.
        data: the file's bytes, already read (then the file is not opened; `model_path` only names it).
    Returns:
        list of str (in no particular order, duplicates kept).
    Raises:
        ArtifactError: the file cannot be read, is not a protobuf, or a location is not UTF-8.
    """
    path = Path(model_path)
    try:
        if data is not None:
            raw = scan_locations(memoryview(data))
        else:
            raw = _scan_file(path)
    except _Malformed as e:
        raise ArtifactError(f"onnxruntime could not load {path}: not a valid ONNX protobuf (malformed field at "
                            f"byte {e.args[0]}); re-run gptexport") from None
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return [loc.decode("utf-8") for loc in raw]
    except UnicodeDecodeError:
        raise ArtifactError(f"{path} names an external-data file that is not valid UTF-8") from None


def _scan_file(path: Path) -> list:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return []
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return scan_locations(view)
            finally:
                view.release()


def check_external_data(directory, model_file: str, listed, data: bytes | None = None) -> list:
    """Refuse external data that could make ONNX Runtime read outside the artifact directory.

    Every location must be a plain relative path (no absolute path, no '..', no NUL, no backslash), resolve to a
    file inside `directory`, be listed in the manifest, and not be (or pass through) a symbolic link.

    Args:
        directory: the artifact directory.
        model_file: the graph's file name inside it.
        listed: the names in the manifest's "files".
        data: the graph's bytes when the caller has read (and verified) them; else the file is scanned.
    Returns:
        The distinct locations, normalised (e.g. ["model.onnx.data"]).
    Raises:
        ArtifactError: one line naming the offending location.
    """
    directory = Path(directory)
    root = os.path.realpath(directory)
    model_path = directory / model_file
    checked = []
    for location in dict.fromkeys(external_data_locations(model_path, data)):
        name = _plain_location(location)
        if name is None:
            raise ArtifactError(f"{model_file} refers to external data {location!r} outside the artifact "
                                "directory; refusing to load it")
        path = directory / name
        if any(p.is_symlink() for p in [path, *path.parents][:len(Path(name).parts)]):
            raise ArtifactError(f"{model_file} refers to external data {location!r}, which is a symlink; "
                                "artifact files must be regular files")
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise ArtifactError(f"{model_file} refers to external data {location!r} outside the artifact "
                                "directory; refusing to load it")
        if name not in listed:
            raise ArtifactError(f"{model_file} refers to external data {location!r}, which the manifest does not "
                                "list (so its checksum was not verified); re-run gptexport")
        checked.append(name)
    return checked


def _plain_location(location: str):
    """The normalised relative path of `location`, or None if it is absolute or climbs out."""
    if not location or "\x00" in location or "\\" in location or location.startswith("/") \
            or os.path.isabs(location) or (len(location) > 1 and location[1] == ":"):
        return None
    parts = [p for p in location.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)
