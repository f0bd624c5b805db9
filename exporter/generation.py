"""The manifest's `generation` and `special_tokens` sections, carried from the checkpoint.

transformers reads a checkpoint's generation_config.json (sampling settings, lengths, special tokens) and falls
back to its config.json for the special tokens; settings nobody set get `GenerationConfig`'s defaults at generate
time (top_k 50, temperature 1.0, ...). The manifest records what the checkpoint set and the value the runtime
applies for each setting, so the runtime (which never reads a transformers config) behaves the same.

Deliberate differences, documented in docs/ARTIFACT.md: the default length is 32 new tokens where transformers
stops at a total length of 20 (a checkpoint's own max_new_tokens or max_length wins); a list of eos ids keeps the
first (all are recorded); beam settings are recorded, not applied by default.
"""

from __future__ import annotations

from pathlib import Path

from .presets import ExportError

GENERATION_CONFIG = "generation_config.json"
DEFAULT_MAX_NEW_TOKENS = 32
# GenerationConfig._get_default_generation_params() (transformers 5.x) for the settings the runtime applies
TRANSFORMERS_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}
RECORDED = tuple(TRANSFORMERS_DEFAULTS) + ("max_new_tokens", "max_length", "min_new_tokens", "num_beams",
                                           "length_penalty", "early_stopping", "bos_token_id", "eos_token_id",
                                           "pad_token_id")


def checkpoint_generation_config(directory, config):
    """The checkpoint's GenerationConfig: its generation_config.json, else one derived from `config`.

    Args:
        directory: a local checkpoint directory (None: derive from `config`).
        config: the transformers model config.
    Raises:
        ExportError: generation_config.json exists but cannot be read (one line naming it).
    """
    from transformers import GenerationConfig

    path = Path(directory) / GENERATION_CONFIG if directory else None
    if path is None or not path.is_file():
        return GenerationConfig.from_model_config(config)
    try:
        return GenerationConfig.from_pretrained(str(path.parent))
    except Exception as err:  # noqa: BLE001 - JSON or validation errors become one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"cannot read {path}: {first}") from None


def _source(generation_config) -> str:
    """Where transformers took the generation settings from."""
    if generation_config is None:
        return "defaults"
    return "config.json" if getattr(generation_config, "_from_model_config", False) else GENERATION_CONFIG


def _set(generation_config) -> dict:
    """The RECORDED settings the checkpoint gives a value (transformers 5 leaves unset ones None)."""
    if generation_config is None:
        return {}
    return {k: getattr(generation_config, k) for k in RECORDED if getattr(generation_config, k, None) is not None}


def special_tokens(config, generation_config) -> dict:
    """bos/eos/pad ids: generation_config's, else config's; no id is invented for a model that has none.

    pad falls back to eos (what transformers' generate does, with a warning); the list of every eos id is kept
    when the checkpoint gives several (the runtime stops at the first).
    """
    given = _set(generation_config)

    def pick(name):
        return given.get(name, getattr(config, name, None))

    eos = pick("eos_token_id")
    eos_all = list(eos) if isinstance(eos, (list, tuple)) else None
    if eos_all is not None:
        eos = eos_all[0] if eos_all else None
    pad = pick("pad_token_id")
    out = {"bos_token_id": pick("bos_token_id"), "eos_token_id": eos,
           "pad_token_id": pad if pad is not None else eos}
    if eos_all is not None and len(eos_all) > 1:
        out["eos_token_ids"] = eos_all
    return out


def generation_section(generation_config) -> dict:
    """The manifest's `generation`: the value the runtime applies per setting, and where it came from.

    Returns:
        {"do_sample", "temperature", "top_k", "top_p", "repetition_penalty": the checkpoint's value or
        transformers' default; "max_new_tokens": the checkpoint's, else DEFAULT_MAX_NEW_TOKENS unless it sets
        max_length (then None, and "max_length" is applied as prompt + new tokens); "source":
        "generation_config.json", "config.json" (transformers derived it) or "defaults"; "checkpoint": every
        RECORDED setting it gave}.
    """
    given = _set(generation_config)
    section = {k: given.get(k, default) for k, default in TRANSFORMERS_DEFAULTS.items()}
    if given.get("max_new_tokens") is not None:
        section["max_new_tokens"], section["max_length"] = int(given["max_new_tokens"]), None
    elif given.get("max_length") is not None:
        section["max_new_tokens"], section["max_length"] = None, int(given["max_length"])
    else:
        section["max_new_tokens"], section["max_length"] = DEFAULT_MAX_NEW_TOKENS, None
    section["source"] = _source(generation_config)
    section["checkpoint"] = given
    return section
