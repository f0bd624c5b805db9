"""Weights that are never all in memory at once: models larger than RAM (GPT-J-6B on a 24 GiB machine).

The torch model is built with empty parameters (allocated, never touched, so they cost no resident memory) and
traced as usual; the graph's weight initializers then become lazy tensors that read one checkpoint tensor (or
generate one random tensor) when `ir.save` writes it, so the precision passes can stack their conversion on top:

    initializer "model.transformer.h.0.attn.q_proj.weight" (4096, 4096)
        = LazyTensor(read from safetensors | generate) ─▶ transpose (fold_weight_transposes)
          ─▶ float16 (graphs/precision/fp16.py) or int4 blocks (graphs/precision/quantize.py) ─▶ model.onnx.data

Peak memory is then the process (torch, the graph) plus a few copies of the largest tensor, whatever the model size.
Checkpoints are read with plain file reads, not mmap: mapped pages of a 12 GB file count as resident memory.
"""

from __future__ import annotations

import contextlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np

PARAM_PREFIX = "model."  # trace.FlatDecoder holds the HF model as `self.model`
INIT_STD = 0.02  # transformers' initializer_range for GPT-2 and GPT-J
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


# bytes per element of every safetensors dtype (a checkpoint may hold tensors we never read, e.g. int masks)
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100 * 1024**2  # the safetensors format's own limit on the JSON header


class SafetensorsWeights:
    """The tensors of a checkpoint's safetensors file(s), read one at a time as float32.

    Every file's header is checked against the file before anything is read: each tensor's byte range matches its
    shape and dtype, the ranges tile the data section with no gap or overlap, and the data section ends where the
    file ends; every read checks the bytes it got. A truncated or corrupt checkpoint is refused with one line
    naming the file and the tensor, never streamed in as whatever memory held.

    Raises:
        FileNotFoundError: a file named by the index is missing.
        ValueError: a header that does not fit its file (see `check_header`).
    """

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
            ["model.safetensors"]
        self.entries: dict[str, tuple[Path, str, tuple, int, int]] = {}
        for name in files:
            path = directory / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} (streaming export reads safetensors only)")
            length, header = read_header(path)
            for key, (dtype, shape, start, end) in check_header(path, length, header).items():
                self.entries[key] = (path, dtype, shape, 8 + length + start, end - start)

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple:
        return self.entries[name][2]

    def read(self, name: str) -> np.ndarray:
        path, dtype, shape, offset, size = self.entries[name]
        if dtype not in _ST_DTYPES:
            raise ValueError(f"{name}: safetensors dtype {dtype} is not supported (F32, F16, BF16)")
        array = np.empty(shape, _ST_DTYPES[dtype])
        with open(path, "rb") as f:
            f.seek(offset)
            got = f.readinto(memoryview(array.reshape(-1).view(np.uint8)))
        if got != size:  # the file shrank since its header was checked
            raise ValueError(f"{path}: tensor {name!r} is truncated: read {got} of its {size} bytes at offset {offset}")
        if dtype == "BF16":  # bfloat16 is the top half of a float32
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array.astype(np.float32, copy=False)


