"""Calibration for int8 / int4: which input channels of each weight MatMul carry large activations.

    tokens  --calibration FILE...  (tokenized, cut into windows)
            or, by default, text the fp32 model samples itself (self-calibration, arXiv 2410.17170: no dataset,
            and the activations are the model's own distribution)
       |
    torch forward, a hook on every Linear / Conv1D: importance[k] = mean over tokens of x_k^2
                                                     (gptq) H = mean over tokens of x x^T   (K, K)
       |
    graphs/precision (onnx only): the 4-/8-bit scale search weights each weight's error by importance[k];
                                  GPTQ compensates each channel's rounding error through H

A streamed model (larger than memory) has no weights in memory: each module's parameters are read from the
checkpoint just before it runs and dropped right after, so the forward holds one module's weights at a time (the
largest: GPT-J's embedding or lm_head, 0.8 GB in float32). Its self-sampling is the same generate with the weights
so streamed: one pass over the checkpoint per sampled token (LENGTH - 1 = 63 passes; for GPT-J-6B a few seconds
each from a page-cached fp16 checkpoint, about half a minute generating random weights), which --calibration FILE
avoids. Its GPTQ Hessians are not all held: exporter/layerwise.py makes each when the save step quantizes its
weight, block by block.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .presets import ExportError

SEQUENCES, LENGTH = 8, 64  # calibration windows and their tokens (512 tokens: seconds to sample on a small model)
SAMPLE_SEED = 0
_HOOKED = ("Linear", "Conv1D")  # torch.nn.Linear (GPT-J, lm_head) and transformers' Conv1D (GPT-2)


def calibration_tokens(loaded, files: tuple[str, ...] = (), sequences: int = SEQUENCES,
                       length: int = LENGTH) -> tuple[np.ndarray | None, dict]:
    """Token windows (B, T) to calibrate on, and the manifest's record of where they came from.

    Args:
        loaded: exporter.load.Loaded (model, tokenizer, weights).
        files: text files; empty for self-calibration.
        sequences, length: at most `sequences` windows of `length` tokens.
    Returns:
        (ids or None when there is nothing to calibrate on, record).
    Raises:
        ExportError: a calibration file that cannot be read or holds fewer than 2 tokens.
    """
    length = min(length, loaded.model.config.n_positions)
    if files:
        ids = []
        for name in files:
            try:
                text = Path(name).read_text(encoding="utf-8", errors="replace")
            except OSError as err:
                raise ExportError(f"--calibration {name!r}: cannot read it ({err.strerror or err}); pass "
                                  f"text files") from None
            ids += loaded.tokenizer.encode(text).ids
        if len(ids) < 2:
            raise ExportError(f"--calibration {', '.join(files)}: {len(ids)} tokens; at least 2 are needed")
        windows = max(1, min(sequences, len(ids) // length))
        width = min(length, len(ids))
        starts = np.linspace(0, len(ids) - width, windows).astype(int)  # spread over the whole text
        tokens = np.array([ids[s:s + width] for s in starts], np.int64)
        return tokens, {"source": "files", "files": [Path(f).name for f in files], "sequences": int(windows),
                        "tokens_per_sequence": int(width)}
    if getattr(loaded, "task", "text-generation") != "text-generation":
        return None, {"source": "none", "reason": f"a {loaded.task} model cannot sample text to calibrate on; "
                                                  f"pass --calibration FILE"}
    record = {"source": "self-sampled", "sequences": sequences, "tokens_per_sequence": length, "seed": SAMPLE_SEED,
              "sampling": "temperature 1, no top-k/top-p, from the bos token"}
    if loaded.weights is not None:
        record["streamed"] = f"{length - 1} passes over the streamed weights, one per sampled token"
    return _self_sample(loaded, sequences, length), record


def _self_sample(loaded, sequences: int, length: int) -> np.ndarray:
    import torch

    from .stream import parameter_aliases

    config = loaded.model.config
    bos = config.bos_token_id if config.bos_token_id is not None else config.eos_token_id
    torch.manual_seed(SAMPLE_SEED)
    start = torch.full((sequences, 1), bos, dtype=torch.long)
    model = loaded.model
    handles = [] if loaded.weights is None else _stream_parameters(model, loaded.weights, parameter_aliases(model))
    try:
        with torch.no_grad():
            out = model.generate(input_ids=start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0,
                                 top_p=1.0, temperature=1.0, max_new_tokens=length - 1, min_new_tokens=length - 1,
                                 pad_token_id=config.eos_token_id)
    finally:
        for h in handles:
            h.remove()
    return out.numpy()


def activation_importance(loaded, tokens: np.ndarray, prefix: str = "model.") -> dict[str, np.ndarray]:
    """Mean x^2 per input channel of every Linear / Conv1D, keyed by the graph's initializer names.

    Args:
        loaded: in memory (`weights` None) or streamed (each module's weights read from `weights` when it runs).
        tokens: (B, T) ids.
        prefix: what the traced graph puts before a parameter's name (trace.FlatDecoder's `model.`).
    Returns:
        initializer name (every alias of a tied weight) -> float32 (K,).
    """
    return activation_statistics(loaded, tokens, prefix)[0]


def activation_statistics(loaded, tokens: np.ndarray, prefix: str = "model.",
                          hessians: bool = False) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """activation_importance, and with `hessians` also mean x x^T (K, K) of every Linear / Conv1D's input (GPTQ).

    Returns:
        (importance, hessians): initializer name -> float32 (K,) and -> float32 (K, K) (empty without `hessians`).
    """
    import torch

    from .stream import parameter_aliases

    model = loaded.model
    aliases = parameter_aliases(model)
    sums: dict[str, list] = {}
    handles = []

    def collect(module, args, name):
        x = args[0].detach().double().reshape(-1, args[0].shape[-1])  # (tokens, K)
        k = x.shape[-1]
        entry = sums.setdefault(name, [torch.zeros(k, dtype=torch.float64), 0,
                                       torch.zeros(k, k, dtype=torch.float64) if hessians else None])
        entry[0] += (x ** 2).sum(0)
        entry[1] += x.shape[0]
        if hessians:
            entry[2] += x.T @ x

    for name, module in model.named_modules():
        if type(module).__name__ in _HOOKED and getattr(module, "weight", None) is not None:
            handles.append(module.register_forward_pre_hook(lambda m, a, name=f"{name}.weight": collect(m, a, name)))
    if loaded.weights is not None:
        handles += _stream_parameters(model, loaded.weights, aliases)
    try:
        with torch.no_grad():
            ids = torch.from_numpy(np.ascontiguousarray(tokens))
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out, second = {}, {}
    for name, (total, count, outer) in sums.items():
        mean = (total / max(count, 1)).float().numpy()
        h = None if outer is None else (outer / max(count, 1)).float().numpy()
        for alias in aliases.get(name, [name]):
            out[prefix + alias] = mean
            if h is not None:
                second[prefix + alias] = h
    return out, second


def _stream_parameters(model, source, aliases) -> list:
    """Hooks that fill a module's parameters from `source` before it runs and drop them after (streamed export)."""
    import torch

    from .stream import checkpoint_name, unwritten

    def load(module, args, prefix):
        for leaf, param in list(module._parameters.items()):
            if param is not None:
                key = checkpoint_name(f"{prefix}{leaf}", source, aliases)
                module._parameters[leaf] = torch.nn.Parameter(torch.from_numpy(source.read(key)),
                                                              requires_grad=False)

    def drop(module, args, output):
        for leaf, param in list(module._parameters.items()):
            if param is not None:  # back to an allocated, never-written tensor: no resident memory
                module._parameters[leaf] = torch.nn.Parameter(unwritten(param.shape), requires_grad=False)

    handles = []
    for name, module in model.named_modules():
        if any(p is not None for p in module._parameters.values()):
            prefix = f"{name}." if name else ""
            handles.append(module.register_forward_pre_hook(lambda m, a, prefix=prefix: load(m, a, prefix)))
            handles.append(module.register_forward_hook(drop))
    return handles
