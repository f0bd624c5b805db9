"""Tasks: which transformers class a checkpoint is exported as, and which tasks a checkpoint can serve.

Task names are Optimum's. The registry is keyed by (task, architecture); a checkpoint's own `architectures` entry
names the class it was saved from, which selects its task when `--task` is absent and decides which other tasks
its weights can serve without a head initialised at random:

    checkpoint class                 serves
    GPT2LMHeadModel / GPTJForCausalLM    text-generation, feature-extraction
    GPT2ForSequenceClassification        text-classification, feature-extraction
    GPT2DoubleHeadsModel                 multiple-choice, text-generation (its LM head is tied), feature-extraction
    GPT2Model / GPTJModel                feature-extraction

(feature-extraction reads the base model only, so every checkpoint serves it.) `--random-weights` builds any
task the architecture has a class for.
"""

from __future__ import annotations

from dataclasses import dataclass

from .presets import ExportError

TEXT_GENERATION = "text-generation"


@dataclass(frozen=True)
class Task:
    name: str
    classes: dict  # architecture name ("gpt2", "gptj") -> transformers class name
    outputs: tuple  # graph output names, in order (text-generation: see exporter/trace.py)
    labels: bool  # its head predicts labels: config.id2label goes into the manifest
    extra_inputs: tuple = ()  # graph inputs beyond input_ids and attention_mask
    summary: str = ""


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(TEXT_GENERATION, {"gpt2": "GPT2LMHeadModel", "gptj": "GPTJForCausalLM"}, ("logits",), False,
             summary="next-token logits with past keys/values (the decoder graph)"),
        Task("feature-extraction", {"gpt2": "GPT2Model", "gptj": "GPTJModel"}, ("last_hidden_state",), False,
             summary="hidden states of the last layer"),
        Task("text-classification", {"gpt2": "GPT2ForSequenceClassification",
                                     "gptj": "GPTJForSequenceClassification"}, ("logits",), True,
             summary="one label per text, pooled at its last non-pad token"),
        Task("token-classification", {"gpt2": "GPT2ForTokenClassification"}, ("logits",), True,
             summary="one label per token"),
        Task("question-answering", {"gpt2": "GPT2ForQuestionAnswering", "gptj": "GPTJForQuestionAnswering"},
             ("start_logits", "end_logits"), False, summary="answer span start and end logits"),
        Task("multiple-choice", {"gpt2": "GPT2DoubleHeadsModel"}, ("logits", "mc_logits"), False,
             extra_inputs=("mc_token_ids",), summary="LM logits and one score per choice (double heads)"),
    ]
}
# What else a checkpoint saved as one task's class can serve with none of its weights made up.
ALSO_SERVES = {"multiple-choice": (TEXT_GENERATION,)}


def task_of_class(class_name: str) -> str | None:
    """The task whose class `class_name` is (any architecture), or None."""
    return next((t.name for t in TASKS.values() if class_name in t.classes.values()), None)


def servable(checkpoint_task: str) -> list[str]:
    """The tasks a checkpoint saved as `checkpoint_task`'s class can be exported as, its own first."""
    out = [checkpoint_task, *ALSO_SERVES.get(checkpoint_task, ())]
    return out + (["feature-extraction"] if "feature-extraction" not in out else [])


def select_task(config, architecture: str, requested: str | None, random_weights: bool,
                model: str = "the checkpoint") -> str:
    """The task to export: `requested`, or the one the checkpoint's `architectures` names (text-generation when
    it names none, as for presets).

    Args:
        config: the transformers config (its `architectures` is read).
        architecture: "gpt2" or "gptj".
        requested: --task, or None.
        random_weights: every task the architecture has a class for can be built (nothing is loaded).
    Raises:
        ExportError: an unknown task, a task the architecture has no transformers class for, a checkpoint class
            this exporter does not know, or a task the checkpoint's weights cannot serve (its head would be made
            up at random, or dropped).
    """
    if requested is not None and requested not in TASKS:
        raise ExportError(f"unknown task {requested!r}; choose one of: {', '.join(TASKS)}")
    saved = [c for c in (getattr(config, "architectures", None) or []) if c]
    detected = None
    if saved and not random_weights:
        detected = task_of_class(saved[0])
        if detected is None:
            known = ", ".join(sorted({c for t in TASKS.values() for c in t.classes.values()}))
            raise ExportError(f"{model} was saved as {saved[0]!r}, a class gptexport does not export; known "
                              f"classes: {known}")
    task = requested or detected or TEXT_GENERATION
    if architecture not in TASKS[task].classes:
        have = [t for t, spec in TASKS.items() if architecture in spec.classes]
        raise ExportError(f"task {task!r}: transformers has no {architecture} class for it; {architecture} "
                          f"serves: {', '.join(have)}")
    if detected is not None and task not in servable(detected):
        raise ExportError(f"{model} is a {saved[0]} ({detected}): it has no {task} head (it would be made up at "
                          f"random or taken from another head); pass --task with one of: "
                          f"{', '.join(servable(detected))}")
    return task


def model_class(task: str, architecture: str) -> str:
    """The transformers class exported for `task` on `architecture` (select_task has checked it exists)."""
    return TASKS[task].classes[architecture]


def id2label(config, task: str) -> dict | None:
    """The manifest's labels ({"0": "NEGATIVE", ...}) for a task whose head predicts labels, else None."""
    if not TASKS[task].labels:
        return None
    mapping = getattr(config, "id2label", None) or {}
    return {str(i): str(mapping.get(i, mapping.get(str(i), f"LABEL_{i}"))) for i in range(config.num_labels)}
