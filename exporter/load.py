"""Load the torch model to export: a preset, a hub id, or a local checkpoint directory.

Loading executes no code from the checkpoint: safetensors where they exist, `torch.load` only with
`weights_only=True` (transformers' default), and never the checkpoint's own code unless `--trust-remote-code`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .presets import PRESETS, Architecture, ExportError, architecture_for
from .tasks import TEXT_GENERATION, model_class, select_task


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
    revision: str | None = None  # the hub commit sha that config, tokenizer and weights were all read from
    tokenizer_origin: str = "checkpoint"  # or "gpt2": GPT-2's vocabulary (a preset, or a checkpoint shipping none)
    task: str = "text-generation"  # exporter/tasks.py: what the graph computes (the transformers class exported)
    # what loads it again (`gptexport validate`): a preset name, a hub id, or a local directory's absolute path
    checkpoint: str | None = None


def _first_line(err: Exception) -> str:
    """The first line of an exception's message, without terminal colour codes (torch adds some)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    return text.splitlines()[0] if text else ""


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))


HUB_CONFIG_FILES = ["*.json", "*.txt", "*.model"]  # config, generation config, tokenizer files, weight index
HUB_WEIGHT_FILES = {"safetensors": ["*.safetensors"], "bin": ["pytorch_model*.bin"]}


def _offline_error(model: str, why: str) -> ExportError:
    return ExportError(f"cannot fetch {model!r} from the Hugging Face Hub ({why}); download it where there is "
                       f"network and pass the local directory instead (gptexport /path/to/checkpoint), or use "
                       f"--random-weights with a preset")


def hub_snapshot(hub_id: str, patterns: list[str], revision: str | None = None) -> tuple[str, str]:
    """A local snapshot of `patterns` of a hub repository, and the commit sha it is.

    huggingface_hub does the access: its offline mode (HF_HUB_OFFLINE) reads the local cache only, its HTTP
    client takes the usual proxy settings (HTTPS_PROXY), and without network it falls back to the cache.
    Called again with the returned sha, it reads the same commit (weights after config: one revision).

    Args:
        revision: a branch, tag or commit; None for the repository's default branch.
    Returns:
        (snapshot directory, 40-hex commit sha).
    Raises:
        ExportError: missing or gated repository, unknown revision, or not reachable and not cached.
    """
    import re

    from huggingface_hub import is_offline_mode, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    offline = is_offline_mode()
    try:
        directory = snapshot_download(hub_id, revision=revision, allow_patterns=patterns, local_files_only=offline)
    except GatedRepoError:
        raise _offline_error(hub_id, "the repository is gated: log in with `hf auth login` after accepting its "
                                     "terms") from None
    except RepositoryNotFoundError:
        raise _offline_error(hub_id, "no such repository, or it is private") from None
    except RevisionNotFoundError:
        raise _offline_error(hub_id, f"no revision {revision!r}") from None
    except Exception as err:  # noqa: BLE001 - no network and not cached (LocalEntryNotFoundError, ...), I/O
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else \
            f"not reachable and not in the local cache: {type(err).__name__}"
        raise _offline_error(hub_id, why) from None
    sha = Path(directory).name  # huggingface_hub's cache keeps each snapshot under snapshots/<commit sha>
    if not re.fullmatch(r"[0-9a-f]{40}", sha):
        raise ExportError(f"cannot tell which commit of {hub_id!r} was fetched (snapshot {directory!r})")
    return directory, sha


def hub_weights(hub_id: str, revision: str) -> str:
    """The snapshot of `revision` with its weights too: safetensors, else pytorch_model*.bin (same commit)."""
    directory, _ = hub_snapshot(hub_id, HUB_CONFIG_FILES + HUB_WEIGHT_FILES["safetensors"], revision)
    if not any(Path(directory).glob("*.safetensors")):
        directory, _ = hub_snapshot(hub_id, HUB_CONFIG_FILES + HUB_WEIGHT_FILES["bin"], revision)
    return directory


