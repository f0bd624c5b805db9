"""runtime.perplexity on the fake artifact, whose logits are a known table: exact values, KL, windows, errors, CLI.

Parity with transformers' own sliding-window loop on real exports is in tests/quality/test_perplexity_parity.py.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import fake_artifact as fa
import numpy as np
import pytest

from gptexport import runtime
from gptexport.runtime.perplexity import EvaluationError, perplexity, windows

TEXT = "the quick brown fox jumps over the lazy dog; " * 4  # 180 byte tokens
ROOT = Path(__file__).resolve().parents[2]


def _log_softmax(x):
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _expected_nll(table, ids, window, stride):
    """The transformers guide's loop, written out on the table: every (context, target) pair it scores."""
    logp = _log_softmax(table)
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg = end - prev_end
        for pos in range(max(begin + 1, end - trg), end):  # the table model sees only the previous token
            total -= logp[ids[pos - 1], ids[pos]]
            count += 1
        prev_end = end
        if end == len(ids):
            break
    return total, count


@pytest.mark.parametrize("n,window,stride", [(10, 6, 3), (10, 4, 4), (180, 64, 32), (180, 64, 1), (3, 6, 3),
                                             (64, 64, 32), (65, 64, 64)])
def test_windows_score_what_the_guide_scores(n, window, stride):
    scored = [t for begin, end, k in windows(n, window, stride) for t in range(end - k, end)]
    assert all(end - begin <= window and end - k > begin for begin, end, k in windows(n, window, stride))
    ids = np.arange(n) % 7
    _, count = _expected_nll(np.zeros((7, 7)), ids, window, stride)
    assert len(scored) == count
    if stride < window:  # every token but the first, exactly once
        assert scored == list(range(1, n))
    else:
        assert len(set(scored)) == len(scored)


@pytest.mark.parametrize("window,stride", [(64, 32), (16, 16), (64, 1), (None, None)])
def test_perplexity_is_the_tables(model, window, stride):
    table = fa.make_table(fa.chain("a", fa.CONTINUATION))
    ids = np.array(fa.byte_ids(TEXT))
    w = window or model.max_positions
    nll, count = _expected_nll(table, ids, w, stride or w // 2)
    result = perplexity(model, TEXT, window=window, stride=stride)
    assert result.tokens == count
    assert math.isclose(result.nll, nll, rel_tol=1e-6)
    assert math.isclose(result.perplexity, math.exp(nll / count), rel_tol=1e-6)
    assert result.kl is None


def test_several_texts_are_scored_apart(model):
    first, second = perplexity(model, TEXT[:90]), perplexity(model, TEXT[90:])
    both = perplexity(model, [TEXT[:90], TEXT[90:]], names=["a", "b"])
    assert both.tokens == first.tokens + second.tokens
    assert math.isclose(both.nll, first.nll + second.nll, rel_tol=1e-9)
    assert [t.name for t in both.texts] == ["a", "b"]


def test_kl_against_itself_is_zero(model):
    result = perplexity(model, TEXT, window=32, reference=model)
    assert result.kl["mean"] == 0.0 and result.kl["max"] == 0.0
    assert result.kl["top1_agreement"] == 1.0 and result.kl["perplexity_ratio"] == 1.0


def test_kl_against_another_model_is_the_tables(model, tmp_path):
    fa.build(tmp_path / "other", next_map=fa.chain("a", fa.CONTINUATION), noise=1.5)
    other = runtime.load(tmp_path / "other")
    ref_table = fa.make_table(fa.chain("a", fa.CONTINUATION))
    table = fa.make_table(fa.chain("a", fa.CONTINUATION), noise=1.5)
    ids = np.array(fa.byte_ids(TEXT))
    result = perplexity(other, TEXT, window=32, stride=16, reference=model)
    p, q = _log_softmax(ref_table)[ids[:-1]], _log_softmax(table)[ids[:-1]]
    kl = (np.exp(p) * (p - q)).sum(-1)
    assert math.isclose(result.kl["mean"], kl.mean(), rel_tol=1e-6)
    assert math.isclose(result.kl["p99"], np.percentile(kl, 99), rel_tol=1e-6)
    assert result.kl["top1_agreement"] == np.mean(p.argmax(-1) == q.argmax(-1))
    ref = perplexity(model, TEXT, window=32, stride=16)
    assert math.isclose(result.kl["perplexity_ratio"], result.perplexity / ref.perplexity, rel_tol=1e-9)


@pytest.mark.parametrize("kwargs,message", [
    (dict(window=1), "window must be an integer from 2 to the model's 64 positions, got 1"),
    (dict(window=65), "got 65"),
    (dict(window=32, stride=0), "stride must be an integer from 1 to the window (32), got 0"),
    (dict(window=32, stride=33), "got 33"),
    (dict(window=2.5), "got 2.5"),
])
def test_bad_window_or_stride(model, kwargs, message):
    with pytest.raises(EvaluationError) as err:
        perplexity(model, TEXT, **kwargs)
    assert message in str(err.value)


def test_nothing_to_score(model):
    with pytest.raises(EvaluationError, match="no token to score"):
        perplexity(model, ["a", ""])
    with pytest.raises(EvaluationError, match="texts must be"):
        perplexity(model, [])


def test_reference_of_another_vocabulary_is_refused(model, tmp_path):
    fa.build(tmp_path / "other")
    manifest = json.loads((tmp_path / "other" / "manifest.json").read_text())
    manifest["config"]["vocab_size"] = 300
    reference = runtime.load(tmp_path / "other", manifest=manifest)
    with pytest.raises(EvaluationError, match="the reference's vocabulary has 300 tokens, the model's 257"):
        perplexity(model, TEXT, reference=reference)


def _gptrun(*args):
    return subprocess.run([sys.executable, "-m", "gptexport.runtime.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_cli_json_and_text(artifact, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = _gptrun("perplexity", artifact, text, "--window", 32, "--reference", artifact, "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["window"] == 32 and data["stride"] == 16 and data["tokens"] == len(TEXT) - 1
    assert data["kl"]["mean"] == 0.0 and data["kl"]["top1_agreement"] == 1.0
    out = _gptrun("perplexity", artifact, text, text, "--window", 32)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"perplexity: {data['perplexity']:.4f} ({2 * (len(TEXT) - 1)} tokens scored")


@pytest.mark.parametrize("args,message", [
    (["--window", "1"], "gptrun: error: window must be an integer from 2"),
    (["--stride", "x"], "gptrun: error: Invalid value for '--stride'"),
])
def test_cli_bad_arguments_are_one_line(artifact, tmp_path, args, message):
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = _gptrun("perplexity", artifact, text, *args)
    assert out.returncode == 2 and out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr


def test_cli_unreadable_file(artifact, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9")
    for path, message in ((tmp_path / "missing.txt", "No such file or directory"), (bad, "utf-8")):
        out = _gptrun("perplexity", artifact, path)
        assert out.returncode == 2 and f"cannot read text file {str(path)!r}" in out.stderr, out.stderr
        assert message in out.stderr and out.stderr.count("\n") == 1
