"""`gptexport adopt OPTIMUM_DIR -o DIR`: an Optimum text-generation export becomes an artifact of ours.

    OPTIMUM_DIR (model.onnx with past_key_values.* / present.*, config.json, tokenizer files)
        │ check the I/O contract (docs/ARTIFACT.md): every missing or wrong piece listed at once
        │ [our passes: --fuse, --fp16 | --int8 | --int4, --kv-layout shared_buffer]
        ▼
    staging dir: model.onnx [+ model.onnx.data], tokenizer.json, config.json, tokenizer files
        │ validate by running it: cache against no cache, greedy (single and a left-padded batch) against
        │ greedy without the cache; against torch too with --checkpoint
        ▼
    DIR (published like an export: manifest.json last, --force replaces only an artifact of ours)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifact import (CONFIG_FILE, EXTERNAL_DATA_THRESHOLD, GENERATION_CONFIG_FILE, MODEL_FILE, SPECIAL_TOKENS_FILE,
                       TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, Reporter, add_logits_to_keep_input,
                       apply_shared_buffer_facts, describe_graph, open_session, publish, save_graph, staged,
                       to_shared_buffer, write_tokenizer_files)
from .presets import ExportError

STEPS = ["check", "passes", "save", "validate", "finish"]
KV_LAYOUTS = ("concat", "shared_buffer")
DTYPES = ("float32", "float16", "int8", "int4")
_COPIED = ("vocab.json", "merges.txt")  # the slow tokenizer's files, when the export has them
_ONNX_TYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32"}
_FLOATS = ("float32", "float16")
LOGITS_TO_KEEP = "logits_to_keep"  # graphs/last_logits.py: the runtime asks for the last position's logits only


@dataclass
class AdoptOptions:
    source: str
    output: str
    checkpoint: str | None = None  # the torch checkpoint the export came from: validate against it too
    force: bool = False
    fuse: bool = False
    dtype: str | None = None  # None: keep the export's precision
    kv_layout: str = "concat"
    strict: bool = False
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD


# ---- the contract -----------------------------------------------------------------------------------------------

def _value_info(values) -> dict:
    out = {}
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        out[v.name] = (_ONNX_TYPES.get(t.elem_type, f"onnx type {t.elem_type}"), dims)
    return out


def _check_value(problems, where, name, found, dtypes, rank, fixed=None):
    if name not in found:
        problems.append(f"{where} {name!r} is missing")
        return
    dtype, dims = found[name]
    if dtype not in dtypes:
        problems.append(f"{where} {name!r} is {dtype}, expected {' or '.join(dtypes)}")
    if len(dims) != rank:
        problems.append(f"{where} {name!r} has rank {len(dims)}, expected {rank}")
        return
    for axis, want in (fixed or {}).items():
        if isinstance(dims[axis], int) and dims[axis] != want:
            problems.append(f"{where} {name!r} has {dims[axis]} at axis {axis}, the config says {want}")


def graph_problems(graph, facts: dict) -> list[str]:
    """Every way the graph's inputs and outputs differ from the artifact contract (docs/ARTIFACT.md).

    Args:
        graph: an onnx GraphProto (weights need not be loaded).
        facts: the architecture facts of its config.
    Returns:
        one line per problem; empty when the graph fits.
    """
    problems: list[str] = []
    inputs, outputs = _value_info(graph.input), _value_info(graph.output)
    heads = {1: facts["num_heads"], 3: facts["head_size"]}
    for name in ("input_ids", "attention_mask", "position_ids"):
        _check_value(problems, "input", name, inputs, ("int64",), 2)
    _check_value(problems, "output", "logits", outputs, _FLOATS, 3, {2: facts["vocab_size"]})
    expected_in, expected_out = {"input_ids", "attention_mask", "position_ids"}, {"logits"}
    for i in range(facts["num_layers"]):
        for kind in ("key", "value"):
            past, present = f"past_key_values.{i}.{kind}", f"present.{i}.{kind}"
            _check_value(problems, "input", past, inputs, _FLOATS, 4, heads)
            _check_value(problems, "output", present, outputs, _FLOATS, 4, heads)
            expected_in.add(past)
            expected_out.add(present)
    if LOGITS_TO_KEEP in inputs:  # optional (an export of ours has it, with a default): an int64 scalar
        _check_value(problems, "input", LOGITS_TO_KEEP, inputs, ("int64",), 0)
        expected_in.add(LOGITS_TO_KEEP)
    problems += [f"input {n!r} is not part of the contract (a merged decoder's branch flag? export with "
                 f"--task text-generation-with-past, not merged)" for n in inputs if n not in expected_in]
    kv = {inputs[n][0] for n in inputs if n.startswith("past_key_values.")} | \
        {outputs[n][0] for n in outputs if n.startswith("present.")}
    if len(kv) > 1:
        problems.append(f"past and present keys/values mix dtypes ({', '.join(sorted(kv))}): they must share one")
    return problems


def check_source(source: Path) -> tuple[object, object, dict, object]:
    """The export's config, architecture, facts and graph (without weights), or every problem at once.

    Raises:
        ExportError: one line per missing or wrong piece, all listed.
    """
    import onnx
    from transformers import AutoConfig

    from .presets import architecture_for

    if not source.is_dir():
        raise ExportError(f"{str(source)!r} is not a directory (an Optimum export directory is expected)")
    problems, config, architecture, facts, graph = [], None, None, None, None
    if not (source / MODEL_FILE).is_file():
        found = sorted(p.name for p in source.glob("*.onnx"))
        problems.append(f"no {MODEL_FILE}" + (f" (found {', '.join(found)}: export with --task "
                                               f"text-generation-with-past)" if found else ""))
    if not (source / CONFIG_FILE).is_file():
        problems.append(f"no {CONFIG_FILE} (the model's transformers config)")
    else:
        try:
            config = AutoConfig.from_pretrained(str(source))
            architecture = architecture_for(config)
            facts = architecture.facts(config)
        except ExportError as err:
            problems.append(str(err))
        except (ValueError, OSError, KeyError) as err:
            problems.append(f"{CONFIG_FILE} cannot be read: {str(err).splitlines()[0]}")
    if not (source / TOKENIZER_FILE).is_file() and not all((source / n).is_file() for n in _COPIED):
        problems.append(f"no tokenizer: neither {TOKENIZER_FILE} nor vocab.json + merges.txt")
    if (source / MODEL_FILE).is_file():
        try:
            graph = onnx.load(str(source / MODEL_FILE), load_external_data=False).graph
        except Exception as err:  # noqa: BLE001 - a damaged file: say so in the list
            problems.append(f"{MODEL_FILE} is not a readable ONNX model: {str(err).splitlines()[0]}")
        if graph is not None and facts is not None:
            problems += graph_problems(graph, facts)
    if problems:
        raise ExportError(f"{str(source)!r} is not an Optimum text-generation export we can adopt:\n  - "
                          + "\n  - ".join(problems))
    return config, architecture, facts, graph


def _generation_config(source: Path):
    """The export's generation_config.json as transformers reads it, or None."""
    if not (source / GENERATION_CONFIG_FILE).is_file():
        return None
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(str(source))


