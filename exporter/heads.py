"""The graphs of the tasks beyond text generation: one forward pass, no cache (exporter/tasks.py names them).

    input_ids (B, T) ────────┐   ┌──────────────────────┐   last_hidden_state (B, T, D)      feature-extraction
    attention_mask (B, T) ───┼──▶│ position_ids from the │──▶ logits (B, num_labels)          text-classification
    [mc_token_ids (B, C)] ───┘   │ mask, then HF model   │    logits (B, T, num_labels)       token-classification
                                 └──────────────────────┘    start_logits, end_logits (B, T) question-answering
                                                             logits (B, C, T, V), mc_logits (B, C)  multiple-choice
                                                             (multiple-choice ids and mask are (B, C, T))

Batches are left-padded, like the decoder's. The graph computes position ids from the mask (cumsum - 1, pads 0),
as transformers' `generate` does, so each row of a padded batch gets exactly what it gets alone; transformers'
own forward with the mask alone would count the pads as positions. Sequence classification pools each row at its
last token that is not `pad_token_id` (the rightmost one, so left and right padding both work), or at the last
position when the config has no pad id: transformers' rule, written out here because its forward refuses a batch
when there is no pad id.
"""

from __future__ import annotations

import torch

from .presets import ExportError
from .tasks import TASKS, id2label

INPUT_IDS, ATTENTION_MASK, MC_TOKEN_IDS = "input_ids", "attention_mask", "mc_token_ids"
# int4 keeps the heads' MatMuls at 8 bits, as it keeps the lm_head: their error goes straight into the outputs
# (measured: a 3-label classifier's mean KL 0.021 with a 4-bit score against 8-bit; fnmatch over weight names).
HEAD_8BIT = ("*score.*", "*classifier.*", "*qa_outputs.*", "*multiple_choice_head.*", "*lm_head*")
_EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_CHOICES = 2, 5, 3  # >= 2: torch.export must not specialise an axis


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded mask (..., T): cumsum - 1, pads 0 (transformers' generate)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def pool_last(logits: torch.Tensor, input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """transformers' sequence-classification pooling: logits (B, T, L) at each row's rightmost non-pad token."""
    if pad_token_id is None:
        return logits[:, -1]  # (B, L)
    non_pad = (input_ids != pad_token_id).to(torch.int32)  # (B, T)
    index = torch.arange(input_ids.shape[-1], dtype=torch.int32) * non_pad
    last = index.argmax(-1)  # (B,): 0 for a row of pads only, as transformers
    return logits[torch.arange(input_ids.shape[0]), last]


class FlatHead(torch.nn.Module):
    """A transformers model of one task behind flat tensors: (ids, mask[, mc_token_ids]) -> the task's outputs."""

    def __init__(self, model: torch.nn.Module, task: str):
        super().__init__()
        self.model, self.task = model, task  # `model`: initializer names start "model." as in the decoder graph

    def forward(self, input_ids, attention_mask, mc_token_ids=None):
        kwargs = dict(attention_mask=attention_mask, position_ids=positions(attention_mask), use_cache=False)
        if self.task == "feature-extraction":
            return (self.model(input_ids=input_ids, **kwargs).last_hidden_state,)  # (B, T, D)
        if self.task == "text-classification":
            base = getattr(self.model, self.model.base_model_prefix)
            hidden = base(input_ids=input_ids, **kwargs).last_hidden_state  # (B, T, D)
            return (pool_last(self.model.score(hidden), input_ids, self.model.config.pad_token_id),)  # (B, L)
        if self.task == "token-classification":
            return (self.model(input_ids=input_ids, **kwargs).logits,)  # (B, T, L)
        if self.task == "question-answering":
            out = self.model(input_ids=input_ids, **kwargs)
            return out.start_logits, out.end_logits  # (B, T) each
        if self.task == "multiple-choice":  # GPT2Model flattens ids and mask to (B*C, T), not position ids
            kwargs["position_ids"] = kwargs["position_ids"].reshape(-1, input_ids.shape[-1])  # (B*C, T)
            out = self.model(input_ids=input_ids, mc_token_ids=mc_token_ids, **kwargs)
            return out.logits, out.mc_logits  # (B, C, T, V), (B, C)
        raise ExportError(f"no graph for task {self.task!r}")


def example_inputs(task: str, vocab_size: int, pad: int) -> tuple:
    """Inputs of the traced shapes; the first row is left-padded by two pad tokens."""
    g = torch.Generator().manual_seed(0)
    shape = (_EXAMPLE_BATCH, _EXAMPLE_CHOICES, _EXAMPLE_SEQ) if task == "multiple-choice" else \
        (_EXAMPLE_BATCH, _EXAMPLE_SEQ)
    ids = torch.randint(0, vocab_size, shape, generator=g)
    mask = torch.ones(shape, dtype=torch.int64)
    mask[0, ..., :2], ids[0, ..., :2] = 0, pad
    if task == "multiple-choice":
        return ids, mask, torch.full(shape[:2], _EXAMPLE_SEQ - 1, dtype=torch.int64)
    return ids, mask


def _dynamic_shapes(task: str):
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    if task == "multiple-choice":
        choices = torch.export.Dim("num_choices")
        return {"input_ids": {0: batch, 1: choices, 2: seq}, "attention_mask": {0: batch, 1: choices, 2: seq},
                "mc_token_ids": {0: batch, 1: choices}}
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}


