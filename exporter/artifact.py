"""Writing artifact directories: the graph, the tokenizer and the manifest, staged and published atomically.

The exporter's only writer of artifacts, shared by `gptexport MODEL` (build.py), the reduced-config check of
streamed exports (validate.py) and the conversion of an existing artifact to the in-place KV-cache graph. graphs/
rewrites graphs and describes them as data (`graphs.shared_kv.manifest_facts`); files are written here.

    staged(target, force) ─▶ hidden staging dir ─▶ write files ─▶ publish(staging, target, manifest)
                                                                   rename into place, manifest.json last

A failed or killed write never leaves a directory that looks complete: manifest.json, which marks completion,
is written beside the staging dir and moved in only after the rename.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from gptexport.runtime.manifest import FORMAT_VERSION, MANIFEST_NAME, checksum_files

from .passes import run_passes
from .presets import ExportError
from .tasks import TEXT_GENERATION

EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # bytes of weights above which they go to model.onnx.data (protobuf limit)
_INLINE_BYTES = 1024  # tensors this small stay in the graph: shape constants must be readable for shape inference
MODEL_FILE, DATA_FILE, TOKENIZER_FILE = "model.onnx", "model.onnx.data", "tokenizer.json"
# What transformers and Optimum read beside the graph: ORTModelForCausalLM.from_pretrained(DIR) takes the model's
# config and generation defaults, AutoTokenizer the tokenizer's. The runtime reads none of them (the manifest is
# its contract); they are listed in the manifest with checksums like every file.
CONFIG_FILE, GENERATION_CONFIG_FILE = "config.json", "generation_config.json"
TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE = "tokenizer_config.json", "special_tokens_map.json"
ECOSYSTEM_FILES = (CONFIG_FILE, GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE)
STALE_SECONDS = 60


class Reporter:
    """Times named steps and tells `on_step(name, "start"|"done", seconds)`; the CLI passes a rich display."""

    def __init__(self, on_step=None):
        self.on_step = on_step or (lambda name, state, seconds: None)
        self.timings = {}

    @contextmanager
    def step(self, name: str):
        self.on_step(name, "start", 0.0)
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)
        self.on_step(name, "done", self.timings[name])


# ---- the files --------------------------------------------------------------------------------------------------

def _weight_bytes(ir_model) -> int:
    return sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)


def save_graph(ir_model, directory: Path, threshold: int) -> None:
    """Write model.onnx, with the weights in model.onnx.data when they exceed `threshold` bytes."""
    import onnx_ir as ir

    path = directory / MODEL_FILE
    if _weight_bytes(ir_model) > threshold:
        ir.save(ir_model, str(path), external_data=DATA_FILE, size_threshold_bytes=_INLINE_BYTES)
    else:
        ir.save(ir_model, str(path))


def build_manifest(loaded, facts, ir_model, opts, passes: dict) -> dict:
    """The manifest of a freshly traced graph (docs/ARTIFACT.md), without "files" and "validation" results."""
    model = {"name": loaded.name, "architecture": loaded.architecture.name, "source": loaded.source,
             "random_weights": loaded.random_weights, "seed": loaded.seed, "revision": loaded.revision,
             "checkpoint": loaded.checkpoint}
    generation_config = getattr(loaded.model, "generation_config", None)  # the checkpoint's (exporter/load.py)
    return describe_graph(model, tokenizer_record(loaded), loaded.model.config, generation_config, facts, ir_model,
                          opts.dtype, passes)


def describe_graph(model: dict, tokenizer: dict, config, generation_config, facts: dict, ir_model, dtype: str,
                   passes: dict) -> dict:
    """A manifest for `ir_model` (without "files"; validation pending), from any producer of the graph.

    Args:
        model: the manifest's "model" section; tokenizer: its "tokenizer" section.
        config, generation_config: the transformers configs (special token ids, generation defaults; the latter
            may be None); facts: the architecture facts.
    """
    from gptexport.graphs.signature import DTYPE_NAMES, io_spec

    from . import __version__
    from .generation import generation_section, special_tokens

    kv = next(v for v in ir_model.graph.inputs if v.name.startswith("past_key_values."))
    return {
        "format_version": FORMAT_VERSION,
        "producer": {"name": "gptexport", "version": __version__},
        "task": "text-generation",  # exporter/tasks.py; a manifest without it is text-generation
        "model": model,
        "tokenizer": tokenizer,
        "config": facts,
        "dtype": dtype,
        "kv_dtype": DTYPE_NAMES[kv.dtype],
        "inputs": io_spec(ir_model.graph.inputs),
        "outputs": io_spec(ir_model.graph.outputs),
        "special_tokens": special_tokens(config, generation_config),
        "generation": generation_section(generation_config),
        "passes": passes,
        "validation": {"passed": None, "skipped": True},
    }


def tokenizer_record(loaded) -> dict:
    """The manifest's `tokenizer`: where tokenizer.json came from, and its size."""
    origin = loaded.tokenizer_origin
    if origin == "gpt2" and loaded.source != "preset":
        note = "the checkpoint ships no tokenizer files: GPT-2's vocabulary was used"
    else:
        note = "GPT-2's vocabulary (a preset)" if origin == "gpt2" else "the checkpoint's own tokenizer"
    return {"origin": origin, "fallback": origin == "gpt2" and loaded.source != "preset", "note": note,
            "vocab_size": loaded.tokenizer.get_vocab_size(with_added_tokens=True)}


