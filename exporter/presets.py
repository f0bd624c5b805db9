"""Built-in model sizes and the registry of supported architectures.

A preset names a published checkpoint and the shape of its config, so `--random-weights` can build the same
architecture offline. The registry is keyed by transformers config class name; anything else is refused with the
list of what is supported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gptexport.runtime.errors import GptexportError


class ExportError(GptexportError):
    """An export that cannot proceed; the message is one line meant for the user."""


@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str
    architecture: str  # key of ARCHITECTURES
    config: dict = field(default_factory=dict)


_GPT2 = dict(vocab_size=50257, n_positions=1024, bos_token_id=50256, eos_token_id=50256)
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("gpt2", "openai-community/gpt2", "gpt2", dict(_GPT2, n_layer=12, n_head=12, n_embd=768)),
        Preset("distilgpt2", "distilbert/distilgpt2", "gpt2", dict(_GPT2, n_layer=6, n_head=12, n_embd=768)),
        Preset("gpt2-medium", "openai-community/gpt2-medium", "gpt2", dict(_GPT2, n_layer=24, n_head=16, n_embd=1024)),
        Preset("gpt2-large", "openai-community/gpt2-large", "gpt2", dict(_GPT2, n_layer=36, n_head=20, n_embd=1280)),
        Preset("gpt2-xl", "openai-community/gpt2-xl", "gpt2", dict(_GPT2, n_layer=48, n_head=25, n_embd=1600)),
        Preset(
            "gpt-j-6b",
            "EleutherAI/gpt-j-6B",
            "gptj",
            dict(vocab_size=50400, n_positions=2048, n_layer=28, n_head=16, n_embd=4096, rotary_dim=64,
                 bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=False),
        ),
    ]
}


@dataclass(frozen=True)
class Architecture:
    """What the exporter needs to know of one transformers architecture."""

    name: str
    config_class: str
    model_class: str

    def facts(self, config) -> dict:
        """The architecture facts the manifest records (the runtime reads nothing else)."""
        heads = config.n_head
        return {
            "num_layers": config.n_layer,
            "num_heads": heads,
            "head_size": config.n_embd // heads,
            "hidden_size": config.n_embd,
            "vocab_size": config.vocab_size,
            "max_positions": config.n_positions,
            # GPT-J: rotary embedding on the first rotary_dim channels of each head; GPT-2 has learned positions.
            "rotary_dim": getattr(config, "rotary_dim", None) if self.name == "gptj" else None,
        }


ARCHITECTURES: dict[str, Architecture] = {
    a.config_class: a
    for a in [
        Architecture("gpt2", "GPT2Config", "GPT2LMHeadModel"),
        Architecture("gptj", "GPTJConfig", "GPTJForCausalLM"),
    ]
}


def architecture_for(config) -> Architecture:
    """Look up the registry entry of a transformers config.

    Raises:
        ExportError: the config's class is not supported (the message lists the supported ones).
    """
    cls = type(config).__name__
    if cls not in ARCHITECTURES:
        supported = ", ".join(f"{a.name} ({c})" for c, a in ARCHITECTURES.items())
        model_type = getattr(config, "model_type", "?")
        raise ExportError(f"unsupported architecture {model_type!r} ({cls}); supported: {supported}")
    return ARCHITECTURES[cls]