def input_names(task: str) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK, *TASKS[task].extra_inputs]


def trace_head(model: torch.nn.Module, facts: dict, task: str):
    """Export `model` (the task's transformers class, eval, eager) into an onnx_ir.Model with dynamic axes.

    Traced in the same controlled form as the decoder (exporter/traced_form.py), so the same fusion rules apply.
    """
    from .stream import fold_weight_transposes
    from .trace import _quiet, _weights_not_folded
    from .traced_form import traced_form

    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    wrapper = FlatHead(model, task).eval()
    args = example_inputs(task, facts["vocab_size"], pad)
    with torch.no_grad(), traced_form(model, facts), _quiet():
        program = torch.onnx.export(wrapper, args, dynamo=True, dynamic_shapes=_dynamic_shapes(task),
                                    optimize=False, verbose=False, input_names=input_names(task),
                                    output_names=list(TASKS[task].outputs))
    with _quiet(), _weights_not_folded():
        program.optimize()
    fold_weight_transposes(program.model)
    return program.model


def head_manifest(loaded, facts: dict, ir_model, opts, passes: dict) -> dict:
    """The manifest of a head graph: the decoder's sections without KV and generation, plus task and labels."""
    from gptexport.graphs.signature import io_spec
    from gptexport.runtime.manifest import FORMAT_VERSION

    from . import __version__
    from .artifact import tokenizer_record
    from .generation import special_tokens
    from .tasks import model_class

    config = loaded.model.config
    return {
        "format_version": FORMAT_VERSION,
        "producer": {"name": "gptexport", "version": __version__},
        "task": loaded.task,
        "model": {"name": loaded.name, "architecture": loaded.architecture.name, "source": loaded.source,
                  "random_weights": loaded.random_weights, "seed": loaded.seed, "revision": loaded.revision,
                  "checkpoint": loaded.checkpoint, "class": model_class(loaded.task, loaded.architecture.name)},
        "labels": id2label(config, loaded.task),
        "tokenizer": tokenizer_record(loaded),
        "config": facts,
        "dtype": opts.dtype,
        "kv_dtype": None,  # no cache
        "inputs": io_spec(ir_model.graph.inputs),
        "outputs": io_spec(ir_model.graph.outputs),
        # pooling of text-classification reads pad_token_id: None means "the last position"
        "special_tokens": special_tokens(config, getattr(loaded.model, "generation_config", None)),
        "pad_token_id": config.pad_token_id,
        "passes": passes,
        "validation": {"passed": None, "skipped": True},
    }


def write_head_artifact(loaded, facts: dict, opts, directory, report) -> dict:
    """Trace, passes and save a head graph into `directory` (exporter/artifact.py's write_artifact for heads).

    Returns:
        the manifest with file checksums, not yet written (publish writes it last).
    """
    from gptexport.runtime.manifest import checksum_files

    from .artifact import TOKENIZER_FILE, quant_settings, save_graph, write_model_config, write_tokenizer_files
    from .passes import run_passes
    from .tasks import model_class

    with report.step("trace"):
        ir_model = trace_head(loaded.model, facts, loaded.task)
    with report.step("passes"):
        quant = quant_settings(loaded, opts)
        quant["keep_8bit"] = tuple(quant["keep_8bit"]) + HEAD_8BIT  # int4: the head is what lm_head is to LMs
        passes = run_passes(ir_model, loaded.architecture.name, facts, fuse=opts.fuse, dtype=opts.dtype,
                            strict=opts.strict, quant=quant)
        names = [v.name for v in ir_model.graph.outputs]
        if names != list(TASKS[loaded.task].outputs):  # the runtime reads outputs by these names
            raise ExportError(f"the {loaded.task} graph's outputs are {names} after the passes, not "
                              f"{list(TASKS[loaded.task].outputs)}")
    with report.step("save"):
        save_graph(ir_model, directory, opts.external_data_threshold)
        loaded.tokenizer.save(str(directory / TOKENIZER_FILE))
        manifest = head_manifest(loaded, facts, ir_model, opts, passes)
        write_tokenizer_files(directory, loaded.tokenizer, manifest["special_tokens"], facts["max_positions"])
        write_model_config(directory, loaded.model.config, model_class(loaded.task, loaded.architecture.name),
                           getattr(loaded.model, "generation_config", None), use_cache=False)
        manifest["files"] = checksum_files(directory)
    return manifest