def _read_config(directory: str, model: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - unreadable config, unknown model_type, custom code refused
        raise ExportError(f"cannot read the config of {model!r}: {_first_line(err) or type(err).__name__}") from None


def resolve_config(model: str, trust_remote_code: bool = False):
    """Return (config, name, source, where) for MODEL, with no weights loaded.

    `where` is the checkpoint directory: the local one, or for a hub id the snapshot of the commit its config was
    read from (weights are then read from that commit too); for a preset, its hub id.

    Raises:
        ExportError: unknown name, unsupported architecture, or a hub id that cannot be fetched.
    """
    from transformers import GPT2Config, GPTJConfig

    if model in PRESETS:
        preset = PRESETS[model]
        cls = GPT2Config if preset.architecture == "gpt2" else GPTJConfig
        return cls(**preset.config), preset.name, "preset", preset.hub_id
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ExportError(f"{model!r} is a directory without config.json; pass a transformers checkpoint directory")
        return _read_config(str(path), model, trust_remote_code), path.resolve().name, "local", str(path)
    if _looks_like_hub_id(model):  # `where` is the snapshot of one commit (its directory is named by the sha)
        directory, _ = hub_snapshot(model, HUB_CONFIG_FILES)
        return _read_config(directory, model, trust_remote_code), model.split("/")[-1], "hub", directory
    names = ", ".join(PRESETS)
    raise ExportError(f"unknown model {model!r}: pass a preset ({names}), a hub id (owner/name) or a local directory")


def load(model: str, random_weights: bool = False, seed: int = 0, trust_remote_code: bool = False,
         stream: bool | None = None, task: str | None = None, num_labels: int | None = None) -> Loaded:
    """Load MODEL for export.

    Args:
        model: a preset name, a hub id or a local checkpoint directory.
        random_weights: build the architecture with seeded random weights instead of loading any (no network).
        seed: the torch seed of the random weights.
        trust_remote_code: allow a checkpoint's own Python code (off unless the user passes the flag).
        stream: load no weights; the graph streams them at save time (None: only when the model does not fit,
            see stream.fits_in_memory).
        task: an Optimum task name (exporter/tasks.py); None: the one the checkpoint's `architectures` names.
        num_labels: --random-weights only: the labels of a classification head (LABEL_0, ...).
    Raises:
        ExportError: see `resolve_config` and `tasks.select_task`, weights that cannot be loaded, or weights that
            do not fit the task's class (a head missing from the checkpoint, or one the export would drop).
    """
    import torch
    import transformers

    from .generation import checkpoint_generation_config
    from .tokenizer import checkpoint_tokenizer, gpt2_tokenizer

    config, name, source, where = resolve_config(model, trust_remote_code)
    arch = architecture_for(config)
    task = select_task(config, arch.name, task, random_weights, repr(model))
    _set_labels(config, task, num_labels, random_weights)
    config._attn_implementation = "eager"
    model_cls = getattr(transformers, model_class(task, arch.name))
    if stream is None:
        from .stream import fits_in_memory, parameter_count

        stream = not fits_in_memory(parameter_count(model_cls, config))
        if stream and task != TEXT_GENERATION:
            raise ExportError(f"{model!r} does not fit in memory twice, and only text-generation exports stream "
                              f"their weights (task {task!r})")
    elif stream and task != TEXT_GENERATION:
        raise ExportError(f"--stream exports text-generation only, not {task!r}; drop --stream")
    revision = None
    if source == "preset" and not random_weights:  # the preset's weights: its hub repository
        where, revision = hub_snapshot(PRESETS[model].hub_id, HUB_CONFIG_FILES)
    elif source == "hub":
        revision = Path(where).name
    tokenizer, origin = (gpt2_tokenizer(config.vocab_size), "gpt2") if source == "preset" and random_weights else \
        checkpoint_tokenizer(where, config, name)
    if stream:
        loaded = _load_streamed(model, model_cls, config, arch, name, source, where, random_weights, seed, revision)
    elif random_weights:
        torch.manual_seed(seed)
        loaded = Loaded(model_cls(config).eval(), arch, name, source, None, True, seed)
    else:
        directory = where if source == "local" else hub_weights(PRESETS[model].hub_id if source == "preset"
                                                                else model, revision)
        try:
            net, info = model_cls.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32,
                                                  trust_remote_code=trust_remote_code, local_files_only=True,
                                                  output_loading_info=True)
        except Exception as err:  # noqa: BLE001 - file errors become one line
            hint = " (or use --random-weights for an offline build)" if source != "local" else ""
            problem = _safetensors_problem(directory)  # which file, which tensor
            raise ExportError(f"cannot load the weights of {model if source != 'local' else where!r}: "
                              f"{problem or type(err).__name__ + ': ' + _first_line(err)}{hint}") from None
        check_loading(info, task, model_cls.__name__, model if source != "local" else where)
        loaded = Loaded(net.eval(), arch, name, source, None, False, None)
    loaded.task = task
    loaded.checkpoint = str(Path(where).resolve()) if source == "local" else model
    # what from_pretrained reads from generation_config.json, for empty (streamed) and random-weight models too
    loaded.model.generation_config = checkpoint_generation_config(
        None if source == "preset" and random_weights else where, config)
    loaded.tokenizer, loaded.tokenizer_origin, loaded.revision = tokenizer, origin, revision
    return loaded