def read_header(path: Path) -> tuple[int, dict]:
    """(header length, parsed JSON header) of one safetensors file.

    Raises:
        ValueError: the file is too short for its header, or the header is not a JSON object.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes, too short for a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, _MAX_HEADER):
            raise ValueError(f"{path}: the header claims {length} bytes but the file has {size} (truncated, or not "
                             f"a safetensors file)")
        try:
            header = json.loads(f.read(length))
        except ValueError as err:
            raise ValueError(f"{path}: the safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    return length, header


def check_header(path: Path, length: int, header: dict) -> dict[str, tuple[str, tuple, int, int]]:
    """Each tensor's (dtype, shape, start, end) after checking the header against the file it came from.

    Raises:
        ValueError: one line naming the file and the first tensor whose dtype, shape, offsets or bytes do not fit.
    """
    tensors = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = meta["dtype"], tuple(int(n) for n in meta["shape"]), meta["data_offsets"]
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {key!r} has a malformed header entry {meta!r}") from None
        if dtype not in _ST_ITEMSIZE:
            raise ValueError(f"{path}: tensor {key!r} has unknown dtype {dtype!r}")
        need = int(np.prod(shape, dtype=np.int64)) * _ST_ITEMSIZE[dtype]
        if end - start != need or start < 0:
            raise ValueError(f"{path}: tensor {key!r} has data_offsets [{start}, {end}] ({end - start} bytes) but "
                             f"its shape {list(shape)} of {dtype} needs {need} bytes")
        tensors[key] = (dtype, shape, start, end)
    position = 0
    for key, (dtype, shape, start, end) in sorted(tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if start != position:
            what = "overlaps the tensor before it" if start < position else f"leaves a gap of {start - position} bytes"
            raise ValueError(f"{path}: tensor {key!r} starts at data byte {start}, which {what} (ends at {position})")
        position = end
    data = path.stat().st_size - 8 - length
    if position != data:
        last = max(tensors, key=lambda k: tensors[k][3]) if tensors else None
        if position > data:
            raise ValueError(f"{path}: tensor {last!r} ends at data byte {position} but the file holds only {data} "
                             f"data bytes (truncated by {position - data} bytes)")
        raise ValueError(f"{path}: {data - position} bytes after the last tensor {last!r}: the header does not "
                         f"describe the file")
    return tensors


class RandomWeights:
    """Seeded random tensors generated on demand, with transformers' init: normal(0, 0.02), LayerNorm 1 and 0.

    Each tensor has its own generator seeded by (seed, crc32(name)), so any tensor can be made alone, in any order.
    """

    def __init__(self, shapes: dict[str, tuple], layernorms: set[str], seed: int = 0):
        self.shapes, self.layernorms, self.seed = shapes, layernorms, seed

    def names(self) -> list[str]:
        return list(self.shapes)

    def shape(self, name: str) -> tuple:
        return self.shapes[name]

    def read(self, name: str) -> np.ndarray:
        shape = self.shapes[name]
        if name.endswith(".bias"):
            return np.zeros(shape, np.float32)
        if name.rsplit(".", 1)[0] in self.layernorms:
            return np.ones(shape, np.float32)
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        out = rng.standard_normal(shape, dtype=np.float32)
        out *= INIT_STD
        return out

    @classmethod
    def for_model(cls, model, seed: int = 0) -> "RandomWeights":
        import torch

        layernorms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
        return cls({n: tuple(p.shape) for n, p in model.named_parameters()}, layernorms, seed)


def checkpoint_name(param: str, source, aliases: dict[str, list[str]] | None = None) -> str | None:
    """The checkpoint key of a model parameter, or None.

    GPT-2 checkpoints store `h.0...`, not `transformer.h.0...`; a tied weight (GPT-2's lm_head) is stored once,
    under any of its names (`aliases`: parameter name -> every name of the same tensor).
    """
    entries = set(source.names())
    for alias in (aliases or {}).get(param, [param]):
        for candidate in (alias, alias.removeprefix("transformer.")):
            if candidate in entries:
                return candidate
    return None


def parameter_aliases(model) -> dict[str, list[str]]:
    """Parameter name -> all the names of that tensor (more than one for tied weights).

    Kept on the model from the first call: a streamed pass (calibration's hooks fill and drop each module's
    parameters) leaves tied modules with parameters of their own, and a later pass must still find GPT-2's lm_head
    under the embedding's checkpoint key.
    """
    cached = model.__dict__.get("_gptexport_parameter_aliases")
    if cached is not None:
        return cached
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    aliases = {name: names for names in groups.values() for name in names}
    model.__dict__["_gptexport_parameter_aliases"] = aliases
    return aliases


# ---- the torch model without its weights ------------------------------------------------------------------------

@contextlib.contextmanager
def _parameters_on_meta():
    """Create every nn.Parameter on the meta device (buffers stay real: GPT-J's sin/cos table is computed)."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(self, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=False)
        register(self, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def empty_model(model_cls, config):
    """The model with uninitialised CPU parameters: allocated (virtual memory), never written, never resident.

    torch.export needs real CPU tensors next to the CPU example inputs; nothing here reads their values.
    """
    import torch

    with _parameters_on_meta(), torch.device("cpu"):
        net = model_cls(config)
    empty: dict[int, torch.nn.Parameter] = {}  # by identity: tied weights (GPT-2's lm_head) stay tied
    for module in net.modules():
        for leaf, param in list(module._parameters.items()):
            if param is not None and param.device.type == "meta":
                if id(param) not in empty:
                    empty[id(param)] = torch.nn.Parameter(unwritten(param.shape), requires_grad=False)
                module._parameters[leaf] = empty[id(param)]
    return net.eval()


HEADROOM = 2 * 1024**3  # torch, the traced graph, onnxruntime's session during validation


def available_memory() -> int:
    """MemAvailable from /proc/meminfo, in bytes (unbounded where there is no /proc)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def fits_in_memory(parameters: int, available: int | None = None) -> bool:
    """Whether the in-memory export fits: the torch model in float32 and a copy of it (graph, session) at once."""
    return 2 * 4 * parameters + HEADROOM < (available_memory() if available is None else available)


def unwritten(shape):
    """A float32 CPU tensor whose values are never read (tests swap in NaNs to prove it)."""
    import torch

    return torch.empty(shape, dtype=torch.float32)


def parameter_count(model_cls, config) -> int:
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in model_cls(config).parameters())


def materialise(model, source) -> None:
    """Fill the parameters of `model` from `source` (reduced-config validation: torch sees the graph's values)."""
    import torch

    with torch.no_grad():
        aliases = parameter_aliases(model)
        for name, param in model.named_parameters():
            param.copy_(torch.from_numpy(source.read(checkpoint_name(name, source, aliases))))


# ---- the graph's initializers -----------------------------------------------------------------------------------

def lazy(func, dtype, shape, name: str | None = None):
    """An ir.LazyTensor over a function returning a numpy array (contiguous, so tobytes is one copy)."""
    import onnx_ir as ir

    return ir.LazyTensor(lambda: ir.tensor(np.ascontiguousarray(func())), dtype=dtype, shape=ir.Shape(shape),
                         name=name)


def attach_weights(ir_model, model, source) -> int:
    """Point every parameter initializer of the traced graph at `source`; return how many.

    Raises:
        KeyError: a parameter of the model that the source does not have (the message names it).
    """
    import onnx_ir as ir

    params = {PARAM_PREFIX + n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    by_pointer = {p.data_ptr(): PARAM_PREFIX + n for n, p in model.named_parameters()}
    aliases = parameter_aliases(model)
    count = 0
    for name, value in ir_model.graph.initializers.items():
        raw = getattr(value.const_value, "raw", None)
        pointer = raw.data_ptr() if hasattr(raw, "data_ptr") else None
        if name not in params and pointer in by_pointer:
            # an empty parameter under a name we do not know would be written as garbage: refuse, never guess
            raise KeyError(f"initializer {name!r} holds parameter {by_pointer[pointer]!r} under another name")
        if name not in params:
            continue
        key = checkpoint_name(name[len(PARAM_PREFIX):], source, aliases)
        if key is None:
            raise KeyError(f"the checkpoint has no tensor for parameter {name[len(PARAM_PREFIX):]!r}")
        if tuple(source.shape(key)) != params[name]:
            raise KeyError(f"checkpoint tensor {key!r} has shape {tuple(source.shape(key))}, the model "
                           f"expects {params[name]}")
        value.const_value = lazy(lambda key=key: source.read(key), ir.DataType.FLOAT, params[name], name)
        count += 1
    return count


def fold_weight_transposes(ir_model) -> int:
    """Replace Transpose(W) of a 2-D initializer read by nothing else with the transposed initializer, lazily.

    torch.onnx folds these itself by computing every transposed weight in memory (trace.py turns that off); here the
    transpose happens when the tensor is written. The initializer keeps its parameter's name (hierarchical, and
    what a reader looks for) with the transposed shape. A weight with other readers (GPT-2's tied lm_head, also the
    embedding Gather) keeps its Transpose node: no transposed copy on disk.
    """
    import onnx_ir as ir

    graph, count = ir_model.graph, 0
    for node in [n for n in graph if n.op_type == "Transpose" and n.domain in ("", "ai.onnx")]:
        weight = node.inputs[0]
        perm = node.attributes.get("perm")
        if (weight is None or not weight.is_initializer() or weight.const_value is None
                or len(weight.shape) != 2 or (perm is not None and list(perm.value) != [1, 0])
                or len(weight.uses()) != 1 or weight in graph.outputs):
            continue
        inner, rows, cols = weight.const_value, *weight.shape
        weight.const_value = lazy(lambda inner=inner: inner.numpy().T, inner.dtype, (cols, rows), weight.name)
        weight.shape = ir.Shape([cols, rows])
        ir.convenience.replace_all_uses_with(node.outputs[0], weight, replace_graph_outputs=False)
        graph.remove(node, safe=True)
        count += 1
    return count


def write_safetensors(path: str | Path, source, names: list[str], dtype=np.float16) -> int:
    """Write `names` from `source` into one safetensors file, a tensor at a time; return the bytes written."""
    code = {np.float16: "F16", np.float32: "F32"}[dtype]
    itemsize = np.dtype(dtype).itemsize
    header, offset = {}, 0
    for name in names:
        size = int(np.prod(source.shape(name))) * itemsize
        header[name] = {"dtype": code, "shape": list(source.shape(name)), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}  # transformers refuses safetensors files without it
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in names:
            f.write(np.ascontiguousarray(source.read(name).astype(dtype)).tobytes())
    return 8 + len(blob) + offset
