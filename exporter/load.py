"""Load the torch model to export: a preset, a hub id, or a local checkpoint directory.

Loading executes no code from the checkpoint: safetensors where they exist, `torch.load` only with
`weights_only=True` (transformers' default), and never the checkpoint's own code unless `--trust-remote-code`.
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
    # Streaming export (models larger than memory): `model` has empty parameters and the graph reads its weights
    # from here when it is saved (exporter/stream.py); None when `model` holds the weights.
    weights: object | None = None


def _first_line(err: Exception) -> str:
    """The first line of an exception's message, without terminal colour codes (torch adds some)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    return text.splitlines()[0] if text else ""


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all (so an offline machine fails in seconds, not after retries)."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_error(model: str, why: str) -> ExportError:
    return ExportError(f"cannot fetch {model!r} from the Hugging Face Hub ({why}); download it where there is "
                       f"network and pass the local directory instead (gptexport /path/to/checkpoint), or use "
                       f"--random-weights with a preset")


def _hub_config(model: str, trust_remote_code: bool = False):
    """The config of a hub model: from the local HF cache if it is there, else from the hub."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - not cached: go to the hub
        pass
    if not hub_reachable():
        raise _offline_error(model, "no network")
    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - missing repo, gated, network: all end the same way for the user
        raise _offline_error(model, type(err).__name__) from None


def resolve_config(model: str, trust_remote_code: bool = False):
    """Return (config, name, source, where) for MODEL, with no weights loaded.

    Raises:
        ExportError: unknown name, unsupported architecture, or a hub id that cannot be fetched.
    """
    from transformers import AutoConfig, GPT2Config, GPTJConfig  # noqa: F401

    if model in PRESETS:
        preset = PRESETS[model]
        cls = GPT2Config if preset.architecture == "gpt2" else GPTJConfig
        return cls(**preset.config), preset.name, "preset", preset.hub_id
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ExportError(f"{model!r} is a directory without config.json; pass a transformers checkpoint directory")
        try:
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except Exception as err:  # noqa: BLE001 - unreadable config, unknown model_type, custom code refused
            raise ExportError(f"cannot read the config of {model!r}: {_first_line(err) or type(err).__name__}") from None
        return config, path.resolve().name, "local", str(path)
    if _looks_like_hub_id(model):
        return _hub_config(model, trust_remote_code), model.split("/")[-1], "hub", model
    names = ", ".join(PRESETS)
    raise ExportError(f"unknown model {model!r}: pass a preset ({names}), a hub id (owner/name) or a local directory")


def load(model: str, random_weights: bool = False, seed: int = 0, trust_remote_code: bool = False,
         stream: bool | None = None) -> Loaded:
    """Load MODEL for export.

    Args:
        model: a preset name, a hub id or a local checkpoint directory.
        random_weights: build the architecture with seeded random weights instead of loading any (no network).
        seed: the torch seed of the random weights.
        trust_remote_code: allow a checkpoint's own Python code (off unless the user passes the flag).
        stream: load no weights; the graph streams them at save time (None: only when the model does not fit,
            see stream.fits_in_memory).
    Raises:
        ExportError: see `resolve_config`, or weights that cannot be loaded.
    """
    import torch
    import transformers

    from .tokenizer import checkpoint_tokenizer, gpt2_tokenizer

    config, name, source, where = resolve_config(model, trust_remote_code)
    arch = architecture_for(config)
    config._attn_implementation = "eager"
    model_cls = getattr(transformers, arch.model_class)
    if stream is None:
        from .stream import fits_in_memory, parameter_count

        stream = not fits_in_memory(parameter_count(model_cls, config))
    if stream:
        return _load_streamed(model, model_cls, config, arch, name, source, where, random_weights, seed)
    if random_weights:
        torch.manual_seed(seed)
        net = model_cls(config)
        tokenizer = gpt2_tokenizer(config.vocab_size) if source == "preset" else checkpoint_tokenizer(where, config.vocab_size)
    else:
        where = where if source != "preset" else PRESETS[model].hub_id
        offline = source != "local" and not hub_reachable()
        try:
            net = model_cls.from_pretrained(where, attn_implementation="eager", dtype=torch.float32,
                                            trust_remote_code=trust_remote_code, local_files_only=offline)
        except Exception as err:  # noqa: BLE001 - network or file errors become one line
            hint = " (or use --random-weights for an offline build)" if source != "local" else ""
            problem = _safetensors_problem(where) if source == "local" else None  # which file, which tensor
            raise ExportError(f"cannot load the weights of {where!r}: "
                              f"{problem or type(err).__name__ + ': ' + _first_line(err)}{hint}") from None
        tokenizer = checkpoint_tokenizer(where, config.vocab_size)
    net.eval()
    return Loaded(net, arch, name, source, tokenizer, random_weights, seed if random_weights else None)


def _safetensors_problem(directory: str) -> str | None:
    """What is wrong with a checkpoint directory's safetensors files (stream.py's header checks), or None."""
    from . import stream

    path = Path(directory)
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        return None
    try:
        stream.SafetensorsWeights(path)
    except (OSError, ValueError) as err:
        return str(err)
    return None


def _load_streamed(model, model_cls, config, arch, name, source, where, random_weights, seed) -> Loaded:
    """The model with empty parameters and where its weights will come from (random, or safetensors files)."""
    from . import stream
    from .tokenizer import checkpoint_tokenizer, gpt2_tokenizer

    net = stream.empty_model(model_cls, config)
    if random_weights:
        weights = stream.RandomWeights.for_model(net, seed)
        tokenizer = gpt2_tokenizer(config.vocab_size) if source == "preset" else checkpoint_tokenizer(where, config.vocab_size)
        return Loaded(net, arch, name, source, tokenizer, True, seed, weights)
    directory = where if source == "local" else _hub_snapshot(PRESETS[model].hub_id if source == "preset" else where)
    try:
        weights = stream.SafetensorsWeights(directory)
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot stream the weights of {where!r}: {err}") from None
    return Loaded(net, arch, name, source, checkpoint_tokenizer(directory, config.vocab_size), False, None, weights)


def _hub_snapshot(hub_id: str) -> str:
    """A local directory with the hub model's config, tokenizer and safetensors (from the cache when offline)."""
    from huggingface_hub import snapshot_download

    offline = not hub_reachable()
    try:
        return snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt"], local_files_only=offline)
    except Exception as err:  # noqa: BLE001 - network or missing files end the same way for the user
        raise _offline_error(hub_id, type(err).__name__) from None