def _set_labels(config, task: str, num_labels: int | None, random_weights: bool) -> None:
    """--num-labels: the head's size with --random-weights (labels LABEL_0...); a checkpoint's own is kept."""
    if num_labels is None:
        return
    from .tasks import TASKS

    if task not in ("text-classification", "token-classification"):
        raise ExportError(f"--num-labels applies to text-classification and token-classification, not {task!r}")
    if num_labels < 1:
        raise ExportError(f"--num-labels {num_labels}: give an integer >= 1")
    if not random_weights:
        if num_labels != config.num_labels:
            raise ExportError(f"--num-labels {num_labels}: the checkpoint's head has {config.num_labels} labels "
                              f"({', '.join(map(str, config.id2label.values()))}); --num-labels is for "
                              f"--random-weights")
        return
    assert TASKS[task].labels
    config.num_labels = num_labels  # transformers makes id2label LABEL_0..LABEL_{n-1}


# Buffers old GPT-2 checkpoints saved beside their weights (the causal mask); no task uses them.
_IGNORED_UNEXPECTED = (".attn.bias", ".attn.masked_bias")


def check_loading(info: dict, task: str, class_name: str, where) -> None:
    """Refuse weights that do not fit the class exported: a parameter the checkpoint lacks (transformers would
    initialise it at random) or, except for feature-extraction (the base model of any head), a checkpoint weight
    the class leaves unused (a head of another task would be dropped without a word).

    Raises:
        ExportError: naming the weights and the tasks to try.
    """
    missing = sorted(info.get("missing_keys") or [])
    unused = sorted(k for k in info.get("unexpected_keys") or [] if not k.endswith(_IGNORED_UNEXPECTED))
    shown = lambda keys: ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")  # noqa: E731
    if missing:
        raise ExportError(f"{where!r} has no weights for {shown(missing)} of {class_name} (task {task!r}): they "
                          f"would be random; pass --task for the head the checkpoint has")
    if unused and task != "feature-extraction":
        raise ExportError(f"{where!r} has weights {class_name} (task {task!r}) does not use: {shown(unused)} (a "
                          f"head of another task); pass --task for the head the checkpoint has")


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


def _load_streamed(model, model_cls, config, arch, name, source, where, random_weights, seed, revision) -> Loaded:
    """The model with empty parameters and where its weights will come from (random, or safetensors files)."""
    from . import stream

    net = stream.empty_model(model_cls, config)
    if random_weights:
        return Loaded(net, arch, name, source, None, True, seed, stream.RandomWeights.for_model(net, seed))
    directory = where if source == "local" else \
        hub_snapshot(PRESETS[model].hub_id if source == "preset" else model,
                     HUB_CONFIG_FILES + HUB_WEIGHT_FILES["safetensors"], revision)[0]
    try:
        weights = stream.SafetensorsWeights(directory)
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot stream the weights of {model if source != 'local' else where!r}: {err}") from None
    return Loaded(net, arch, name, source, None, False, None, weights)
