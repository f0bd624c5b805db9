"""Validate an exported artifact against the torch model it came from.

Two checks, both recorded in the manifest: the logits (and presents) of the graph against torch on a padded
batch with a past and on a prefill with no past; then greedy generation through the real runtime against
transformers' `generate`, prompt by prompt and as one left-padded batch of different lengths.

The shared_buffer graph (`--kv-layout shared_buffer`) has other inputs (no mask, no growing pasts): its logits
check drives it as the runtime does (runtime/kv.py: prefill into a preallocated buffer, then decode steps) and
compares the positions torch computes for the same tokens; its presents are the buffer's filled slots.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .presets import ExportError
from .trace import FlatDecoder, example_inputs, input_names, output_names

# Named tolerances per precision (largest |logits difference| against torch fp32; fraction of greedy tokens equal
# to torch's before the first divergence), measured and explained in graphs/precision/__init__.py.
from gptexport.graphs.precision import LOGITS_ATOL, MIN_GREEDY_AGREEMENT  # noqa: E402
VALIDATION_PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog because",
    "In 1991, the remains of Russian Tsar Nicholas II and his family",
]
PADDED_BATCH = ["Hi", "Once upon a time, in a land far away, there lived"]
NEW_TOKENS = 12


_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def _graph_outputs(session, names_in, args):
    """Run the graph on torch tensors, casting each to the dtype the graph declares (fp16 KV, for example)."""
    types = {i.name: _NUMPY[i.type] for i in session.get_inputs()}
    feed = {n: a.numpy().astype(types[n]) for n, a in zip(names_in, args)}
    return session.run(None, feed)


def logits_check(model, facts: dict, session, manifest: dict | None = None) -> dict:
    """Worst |difference| of logits and presents between the graph and torch, on two input shapes.

    Args:
        manifest: the artifact's; a "kv_layout" of "shared_buffer" selects `shared_logits_check`.
    """
    if manifest is not None and manifest.get("kv_layout") == "shared_buffer":
        return shared_logits_check(model, facts, session, manifest)
    layers = facts["num_layers"]
    wrapper = FlatDecoder(model).eval()
    cases = [example_inputs(facts), example_inputs(facts, batch=1, seq=9, past=0)]
    worst_logits, worst_kv, largest = 0.0, 0.0, 0.0
    for args in cases:
        with torch.no_grad():
            ref = [t.float().numpy() for t in wrapper(*args)]
        got = _graph_outputs(session, input_names(layers), args)
        real = args[1][:, -args[0].shape[1]:].numpy().astype(bool)  # logits of pad positions mean nothing
        worst_logits = max(worst_logits, float(np.abs(got[0].astype(np.float32) - ref[0])[real].max()))
        largest = max(largest, float(np.abs(ref[0][real]).max()))
        for g, r in zip(got[1:], ref[1:]):
            worst_kv = max(worst_kv, float(np.abs(g.astype(np.float32) - r).max()))
    return {"logits_max_abs_diff": worst_logits, "present_max_abs_diff": worst_kv, "max_abs_logit": largest,
            "logits_max_rel_diff": worst_logits / max(largest, 1e-12),
            "logits_cases": ["batch 2, seq 3, past 4, row 0 left-padded", "batch 1, seq 9, no past"]}


# shared_buffer: prompt lengths of each case (a left-padded batch when several), then DECODE_STEPS more tokens
SHARED_CASES = [[9], [3, 7]]
DECODE_STEPS = 2


def _left_padded(facts: dict, lengths: list[int], extra: int):
    """Random ids (B, W + extra) whose rows hold lengths[b] + extra real tokens, left-padded; mask; positions."""
    g = torch.Generator().manual_seed(0)
    width = max(lengths) + extra
    ids = torch.randint(0, facts["vocab_size"], (len(lengths), width), generator=g)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, width - n - extra:] = 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # transformers' positions, pads 0
    return ids, mask, positions


def shared_logits_check(model, facts: dict, session, manifest: dict) -> dict:
    """logits_check for the shared_buffer graph, driven through the runtime's cache (runtime/kv.py).

    Torch runs each case's whole sequence once, without a cache; the graph prefills the prompts (right-aligned
    into a preallocated buffer) and then decodes DECODE_STEPS tokens one at a time. Compared: every row's logits
    at its last prompt token and at each decode step, and each row's first len buffer slots against torch's
    keys/values of that row's real tokens.
    """
    from gptexport.runtime.session import Decoder

    decoder = Decoder(session, "cpu", manifest)
    wrapper = FlatDecoder(model).eval()
    presents = output_names(facts["num_layers"])[1:]
    worst_logits, worst_kv, largest = 0.0, 0.0, 0.0
    for lengths in SHARED_CASES:
        ids, mask, positions = _left_padded(facts, lengths, DECODE_STEPS)
        no_past = example_inputs(facts, batch=len(lengths), past=0)[3:]  # (B, nh, 0, hs) each
        with torch.no_grad():
            ref = [t.float().numpy() for t in wrapper(ids, mask, positions, *no_past)]
        ref_kv = dict(zip(presents, ref[1:]))  # (B, nh, W + steps, hs), left-padded
        ids, mask, positions = ids.numpy(), mask.numpy(), positions.numpy()
        width, total = max(lengths), ids.shape[1]
        cache = decoder.new_cache(len(lengths), capacity=total)
        got = [decoder.step(ids[:, :width], mask[:, :width], positions[:, :width], cache)]  # (B, 1, vocab)
        for t in range(width, total):  # each decode step feeds the next token of the sequence
            got.append(decoder.step(ids[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1], cache))
        for k, logits in enumerate(got):  # step k returns the logits of position width - 1 + k
            want = ref[0][:, width - 1 + k]
            worst_logits = max(worst_logits, float(np.abs(logits[:, 0].astype(np.float32) - want).max()))
            largest = max(largest, float(np.abs(want).max()))
        for past, present in decoder.pairs:
            buffer = cache.buffers[past].numpy().astype(np.float32)  # (B, nh, capacity, hs), right-aligned rows
            for b, n in enumerate(cache.lengths.tolist()):
                diff = np.abs(buffer[b, :, :n] - ref_kv[present][b, :, total - n:]).max()
                worst_kv = max(worst_kv, float(diff))
    return {"logits_max_abs_diff": worst_logits, "present_max_abs_diff": worst_kv, "max_abs_logit": largest,
            "logits_max_rel_diff": worst_logits / max(largest, 1e-12),
            "logits_cases": [f"shared_buffer through runtime/kv.py: batch {len(c)}, prompt lengths "
                             f"{'/'.join(map(str, c))}{' left-padded' if len(c) > 1 else ''}, prefill + "
                             f"{DECODE_STEPS} decode steps" for c in SHARED_CASES],
            "present_check": "each row's filled KV buffer slots against torch's keys/values of its tokens"}


def _hf_greedy(model, tokenizer, prompts: list[str], eos: int) -> tuple[list[list[int]], list[np.ndarray]]:
    """transformers' greedy tokens per row, and its raw logits at every step ((B, vocab) each)."""
    encoded = [tokenizer.encode(p).ids for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.tensor([[eos] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, pad_token_id=eos, eos_token_id=eos,
                             return_dict_in_generate=True, output_logits=True)
    return [row[width:].tolist() for row in out.sequences], [step.float().numpy() for step in out.logits]


def _agreement(ours: list[int], theirs: list[int]) -> int:
    same = 0
    for a, b in zip(ours, theirs):
        if a != b:
            break
        same += 1
    return same


def greedy_check(model, tokenizer, artifact_dir: str, eos: int, manifest: dict | None = None,
                 tie_tolerance: float = 0.0) -> dict:
    """Greedy tokens of the runtime against transformers' generate: single prompts and a left-padded batch.

    A row agrees up to its first divergence. When torch's own logits put the two diverging tokens within
    `tie_tolerance` of each other (the precision's logits tolerance), the divergence is a tie at this precision,
    not an error, and the row counts as agreeing: `greedy_agreement` is that figure, `greedy_agreement_strict`
    counts every divergence, and each tie is listed with torch's logit gap.
    """
    from gptexport import runtime
    rt = runtime.load(artifact_dir, verify="size", manifest=manifest)
    cases = [[p] for p in VALIDATION_PROMPTS] + [PADDED_BATCH]
    total, agreed, strict, rows = 0, 0, 0, []
    for prompts in cases:
        theirs, logits = _hf_greedy(model, tokenizer, prompts, eos)
        _, ours = rt.generate(prompts, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, return_tokens=True)
        for r, (prompt, a, b) in enumerate(zip(prompts, ours, theirs)):
            same = _agreement(a, b)
            row = {"prompt": prompt, "batch": len(prompts), "tokens_equal": same, "tokens": len(b)}
            if same < len(b):  # torch's logit gap between its token and ours at the divergence
                row["torch_logit_gap"] = float(logits[same][r, b[same]] - logits[same][r, a[same]])
                row["tie"] = bool(row["torch_logit_gap"] <= tie_tolerance)
            total, strict = total + len(b), strict + same
            agreed += len(b) if row.get("tie") else same
            rows.append(row)
    return {"greedy_agreement": agreed / total, "greedy_agreement_strict": strict / total,
            "greedy_tie_tolerance": tie_tolerance, "greedy_cases": rows}


def validate(model, facts: dict, tokenizer, artifact_dir: str, session, dtype: str, eos: int,
             manifest: dict | None = None) -> dict:
    """Run both checks and judge them against the precision's named tolerances.

    Returns:
        the manifest's `validation` section (with `passed`).
    Raises:
        ExportError: never for a numeric failure: a failed validation is recorded and reported by the caller.
    """
    result = {"reference": "torch float32 (transformers eager)", "new_tokens": NEW_TOKENS}
    result.update(logits_check(model, facts, session, manifest))
    result.update(greedy_check(model, tokenizer, artifact_dir, eos, manifest, tie_tolerance=LOGITS_ATOL[dtype]))
    result["logits_tolerance"] = LOGITS_ATOL[dtype]
    result["min_greedy_agreement"] = MIN_GREEDY_AGREEMENT[dtype]
    result["passed"] = bool(result["logits_max_abs_diff"] <= LOGITS_ATOL[dtype]
                            and result["greedy_agreement"] >= MIN_GREEDY_AGREEMENT[dtype])
    return result


__all__ = ["validate", "ExportError", "LOGITS_ATOL", "MIN_GREEDY_AGREEMENT"]


# ---- models too large to hold twice (streamed exports) -----------------------------------------------------------

REDUCED_LAYERS, REDUCED_HEADS = 2, 4
STREAMED_METHOD = ("reduced: the same code path (empty-parameter trace, streamed weights, same passes, same writer "
                   "with external data) exported for a reduced config of the same architecture ({layers} layers, "
                   "{heads} heads of the same head size, same rotary_dim, vocab and positions) with seeded random "
                   "weights and fully validated against torch; plus a structural check of this artifact (I/O names, "
                   "fusion counts, every external tensor's length and place in the data file)")


def reduced_config(config):
    """Same architecture and per-head shapes, fewer layers and heads: small enough to validate in memory."""
    import copy

    small = copy.deepcopy(config)
    head_size = config.n_embd // config.n_head
    small.n_layer, small.n_head = min(config.n_layer, REDUCED_LAYERS), min(config.n_head, REDUCED_HEADS)
    small.n_embd = small.n_head * head_size
    if getattr(config, "n_inner", None):
        small.n_inner = config.n_inner * small.n_embd // config.n_embd
    return small


def validate_streamed(loaded, facts: dict, opts, artifact: Path, manifest: dict, eos: int) -> dict:
    """Validate a streamed export without ever holding the model: see STREAMED_METHOD.

    Returns:
        the manifest's `validation` section: the reduced export's full validation, `structural`, `method`.
    """
    import dataclasses
    import tempfile

    from . import stream
    from .artifact import Reporter, open_session, write_artifact

    config = reduced_config(loaded.model.config)
    model_cls = type(loaded.model)
    small = dataclasses.replace(loaded, model=stream.empty_model(model_cls, config), name=f"{loaded.name}-reduced")
    small.weights = stream.RandomWeights.for_model(small.model, seed=loaded.seed or 0)
    small_facts = loaded.architecture.facts(config)
    with tempfile.TemporaryDirectory(prefix=".reduced-", dir=artifact.parent) as tmp:
        small_manifest = write_artifact(small, small_facts, dataclasses.replace(opts, external_data_threshold=0),
                                        Path(tmp), Reporter())
        reference = model_cls(config).eval()
        stream.materialise(reference, small.weights)
        result = validate(reference, small_facts, loaded.tokenizer, tmp, open_session(Path(tmp)), opts.dtype, eos,
                          manifest=small_manifest)
    result["reduced_config"] = small_facts
    result["structural"] = structural_check(artifact, facts, manifest)
    result["passed"] = bool(result["passed"] and result["structural"]["passed"])
    result["method"] = STREAMED_METHOD.format(layers=small_facts["num_layers"], heads=small_facts["num_heads"])
    return result


def structural_check(artifact: Path, facts: dict, manifest: dict) -> dict:
    """The graph's I/O names, the fusion counts, and every external tensor's length and place, read without the
    weights (the graph file only, and the data file's size)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    from gptexport.graphs import shared_kv

    from .artifact import DATA_FILE, MODEL_FILE

    proto = onnx.load(str(Path(artifact) / MODEL_FILE), load_external_data=False)
    layers, problems = facts["num_layers"], []
    inputs = input_names(layers)
    if manifest.get("kv_layout") == shared_kv.KV_LAYOUT:
        inputs = shared_kv.input_names(inputs)
    else:  # graphs/last_logits.py: an input with a default, last
        inputs = inputs + ["logits_to_keep"]
    if [v.name for v in proto.graph.input] != inputs:
        problems.append("graph inputs differ from docs/ARTIFACT.md")
    if [v.name for v in proto.graph.output] != output_names(layers):
        problems.append("graph outputs differ from docs/ARTIFACT.md")
    problems += [f"fusion: {s}" for s in manifest["passes"].get("shortfalls") or []]
    data = Path(artifact) / DATA_FILE
    data_size = data.stat().st_size if data.exists() else 0
    end, by_dtype = 0, {}
    for tensor in proto.graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        size = int(np.prod(tensor.dims, dtype=np.int64)) * dtype.itemsize
        by_dtype[dtype.name] = by_dtype.get(dtype.name, 0) + size
        if uses_external_data(tensor):
            info = {e.key: e.value for e in tensor.external_data}
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
            if length != size:
                problems.append(f"{tensor.name}: {length} bytes in the data file, its shape needs {size}")
            end = max(end, offset + length)
    if end > data_size:
        problems.append(f"external tensors reach byte {end}, {DATA_FILE} has {data_size}")
    return {"passed": not problems, "problems": problems, "initializer_bytes_by_dtype": by_dtype,
            "data_file_bytes": data_size, "fusion_counts": manifest["passes"].get("counts", {})}
