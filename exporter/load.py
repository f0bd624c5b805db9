"""Load the torch model to export: a preset, a hub id, or a local checkpoint directory.

Loading executes no code from the checkpoint: safetensors where they exist, `torch.load` only with
`weights_only=True` (transformers' default), and never `trust_remote_code`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .presets import PRESETS, Architecture, ExportError, architecture_for


@dataclass
class Loaded:
    model: object  # a transformers PreTrainedModel in eval mode, eager attention
    architecture: Architecture
    name: str  # a short name for the manifest and default output dir
    source: str  # "preset", "hub" or "local"
    tokenizer: object  # tokenizers.Tokenizer
    random_weights: bool
    seed: int | None


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))


def resolve_config(model: str):
    """Return (config, name, source, where) for MODEL, with no weights loaded.

    Raises:
        ExportError: unknown name, unsupported architecture, or a hub id that cannot be fetched.
    """
    from transformers import AutoConfig, GPT2Config, GPTJConfig

    if model in PRESETS:
        preset = PRESETS[model]
        cls = GPT2Config if preset.architecture == "gpt2" else GPTJConfig
        return cls(**preset.config), preset.name, "preset", preset.hub_id
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ExportError(f"{model!r} is a directory without config.json; pass a transformers checkpoint directory")
        return AutoConfig.from_pretrained(str(path)), path.resolve().name, "local", str(path)
    if _looks_like_hub_id(model):
        try:
            config = AutoConfig.from_pretrained(model)
        except Exception as err:  # noqa: BLE001 - offline, missing repo, gated: all end the same way for the user
            raise ExportError(
                f"cannot fetch {model!r} from the Hugging Face Hub ({type(err).__name__}); download it where there "
                f"is network and pass the local directory instead: gptexport /path/to/checkpoint"
            ) from None
        return config, model.split("/")[-1], "hub", model
    names = ", ".join(PRESETS)
    raise ExportError(f"unknown model {model!r}: pass a preset ({names}), a hub id (owner/name) or a local directory")


def load(model: str, random_weights: bool = False, seed: int = 0) -> Loaded:
    """Load MODEL for export.

    Args:
        model: a preset name, a hub id or a local checkpoint directory.
        random_weights: build the architecture with seeded random weights instead of loading any (no network).
        seed: the torch seed of the random weights.
    Raises:
        ExportError: see `resolve_config`, or weights that cannot be loaded.
    """
    import torch
    import transformers

    from .tokenizer import checkpoint_tokenizer, gpt2_tokenizer

    config, name, source, where = resolve_config(model)
    arch = architecture_for(config)
    config._attn_implementation = "eager"
    model_cls = getattr(transformers, arch.model_class)
    if random_weights:
        torch.manual_seed(seed)
        net = model_cls(config)
        tokenizer = gpt2_tokenizer(config.vocab_size) if source == "preset" else checkpoint_tokenizer(where, config.vocab_size)
    else:
        where = where if source != "preset" else PRESETS[model].hub_id
        try:
            net = model_cls.from_pretrained(where, attn_implementation="eager", dtype=torch.float32,
                                            trust_remote_code=False)
        except Exception as err:  # noqa: BLE001 - network or file errors become one line
            hint = " (or use --random-weights for an offline build)" if source != "local" else ""
            raise ExportError(f"cannot load the weights of {where!r}: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}{hint}") from None
        tokenizer = checkpoint_tokenizer(where, config.vocab_size)
    net.eval()
    return Loaded(net, arch, name, source, tokenizer, random_weights, seed if random_weights else None)