def _tokenizer(source: Path):
    from tokenizers import Tokenizer

    if (source / TOKENIZER_FILE).is_file():
        return Tokenizer.from_file(str(source / TOKENIZER_FILE))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source), use_fast=True).backend_tokenizer


# ---- validation by running it -----------------------------------------------------------------------------------

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog because",
           "In 1991, the remains of Russian Tsar Nicholas II and his family"]
PADDED_BATCH = ["Hi", "Once upon a time, in a land far away, there lived"]
NEW_TOKENS = 12
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def _run(session, facts, ids: np.ndarray, mask: np.ndarray, past=None):
    """One call of the graph: ids (B, T) after `past` (or none), mask (B, past + T); returns logits, presents."""
    inputs = {i.name: i for i in session.get_inputs()}
    batch, layers = ids.shape[0], facts["num_layers"]
    kv_type = _NP[inputs["past_key_values.0.key"].type]
    if past is None:
        empty = np.zeros((batch, facts["num_heads"], 0, facts["head_size"]), kv_type)
        past = [empty] * (2 * layers)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -ids.shape[1]:]  # left padding: from the mask
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions.astype(np.int64)}
    for i in range(layers):
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, feed)))
    presents = [out[f"present.{i}.{k}"] for i in range(layers) for k in ("key", "value")]
    return out["logits"].astype(np.float32), presents