def open_session(directory: Path):
    """A CPU onnxruntime session of the artifact's model.onnx (for validation)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(directory / MODEL_FILE), options, providers=["CPUExecutionProvider"])


def quant_settings(loaded, opts) -> dict:
    """The int8/int4 settings for run_passes, with calibration statistics gathered here (torch) for graphs/."""
    from .passes import KEEP_8BIT, default_int8_kernel

    kernel = opts.int8_kernel or default_int8_kernel(loaded.task)
    quant = {"block_size": opts.block_size, "method": opts.quant_method, "kernel": kernel,
             "keep_8bit": KEEP_8BIT + tuple(opts.keep_8bit)}
    if loaded.task == TEXT_GENERATION:  # a head has no lm_head to rescore
        quant["rescore_top_k"] = opts.rescore_top_k
    calibrated = opts.dtype == "int4" or (opts.dtype == "int8" and kernel != "dynamic")
    if not calibrated or opts.quant_method not in ("search", "gptq"):
        return quant
    from .calibrate import activation_statistics, calibration_tokens

    tokens, quant["calibration"] = calibration_tokens(loaded, tuple(opts.calibration))
    if tokens is None:
        return quant
    # GPTQ's Hessians are (K, K) per MatMul: in memory, all from one float forward, held until the save step; a
    # streamed model makes each when the save step quantizes its weight, block by block (exporter/layerwise.py)
    streamed_gptq = opts.quant_method == "gptq" and loaded.weights is not None
    quant["importance"], quant["hessians"] = activation_statistics(
        loaded, tokens, hessians=opts.quant_method == "gptq" and not streamed_gptq)
    if streamed_gptq:
        from .layerwise import LayerwiseHessians

        quant["hessians"] = LayerwiseHessians(loaded, tokens)
        quant["calibration"]["gptq"] = LayerwiseHessians.RECORD
    return quant


def write_artifact(loaded, facts: dict, opts, directory: Path, report: Reporter) -> dict:
    """Trace, passes and save into `directory`; the same code for in-memory and streamed weights.

    Args:
        opts: an ExportOptions (fuse, dtype, strict, kv_layout, external_data_threshold and the int8/int4
            settings are read).
    Returns:
        the manifest, with the checksums of the files written but not itself written: manifest.json marks a
        complete artifact, so it is written only when the artifact is published.
    """
    from .trace import trace

    with report.step("trace"):
        try:
            ir_model = trace(loaded.model, facts, loaded.weights)
        except KeyError as err:
            raise ExportError(f"cannot stream the weights: {err.args[0]}") from None
    with report.step("passes"):
        passes = run_passes(ir_model, loaded.architecture.name, facts, fuse=opts.fuse, dtype=opts.dtype,
                            strict=opts.strict, quant=quant_settings(loaded, opts))
        shared = to_shared_buffer(ir_model) if opts.kv_layout == "shared_buffer" else None  # after precision
        if shared is None:  # the runtime takes the last position's logits only; others feed nothing, get all
            add_logits_to_keep_input(ir_model)
    with report.step("save"):  # streamed weights are read, converted and written here, one at a time
        # a streamed model always writes model.onnx.data: an inline graph is serialized whole, every weight held
        # twice (the proto and its bytes: a 2-layer GPT-J-6B-shaped int4 export peaked at 4.4 GiB so)
        threshold = 0 if loaded.weights is not None else opts.external_data_threshold
        save_graph(ir_model, directory, threshold)
        loaded.tokenizer.save(str(directory / TOKENIZER_FILE))
        manifest = build_manifest(loaded, facts, ir_model, opts, passes)
        write_tokenizer_files(directory, loaded.tokenizer, manifest["special_tokens"], facts["max_positions"])
        if shared is not None:
            apply_shared_buffer_facts(manifest, ir_model, shared)
        else:  # the in-place graph has other inputs: Optimum cannot run it, so no config tells it to try
            write_model_config(directory, loaded.model.config, loaded.architecture.model_class,
                               getattr(loaded.model, "generation_config", None))
        manifest["files"] = checksum_files(directory)
    return manifest


def write_model_config(directory: Path, config, model_class: str, generation_config=None,
                       use_cache: bool = True) -> None:
    """config.json and generation_config.json of the exported model, as transformers writes them.

    Args:
        config: the transformers config the graph was traced from.
        model_class: its LM class (e.g. "GPT2LMHeadModel"), recorded as `architectures`.
        generation_config: the checkpoint's (exporter/load.py); None: derived from `config`.
        use_cache: False for the graphs without a cache (exporter/heads.py).
    """
    from transformers import GenerationConfig

    config = config.__class__.from_dict(config.to_dict())  # a copy: the traced model's own stays untouched
    config.architectures = [model_class]
    config.use_cache = use_cache
    config.save_pretrained(str(directory))
    (generation_config or GenerationConfig.from_model_config(config)).save_pretrained(str(directory))


def write_tokenizer_files(directory: Path, tokenizer, special_tokens: dict, max_positions: int) -> None:
    """tokenizer_config.json and special_tokens_map.json beside tokenizer.json, so that
    `AutoTokenizer.from_pretrained(DIR)` gives the fast GPT-2 tokenizer with the artifact's special tokens.

    Args:
        tokenizer: the `tokenizers.Tokenizer` saved as tokenizer.json.
        special_tokens: the manifest's special_tokens (bos/eos/pad ids).
        max_positions: the model's positions (`model_max_length`).
    """
    def token(key):  # None for a model without that token (no id is invented)
        return None if special_tokens[key] is None else tokenizer.id_to_token(special_tokens[key])

    specials = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
                "unk_token": token("eos_token_id")}  # GPT-2's tokenizer has no unknown token of its own
    config = {"tokenizer_class": "GPT2Tokenizer", **specials, "model_max_length": max_positions,
              "add_prefix_space": False, "clean_up_tokenization_spaces": False}
    for name, data in ((TOKENIZER_CONFIG_FILE, config), (SPECIAL_TOKENS_FILE, specials)):
        (directory / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# ---- the in-place KV-cache graph (graphs/shared_kv.py) ------------------------------------------------------------

def add_logits_to_keep_input(ir_model) -> None:
    """graphs/last_logits.py on the default graph; a graph it cannot rewrite is an export error, with the reason."""
    from gptexport.graphs.fusion._match import Reject
    from gptexport.graphs.last_logits import add_logits_to_keep

    try:
        add_logits_to_keep(ir_model)
    except Reject as err:
        raise ExportError(f"cannot add the logits_to_keep input to this graph: {err}") from None


def to_shared_buffer(ir_model) -> int:
    """The in-place KV-cache rewrite (graphs/shared_kv.py) of the fused graph; returns the attentions rewritten.

    Raises:
        ExportError: the fused graph does not fit the variant (e.g. attention fusion fell short), with the reason.
    """
    from gptexport.graphs.fusion._match import Reject
    from gptexport.graphs.shared_kv import to_shared_kv

    try:
        return to_shared_kv(ir_model)
    except Reject as err:
        raise ExportError(f"--kv-layout shared_buffer: cannot rewrite this graph: {err}") from None


def apply_shared_buffer_facts(manifest: dict, ir_model, count: int) -> None:
    """Merge what graphs.shared_kv says about the rewritten graph into its manifest (changed in place)."""
    from gptexport.graphs.shared_kv import manifest_facts

    facts = manifest_facts(ir_model, count, manifest["config"]["num_layers"])
    manifest["kv_layout"] = facts["kv_layout"]
    passes = manifest.setdefault("passes", {})
    passes.setdefault("counts", {}).update(facts["counts"])
    passes.setdefault("expected", {}).update(facts["expected"])
    manifest["inputs"], manifest["outputs"] = facts["inputs"], facts["outputs"]


def convert_to_shared_buffer(source, target, force: bool = False) -> int:
    """Write a copy of the artifact at `source` to `target` with its graph rewritten into the in-place variant.

    The manifest gets the same facts `gptexport --kv-layout shared_buffer` writes and new file entries, so the
    runtime verifies it like any artifact; staged and published like an export.

    Returns:
        The number of attentions rewritten.
    Raises:
        ExportError: `target` exists without `force`, or the graph cannot become the variant.
    """
    import onnx_ir as ir

    source, target = Path(source), Path(target)
    manifest = json.loads((source / MANIFEST_NAME).read_text())
    with staged(target, force) as staging:
        model = ir.load(source / MODEL_FILE)
        count = to_shared_buffer(model)
        external = (source / DATA_FILE).exists()
        ir.save(model, staging / MODEL_FILE, external_data=DATA_FILE if external else None)
        shutil.copy2(source / TOKENIZER_FILE, staging / TOKENIZER_FILE)
        for name in (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE):  # not config.json: Optimum cannot run this graph
            if name in manifest.get("files", {}):
                shutil.copy2(source / name, staging / name)
        apply_shared_buffer_facts(manifest, model, count)
        manifest["files"] = checksum_files(staging)
        publish(staging, target, manifest)
    return count


# ---- staging and publishing --------------------------------------------------------------------------------------

def check_target(target: Path, force: bool) -> None:
    """Refuse a target that exists (without --force), is not a directory, or whose parent does not exist."""
    if target.exists() and not force:
        raise ExportError(f"output directory {str(target)!r} already exists; pass --force to replace it")
    if target.exists() and not target.is_dir():
        raise ExportError(f"output path {str(target)!r} exists and is not a directory")
    if target.exists():
        why = _not_replaceable(target)
        if why:
            raise ExportError(f"--force replaces only an empty directory or a gptexport artifact; {str(target)!r} "
                              f"{why}: nothing was touched (choose another -o)")
    if not target.parent.exists():
        raise ExportError(f"parent directory of {str(target)!r} does not exist")


def _not_replaceable(target: Path) -> str | None:
    """Why --force must not remove the existing directory `target`, or None when it may.

    Only an empty directory, or an artifact of ours holding nothing but its manifest and the files the manifest
    lists, is replaced: `-o . --force` or `-o ~ --force` must never delete a directory of the user's.
    """
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        return "is the current directory or one above it"
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return None
    try:
        manifest = json.loads((target / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"is not empty and has no readable {MANIFEST_NAME} of a gptexport artifact"
    if not (isinstance(manifest, dict) and isinstance(manifest.get("producer"), dict)
            and manifest["producer"].get("name") == "gptexport" and isinstance(manifest.get("files"), dict)):
        return f"is not empty and its {MANIFEST_NAME} is not a gptexport artifact's"
    foreign = [name for name in entries if name != MANIFEST_NAME and name not in manifest["files"]]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"is a gptexport artifact but also holds files its manifest does not list ({shown})"
    return None


@contextmanager
def staged(target: Path, force: bool):
    """A hidden staging directory beside `target`, removed (with any pending manifest) if the body fails.

    Yields:
        the staging directory; the body writes into it and ends with `publish`.
    Raises:
        ExportError: see `check_target`.
    """
    target = Path(target).expanduser().resolve()
    check_target(target, force)
    remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _pending(target).unlink(missing_ok=True)
        raise


def _pending(target: Path) -> Path:
    return target.parent / f".{target.name}.manifest-{os.getpid()}.json"


def publish(staging: Path, target: Path, manifest: dict) -> None:
    """Move the finished staging dir into place, then its manifest.json (an existing target, with --force, goes
    last); the manifest is written durably beside the staging dir first, so it appears only when all else has."""
    target = Path(target).expanduser().resolve()
    pending = _pending(target)
    write_manifest_file(pending, manifest)
    old = None
    if target.exists():
        check_target(target, force=True)  # again: the directory may have changed while the export ran
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / "previous")
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    os.replace(pending, target / MANIFEST_NAME)


def write_manifest_file(path: Path, manifest: dict) -> None:
    """Write the manifest JSON (its "files" already computed) durably to `path`."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def remove_stale_staging(target: Path) -> None:
    """Remove what killed earlier writes to the same target left: hidden staging dirs without a manifest.

    Only dirs untouched for STALE_SECONDS, so a concurrent export's live staging dir is left alone.
    """
    for prefix in (f".{target.name}.partial-", f".{target.name}.manifest-", f".{target.name}.old-"):
        for path in target.parent.glob(prefix + "*"):
            if time.time() - path.lstat().st_mtime <= STALE_SECONDS or path.is_symlink():
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
