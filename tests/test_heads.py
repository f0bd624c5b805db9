"""The tasks beyond text generation (issue 14): task selection and refusals, parity of every head against
transformers' own class for GPT-2 and GPT-J (single input and a left-padded batch), question answering by the
pipeline rule on transformers' logits, precisions, bad input.

Each (architecture, task) is exported once per session from a tiny checkpoint saved with the head's class.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from heads_models import save_checkpoint
from tiny_models import PAD

# Named tolerances of the float32 graph against transformers (measured ~1e-7 on these tiny models).
FP32_ATOL = 1e-4  # hidden states, logits
FP32_PROB_ATOL = 1e-5  # class / span probabilities

TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog because", "Hi"]


def _tokenizer(artifact):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(artifact / "tokenizer.json"))


def _left_padded(rows, pad=PAD):
    """Torch ids, mask and position ids (cumsum - 1, as the graph computes) of left-padded rows."""
    import torch

    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def _hf(model, rows, **extra):
    """transformers' own forward: a single row plainly (its default positions), several left-padded with position
    ids from the mask."""
    import torch

    ids, mask, positions = _left_padded(rows, model.config.pad_token_id or PAD)
    kwargs = {} if len(rows) == 1 else {"position_ids": positions}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs, **extra), mask.numpy()


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---- task selection ------------------------------------------------------------------------------------------------

def _main(args, capsys):
    from gptexport.exporter.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("gptexport: error:")]
    assert exit_.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("task-checkpoints")
    out = {}
    for name, (arch, cls) in {"cls": ("gpt2", "GPT2ForSequenceClassification"), "lm": ("gpt2", "GPT2LMHeadModel"),
                              "gptj-cls": ("gptj", "GPTJForSequenceClassification")}.items():
        (root / name).mkdir()
        save_checkpoint(root / name, arch, cls)
        out[name] = root / name
    bare = root / "cls-no-architectures"  # the measured bug: a classifier exported as text generation
    shutil.copytree(out["cls"], bare)
    config = json.loads((bare / "config.json").read_text())
    config.pop("architectures")
    (bare / "config.json").write_text(json.dumps(config))
    out["bare"] = bare
    return out


def test_a_classifier_is_never_exported_as_text_generation(checkpoints, tmp_path, capsys):
    line = _main([str(checkpoints["cls"]), "-o", str(tmp_path / "o"), "--task", "text-generation"], capsys)
    assert "GPT2ForSequenceClassification" in line and "text-classification, feature-extraction" in line
    line = _main([str(checkpoints["bare"]), "-o", str(tmp_path / "o")], capsys)
    assert "score.weight" in line and "--task" in line
    assert not (tmp_path / "o").exists()


def test_a_task_the_checkpoint_has_no_head_for_is_refused(checkpoints, tmp_path, capsys):
    line = _main([str(checkpoints["lm"]), "-o", str(tmp_path / "o"), "--task", "question-answering"], capsys)
    assert "no question-answering head" in line and "text-generation, feature-extraction" in line
    line = _main([str(checkpoints["gptj-cls"]), "-o", str(tmp_path / "o"), "--task", "token-classification"],
                 capsys)
    assert "no gptj class" in line and "question-answering" in line
    line = _main([str(checkpoints["cls"]), "-o", str(tmp_path / "o"), "--num-labels", "5"], capsys)
    assert "3 labels" in line
    line = _main(["gpt2", "-o", str(tmp_path / "o"), "--task", "sentiment"], capsys)
    assert "'sentiment'" in line and "text-classification" in line


def test_task_selection_from_architectures(checkpoints):
    import transformers

    from gptexport.exporter.tasks import select_task

    config = transformers.AutoConfig.from_pretrained(str(checkpoints["cls"]))
    assert select_task(config, "gpt2", None, False) == "text-classification"
    assert select_task(config, "gpt2", "feature-extraction", False) == "feature-extraction"
    assert select_task(config, "gpt2", "question-answering", True) == "question-answering"  # random weights
    assert select_task(transformers.GPT2Config(), "gpt2", None, False) == "text-generation"  # a preset: no class


# ---- parity against transformers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "gptj"])
def test_embed_matches_transformers(head_export, arch):
    from gptexport import runtime

    artifact, model, manifest = head_export(arch, "feature-extraction")
    assert manifest["task"] == "feature-extraction" and manifest["labels"] is None
    assert manifest["passes"]["shortfalls"] == [] and manifest["validation"]["passed"]
    tok = _tokenizer(artifact)
    rows = [tok.encode(t).ids for t in TEXTS]
    single = runtime.embed(artifact, TEXTS[1])
    hidden = _hf(model, rows[1:2])[0].last_hidden_state.numpy()
    np.testing.assert_allclose(single[0], hidden[0, -1], atol=FP32_ATOL, rtol=0)
    batch_last, batch_mean = runtime.embed(artifact, TEXTS), runtime.embed(artifact, TEXTS, pooling="mean")
    out, mask = _hf(model, rows)
    hidden = out.last_hidden_state.numpy()
    assert batch_last.shape == (3, 64) and batch_last.dtype == np.float32
    np.testing.assert_allclose(batch_last, hidden[:, -1], atol=FP32_ATOL, rtol=0)
    mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(batch_mean, mean, atol=FP32_ATOL, rtol=0)
    np.testing.assert_allclose(batch_last[1], single[0], atol=FP32_ATOL, rtol=0)  # a padded row = the row alone


@pytest.mark.parametrize("arch", ["gpt2", "gptj"])
def test_classify_matches_transformers(head_export, arch):
    from gptexport import runtime

    artifact, model, manifest = head_export(arch, "text-classification")
    assert manifest["labels"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    assert manifest["pad_token_id"] == (PAD if arch == "gpt2" else None)
    tok = _tokenizer(artifact)
    texts = TEXTS + (["Ends with its pad id<|endoftext|>"] if arch == "gpt2" else [])  # pad = eos: pooled before it
    rows = [tok.encode(t).ids for t in texts]
    got = runtime.classify(artifact, texts)
    if arch == "gpt2":  # transformers pools the padded batch itself (pad id set)
        logits = _hf(model, rows)[0].logits.numpy()
    else:  # no pad id: transformers refuses a batch; each row alone
        logits = np.concatenate([_hf(model, [r])[0].logits.numpy() for r in rows])
    probs = _softmax(logits)
    for g, p in zip(got, probs):
        assert g["label"] == f"LABEL_{p.argmax()}"
        np.testing.assert_allclose([g["scores"][f"LABEL_{i}"] for i in range(3)], p, atol=FP32_PROB_ATOL, rtol=0)
        assert g["score"] == max(g["scores"].values())
    alone = runtime.classify(artifact, texts[0])
    assert alone["label"] == got[0]["label"] and abs(alone["score"] - got[0]["score"]) < FP32_PROB_ATOL


def test_tag_matches_transformers(head_export):
    from gptexport import runtime

    artifact, model, _ = head_export("gpt2", "token-classification")
    text = "The quick brown fox jumps over the lazy dog"
    tags = runtime.tag(artifact, text)
    ids = _tokenizer(artifact).encode(text).ids
    probs = _softmax(_hf(model, [ids])[0].logits.numpy()[0])
    assert [t["label"] for t in tags] == [f"LABEL_{i}" for i in probs.argmax(-1)]
    np.testing.assert_allclose([t["score"] for t in tags], probs.max(-1), atol=FP32_PROB_ATOL, rtol=0)
    assert all(text[t["start"]:t["end"]] == t["token"] for t in tags)
    assert "".join(t["token"] for t in tags) == text.replace(" ", "")


def _pipeline_answer(model, tok, question, context, max_answer_len, max_seq_len, doc_stride):
    """transformers 4.x question-answering pipeline's rule on transformers' own logits, written out here: windows
    of context tokens overlapping by doc_stride, softmax over each window's context tokens (others at -10000, as
    the pipeline masks them), best p_start x p_end over e >= s, e - s < max_answer_len, best over windows."""
    q = tok.encode(question).ids
    enc = tok.encode(context)
    room = max_seq_len - len(q)
    starts = [0]
    while starts[-1] + room < len(enc.ids):
        starts.append(starts[-1] + room - doc_stride)
    best = None
    for a in starts:
        chunk = enc.ids[a:a + room]
        out = _hf(model, [q + chunk])[0]
        undesired = np.arange(len(q) + len(chunk)) < len(q)
        start = _softmax(np.where(undesired, -10000.0, out.start_logits.numpy()[0]))
        end = _softmax(np.where(undesired, -10000.0, out.end_logits.numpy()[0]))
        candidates = np.tril(np.triu(np.outer(start, end)), max_answer_len - 1)
        s, e = np.unravel_index(candidates.argmax(), candidates.shape)
        if best is None or candidates[s, e] > best[2]:
            best = (a + s - len(q), a + e - len(q), candidates[s, e])
    s, e, score = best
    begin = enc.offsets[s][0]
    while context[begin].isspace():
        begin += 1
    return context[begin:enc.offsets[e][1]], begin, score


@pytest.mark.parametrize("arch", ["gpt2", "gptj"])
def test_answer_follows_the_pipeline_rule_on_transformers_logits(head_export, arch):
    from gptexport import runtime

    artifact, model, _ = head_export(arch, "question-answering")
    tok = _tokenizer(artifact)
    context = ("The Eiffel tower is in Paris, the capital of France. It was built in 1889 by Gustave Eiffel's "
               "company for the world fair. The tower is 330 metres tall and was the tallest structure in the world "
               "until 1930. Millions of people visit it every year, and at night it sparkles for five minutes every "
               "hour.")
    questions = ["Where is the tower?", "When was it built?", "How tall is the tower?", "Who built it?"]
    assert len(tok.encode(context).ids) > 40  # longer than the window below: several windows
    for question in questions:
        for window, stride, longest in ((128, 32, 15), (40, 8, 5)):
            got = runtime.answer(artifact, question, context, max_answer_len=longest, doc_stride=stride,
                                 max_seq_len=window)
            text, start, score = _pipeline_answer(model, tok, question, context, longest, window, stride)
            assert (got["answer"], got["start"]) == (text, start), (question, window)
            assert got["end"] == start + len(text) and context[got["start"]:got["end"]] == got["answer"]
            assert abs(got["score"] - score) < FP32_PROB_ATOL


def test_choose_matches_the_double_heads_model(head_export):
    import torch

    from gptexport import runtime

    artifact, model, _ = head_export("gpt2", "multiple-choice")
    tok = _tokenizer(artifact)
    prompt, choices = "The capital of France is", [" Paris", " a large city in Europe", " Rome"]
    got = runtime.choose(artifact, prompt, choices)
    p = tok.encode(prompt).ids
    rows = [p + tok.encode(c).ids for c in choices]
    ids, mask, positions = _left_padded(rows)
    with torch.no_grad():  # GPT2Model flattens ids and mask of (B, C, T), not positions: pass them flat
        out = model(input_ids=ids[None], attention_mask=mask[None], position_ids=positions,
                    mc_token_ids=torch.full((1, 3), ids.shape[1] - 1))
    probs = _softmax(out.mc_logits.numpy()[0])
    assert got["index"] == int(probs.argmax()) and got["choice"] == choices[got["index"]]
    np.testing.assert_allclose(got["scores"], probs, atol=FP32_PROB_ATOL, rtol=0)
    alone = _hf(model, rows[:1], mc_token_ids=torch.tensor([len(rows[0]) - 1]))[0]  # one choice, no padding
    session = runtime.load_head(artifact)
    feeds = {"input_ids": np.array([[rows[0]]]), "attention_mask": np.ones((1, 1, len(rows[0])), np.int64),
             "mc_token_ids": np.array([[len(rows[0]) - 1]])}
    lm = session.run(feeds)["logits"][0, 0]
    np.testing.assert_allclose(lm, alone.logits.numpy()[0], atol=FP32_ATOL, rtol=0)


# ---- precisions ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "int8", "int4"])
def test_precisions_apply_to_heads(head_export, dtype):
    from gptexport import runtime
    from gptexport.exporter.heads_validate import HEAD_LIMITS

    task = "feature-extraction" if dtype == "float16" else "text-classification"
    artifact, model, manifest = head_export("gpt2", task, dtype)
    v = manifest["validation"]
    assert manifest["dtype"] == dtype and v["passed"] and v["limits"] == HEAD_LIMITS[dtype], v["failed_checks"]
    counts = manifest["passes"]["counts"]
    assert manifest["passes"]["shortfalls"] == [] and counts["attention"] == 2
    if dtype != "float16":
        assert counts[f"{dtype}_matmuls"] >= 8
        rows = [_tokenizer(artifact).encode(t).ids for t in TEXTS]
        probs = _softmax(_hf(model, rows)[0].logits.numpy())
        got = runtime.classify(artifact, TEXTS)
        assert [g["label"] for g in got] == [f"LABEL_{i}" for i in probs.argmax(-1)]
    else:
        assert counts["fp16_initializers"] > 0
        hidden = _hf(model, [_tokenizer(artifact).encode(TEXTS[1]).ids])[0].last_hidden_state.numpy()[0, -1]
        got = runtime.embed(artifact, TEXTS[1])[0]
        assert np.abs(got - hidden).max() / hidden.std() < HEAD_LIMITS[dtype]["max_abs_diff_over_std"]


@pytest.mark.parametrize("kernel,invariant", [(None, True), ("nbits", True), ("dynamic", False)])
def test_int8_kernels_on_heads_batched_against_alone(head_export, kernel, invariant):
    """The head tasks' default int8 kernel is the token kernel (activations per token); it gives each text the same
    scores batched or alone, bit for bit, as nbits does; the per-tensor dynamic kernel does not (the negative
    case)."""
    from gptexport import runtime

    artifact, model, manifest = head_export("gpt2", "text-classification", "int8", kernel)
    assert manifest["validation"]["passed"], manifest["validation"]["failed_checks"]
    record = manifest["passes"]["quantization"]
    if kernel is None:  # not given: the head tasks' default
        assert record["kernel"] == "MatMulIntegerToFloat" and record["batch_invariant"] is True
    assert "rescore" not in manifest["passes"]  # a head has no lm_head to rescore
    rows = [_tokenizer(artifact).encode(t).ids for t in TEXTS]
    probs = _softmax(_hf(model, rows)[0].logits.numpy())
    together = runtime.classify(artifact, TEXTS)
    assert [g["label"] for g in together] == [f"LABEL_{i}" for i in probs.argmax(-1)]
    alone = [runtime.classify(artifact, [text])[0] for text in TEXTS]
    same = [a["scores"] == t["scores"] for a, t in zip(alone, together)]
    assert all(same) if invariant else not all(same), (kernel, same)


# ---- wrong artifact, bad input -----------------------------------------------------------------------------------

def test_generation_and_heads_refuse_each_other(head_export, tmp_path):
    from gptexport import runtime

    artifact, _, _ = head_export("gpt2", "text-classification")
    with pytest.raises(runtime.ArtifactError, match="text-classification artifact.*runtime.classify"):
        runtime.load(artifact)
    with pytest.raises(runtime.ArtifactError, match="runtime.classify"):
        runtime.embed(artifact, "Hello")
    generation = tmp_path / "as-text-generation"  # the same files, its manifest saying text-generation
    shutil.copytree(artifact, generation)
    manifest = json.loads((generation / "manifest.json").read_text())
    manifest["task"] = "text-generation"
    (generation / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(runtime.ArtifactError, match="text-generation artifact.*generate"):
        runtime.classify(generation, "Hello")
    del manifest["task"]  # a manifest from before tasks: text-generation
    (generation / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(runtime.ArtifactError, match="text-generation artifact"):
        runtime.load_head(generation)


def test_bad_input_is_one_clear_error(head_export):
    from gptexport import runtime

    classifier = head_export("gpt2", "text-classification")[0]
    qa = head_export("gpt2", "question-answering")[0]
    double = head_export("gpt2", "multiple-choice")[0]
    cases = [
        (lambda: runtime.classify(classifier, ""), "text is empty"),
        (lambda: runtime.classify(classifier, ["ok", ""]), "text 1 of the list is empty"),
        (lambda: runtime.classify(classifier, []), "empty list"),
        (lambda: runtime.classify(classifier, "word " * 200), "tokens; the model takes at most 128"),
        (lambda: runtime.answer(qa, "Who?", ""), "question without context"),
        (lambda: runtime.answer(qa, "Who?", None), "question without context"),
        (lambda: runtime.answer(qa, "", "Some context"), "question is empty"),
        (lambda: runtime.answer(qa, "Who? " * 130, "Some context"), "no room for context"),
        (lambda: runtime.answer(qa, "Who?", "word " * 300, doc_stride=400), "doc_stride 400"),
        (lambda: runtime.choose(double, "Pick one", []), "choices is empty"),
        (lambda: runtime.choose(double, "Pick one", ["a", ""]), "choice 1 is empty"),
    ]
    for call, fragment in cases:
        with pytest.raises(runtime.InputError) as err:
            call()
        assert fragment in str(err.value) and "\n" not in str(err.value)


def _gptrun(args, capsys):
    from gptexport.runtime.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_gptrun_task_commands_print_json(head_export, capsys):
    from gptexport import runtime

    classifier = head_export("gpt2", "text-classification")[0]
    code, out, _ = _gptrun(["classify", classifier, *TEXTS[:2]], capsys)
    assert code == 0 and [r["label"] for r in json.loads(out)] == [r["label"] for r in runtime.classify(classifier,
                                                                                                          TEXTS[:2])]
    embedder = head_export("gpt2", "feature-extraction")[0]
    code, out, _ = _gptrun(["embed", embedder, TEXTS[0], "--pooling", "mean"], capsys)
    data = json.loads(out)
    assert code == 0 and data["dimensions"] == 64
    np.testing.assert_allclose(data["embeddings"], runtime.embed(embedder, [TEXTS[0]], "mean"), atol=1e-6)
    code, out, _ = _gptrun(["tag", head_export("gpt2", "token-classification")[0], "Hello world"], capsys)
    assert code == 0 and [t["token"] for t in json.loads(out)] == ["Hello", "world"]
    qa = head_export("gpt2", "question-answering")[0]
    code, out, _ = _gptrun(["answer", qa, "Where?", "In Paris, France."], capsys)
    assert code == 0 and json.loads(out) == runtime.answer(qa, "Where?", "In Paris, France.")
    code, out, _ = _gptrun(["choose", head_export("gpt2", "multiple-choice")[0], "Pick", " a", " b"], capsys)
    assert code == 0 and json.loads(out)["choice"] in (" a", " b")
    for args, fragment in ((["answer", qa, "Where?"], "question without context"),
                           (["classify", classifier, ""], "text 0 of the list is empty"),
                           (["embed", classifier, "hi"], "runtime.classify"),
                           (["generate", classifier, "hi"], "text-classification artifact")):
        code, out, err = _gptrun(args, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, err