def cache_check(session, facts: dict, token_rows: list[list[int]]) -> dict:
    """Logits of each prompt run whole (no cache) against the same prompt as a prefill of half of it and then one
    token at a time through the cache; the worst |difference| over all positions after the split."""
    worst = 0.0
    for ids in token_rows:
        ids = np.array([ids], np.int64)
        full, _ = _run(session, facts, ids, np.ones_like(ids))
        split = max(1, ids.shape[1] // 2)
        logits, past = _run(session, facts, ids[:, :split], np.ones((1, split), np.int64))
        steps = [logits[:, -1]]
        for t in range(split, ids.shape[1]):
            logits, past = _run(session, facts, ids[:, t:t + 1], np.ones((1, t + 1), np.int64), past)
            steps.append(logits[:, -1])
        ref = full[:, split - 1:]
        worst = max(worst, float(np.abs(np.stack(steps, axis=1) - ref).max()))
    return {"cache_logits_max_abs_diff": worst}


def _greedy_without_cache(session, facts, ids: list[int], new: int) -> tuple[list[int], list[np.ndarray]]:
    seq, tokens, logits = list(ids), [], []
    for _ in range(new):
        arr = np.array([seq], np.int64)
        out, _ = _run(session, facts, arr, np.ones_like(arr))
        logits.append(out[0, -1])
        tokens.append(int(out[0, -1].argmax()))
        seq.append(tokens[-1])
    return tokens, logits


def greedy_cache_check(session, facts: dict, tokenizer, directory: Path, manifest: dict, tolerance: float) -> dict:
    """Greedy tokens of the runtime (cache, single prompts and a left-padded batch) against greedy without a cache
    on the same graph; a divergence where the two tokens' logits are within `tolerance` is a tie."""
    from gptexport import runtime

    from .validate import greedy_tally

    rt = runtime.load(directory, verify="size", manifest=manifest)
    rows = []
    for prompts in [[p] for p in PROMPTS] + [PADDED_BATCH]:
        _, ours = rt.generate(prompts, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, return_tokens=True)
        for prompt, got in zip(prompts, ours):
            want, logits = _greedy_without_cache(session, facts, tokenizer.encode(prompt).ids, NEW_TOKENS)
            rows.append((prompt, len(prompts), got, want, logits))
    return greedy_tally(rows, tolerance, reference="no_cache")


def validate_adopted(directory: Path, facts: dict, tokenizer, manifest: dict, checkpoint: str | None) -> dict:
    """The manifest's `validation` of an adopted artifact: by running it, and against torch with a checkpoint."""
    from gptexport.graphs.precision import LOGITS_ATOL, MIN_GREEDY_AGREEMENT

    dtype = manifest["dtype"]
    session = open_session(directory)
    result = {"method": "adopted: cache against no cache and greedy with against without the cache, on this graph",
              "new_tokens": NEW_TOKENS, "logits_tolerance": LOGITS_ATOL[dtype],
              "min_greedy_agreement": MIN_GREEDY_AGREEMENT[dtype]}
    if manifest.get("kv_layout") != "shared_buffer":
        result.update(cache_check(session, facts, [tokenizer.encode(p).ids for p in PROMPTS]))
        result.update(greedy_cache_check(session, facts, tokenizer, directory, manifest, LOGITS_ATOL[dtype]))
        failed = []
        if result["cache_logits_max_abs_diff"] > LOGITS_ATOL[dtype]:
            failed.append(f"cache against no cache: logits max abs diff {result['cache_logits_max_abs_diff']:.3g} "
                          f"above {LOGITS_ATOL[dtype]}")
        if result["greedy_agreement"] < MIN_GREEDY_AGREEMENT[dtype]:
            failed.append(f"greedy with against without the cache {result['greedy_agreement']:.3f} below "
                          f"{MIN_GREEDY_AGREEMENT[dtype]}")
        result["failed_checks"] = failed
    else:  # the in-place graph has no "no cache" mode: torch is its reference (a checkpoint is required)
        result["failed_checks"] = []
    if checkpoint is not None:
        result.update(_against_torch(directory, facts, tokenizer, manifest, checkpoint, session))
    result["passed"] = not result["failed_checks"]
    return result


def _against_torch(directory, facts, tokenizer, manifest, checkpoint, session) -> dict:
    from .load import load
    from .validate import validate

    loaded = load(checkpoint)
    theirs = loaded.architecture.facts(loaded.model.config)
    if theirs != facts:
        raise ExportError(f"--checkpoint {checkpoint!r} is not the exported model: its facts {theirs} differ from "
                          f"the export's {facts}")
    eos = manifest["special_tokens"]["eos_token_id"]
    torch_result = validate(loaded.model, facts, tokenizer, str(directory), session, manifest["dtype"], eos,
                            manifest=manifest)
    out = {"torch": {k: v for k, v in torch_result.items() if k != "greedy_cases"},
           "torch_greedy_cases": torch_result["greedy_cases"], "method_torch": "full: against the checkpoint's "
           "torch model (logits, presents, greedy single and padded batch)"}
    failed = []
    if not torch_result["passed"]:  # the validator names each check it failed, with its figures
        failed += [f"against torch: {c}" for c in torch_result["failed_checks"]]
    out["failed_checks"] = failed
    return out


# ---- the job ----------------------------------------------------------------------------------------------------

def check_options(opts: AdoptOptions) -> None:
    """Refuse combinations that cannot work, before any work (one line each, all at once)."""
    problems = []
    if opts.kv_layout not in KV_LAYOUTS:
        problems.append(f"unknown kv layout {opts.kv_layout!r}; choose one of: {', '.join(KV_LAYOUTS)}")
    if opts.kv_layout == "shared_buffer" and not opts.fuse:
        problems.append("--kv-layout shared_buffer rewrites the fused attention: add --fuse")
    if opts.kv_layout == "shared_buffer" and opts.checkpoint is None:
        problems.append("--kv-layout shared_buffer is validated against torch only: add --checkpoint DIR")
    if opts.dtype is not None and opts.dtype not in DTYPES:
        problems.append(f"unknown dtype {opts.dtype!r}; choose one of: {', '.join(DTYPES)}")
    if opts.checkpoint is not None and not Path(opts.checkpoint).is_dir():
        problems.append(f"--checkpoint {opts.checkpoint!r} is not a directory")
    if problems:
        raise ExportError("; ".join(problems))


def _passes(ir_model, architecture, facts, opts: AdoptOptions, source_dtype: str) -> tuple[dict, str, int | None]:
    from .passes import run_passes

    dtype = opts.dtype or source_dtype
    if source_dtype == "float16" and dtype != "float16":
        raise ExportError(f"the export is float16 already: it cannot become {dtype} (adopt a float32 export)")
    canonical = None
    if opts.fuse:  # Optimum's graph: weights aliased by Identity, shapes lost in Shape arithmetic, scale computed
        from gptexport.graphs.canonical import canonicalise

        canonical = canonicalise(ir_model)
    precision = "float32" if dtype == source_dtype else dtype  # an fp16 export keeps its precision as it is
    passes = run_passes(ir_model, architecture.name, facts, fuse=opts.fuse, dtype=precision, strict=opts.strict)
    if canonical is not None:
        passes["canonical"] = canonical
    passes["precision"] = dtype
    shared = to_shared_buffer(ir_model) if opts.kv_layout == "shared_buffer" else None
    if shared is None and not any(v.name == LOGITS_TO_KEEP for v in ir_model.graph.inputs):
        try:  # as the exporter does for the default graph; Optimum and other callers feed nothing and get all
            add_logits_to_keep_input(ir_model)
        except ExportError as err:  # an optimisation of prefill memory, not a requirement: say why it is missing
            passes.setdefault("skipped", {})[LOGITS_TO_KEEP] = str(err)
    return passes, dtype, shared


def _copy_side_files(source: Path, staging: Path, tokenizer, manifest: dict, config, concat: bool) -> None:
    tokenizer.save(str(staging / TOKENIZER_FILE))
    for name in _COPIED:
        if (source / name).is_file():
            shutil.copy2(source / name, staging / name)
    if (source / TOKENIZER_CONFIG_FILE).is_file() and (source / SPECIAL_TOKENS_FILE).is_file():
        for name in (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE):
            shutil.copy2(source / name, staging / name)
    else:
        write_tokenizer_files(staging, tokenizer, manifest["special_tokens"], manifest["config"]["max_positions"])
    if concat:  # Optimum's own files: it loads the adopted default graph as it loaded the export
        shutil.copy2(source / CONFIG_FILE, staging / CONFIG_FILE)
        if (source / GENERATION_CONFIG_FILE).is_file():
            shutil.copy2(source / GENERATION_CONFIG_FILE, staging / GENERATION_CONFIG_FILE)
        else:
            from transformers import GenerationConfig

            GenerationConfig.from_model_config(config).save_pretrained(str(staging))


def adopt(opts: AdoptOptions, on_step=None):
    """Turn the Optimum export at opts.source into an artifact at opts.output (see the module docstring).

    Returns:
        ExportResult (output, manifest, timings).
    Raises:
        ExportError: bad options, an export that does not fit the contract (every problem listed), a target that
            exists (without --force) or is not ours to replace, or a failed validation (nothing is written).
    """
    import onnx_ir as ir

    from gptexport.graphs.signature import DTYPE_NAMES
    from gptexport.runtime.manifest import checksum_files

    from .build import ExportResult

    check_options(opts)
    report = Reporter(on_step)
    source, target = Path(opts.source).expanduser().resolve(), Path(opts.output).expanduser().resolve()
    with staged(target, opts.force) as staging:
        with report.step("check"):
            config, architecture, facts, _ = check_source(source)
            tokenizer = _tokenizer(source)
            ir_model = ir.load(str(source / MODEL_FILE))
        with report.step("passes"):
            kv = next(v for v in ir_model.graph.inputs if v.name.startswith("past_key_values."))
            passes, dtype, shared = _passes(ir_model, architecture, facts, opts, DTYPE_NAMES[kv.dtype])
        with report.step("save"):
            save_graph(ir_model, staging, opts.external_data_threshold)
            model = {"name": source.name, "architecture": architecture.name, "source": str(source),
                     "random_weights": False, "seed": None, "revision": None, "adopted_from": "optimum"}
            tok = {"origin": "export", "fallback": False, "note": "the Optimum export's own tokenizer",
                   "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True)}
            manifest = describe_graph(model, tok, config, _generation_config(source), facts, ir_model, dtype, passes)
            if shared is not None:
                apply_shared_buffer_facts(manifest, ir_model, shared)
            _copy_side_files(source, staging, tokenizer, manifest, config, concat=shared is None)
            manifest["files"] = checksum_files(staging)
        with report.step("validate"):
            manifest["validation"] = validate_adopted(staging, facts, tokenizer, manifest, opts.checkpoint)
        if not manifest["validation"]["passed"]:
            raise ExportError(f"validation failed: {'; '.join(manifest['validation']['failed_checks'])}; nothing "
                              f"was written")
        with report.step("finish"):
            manifest["timings"] = dict(report.timings)
        publish(staging, target, manifest)
    return ExportResult(target, manifest, report.timings)
