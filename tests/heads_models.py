"""Tiny random checkpoints saved with a head's class (issue 14), and their export (tests/conftest.py's
`head_export` runs each once per session)."""

from __future__ import annotations

from tiny_models import PAD

CONFIGS = {
    "gpt2": ("GPT2Config", dict(n_layer=2, n_head=4, n_embd=64, n_positions=128)),
    "gptj": ("GPTJConfig", dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, rotary_dim=8, vocab_size=50400,
                                tie_word_embeddings=False)),
}
CLASSES = {("gpt2", "feature-extraction"): "GPT2Model", ("gpt2", "text-classification"): "GPT2ForSequenceClassification",
           ("gpt2", "token-classification"): "GPT2ForTokenClassification",
           ("gpt2", "question-answering"): "GPT2ForQuestionAnswering", ("gpt2", "multiple-choice"): "GPT2DoubleHeadsModel",
           ("gptj", "feature-extraction"): "GPTJModel", ("gptj", "text-classification"): "GPTJForSequenceClassification",
           ("gptj", "question-answering"): "GPTJForQuestionAnswering"}
HEAD_MODULES = ("score", "classifier", "qa_outputs", "multiple_choice_head")


def save_checkpoint(directory, arch: str, class_name: str, seed: int = 0, **overrides):
    """A tiny random checkpoint saved as `class_name` (its config's `architectures`); returns the torch model.

    GPT-2's heads get pad id = eos (the common fine-tuning setup); GPT-J's none (pooling at the last position).
    """
    import torch
    import transformers

    from gptexport.exporter.tokenizer import gpt2_tokenizer

    config_class, kwargs = CONFIGS[arch]
    pad = {"pad_token_id": PAD} if arch == "gpt2" else {}
    config = getattr(transformers, config_class)(**{"bos_token_id": PAD, "eos_token_id": PAD, **pad, "num_labels": 3,
                                                    **kwargs, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config).eval()
    with torch.no_grad():  # heads are initialised at std 0.02: widen them so that labels and spans are decided
        for name, param in model.named_parameters():
            if name.split(".")[0] in HEAD_MODULES:
                param.normal_(0.0, 1.0)
    model.save_pretrained(str(directory))
    gpt2_tokenizer(config.vocab_size).save(str(directory / "tokenizer.json"))
    return model


def export_head(root, arch: str, task: str, dtype: str = "float32", int8_kernel: str = "nbits"):
    """Save the tiny checkpoint of (arch, task) under `root` and export it.

    Returns:
        (artifact dir, the transformers model reloaded from the checkpoint (eval, eager), manifest).
    """
    import transformers

    from gptexport.exporter.build import ExportOptions, export

    ckpt = root / "checkpoint"
    ckpt.mkdir()
    save_checkpoint(ckpt, arch, CLASSES[(arch, task)])
    result = export(ExportOptions(model=str(ckpt), output=str(root / "artifact"), dtype=dtype,
                                  int8_kernel=int8_kernel))
    model = getattr(transformers, CLASSES[(arch, task)]).from_pretrained(str(ckpt), attn_implementation="eager")
    return result.output, model.eval(), result.manifest
