"""Bad input never crashes: every call gives a valid result or one GptexportError line (CLI: exit 2, one line).

Property-based over the Python API (the fake artifact, and a tiny real export for sampling on real logits) and
the `gptrun` command line (in process for many examples, in a subprocess with undecodable argv bytes for a few).
"""

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from gptexport import runtime
from gptexport.runtime.cli import main as gptrun_main
from gptexport.runtime.errors import GptexportError, ProviderError

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

any_char = st.characters(codec=None, categories=None)  # lone surrogates included
bad_numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**20, 10**20),
                        st.text(max_size=3), st.none(), st.booleans())
bad_ints = st.one_of(st.integers(-10**20, 10**20), st.floats(), st.text(max_size=3), st.none(), st.booleans())


def _mostly(valid, invalid):
    """Valid values seven times out of eight, so many calls really generate and some hit each check."""
    return st.integers(0, 7).flatmap(lambda i: invalid if i == 0 else valid)


prompts = _mostly(st.one_of(st.text(max_size=12).filter(str.strip), st.lists(st.text("abc xé", min_size=1,
                                                                                      max_size=6), min_size=1,
                                                                             max_size=3)),
                  st.one_of(st.text(any_char, max_size=12), st.binary(max_size=12), st.none(), st.integers(),
                            st.lists(st.text(any_char, max_size=6), max_size=3)))
stops = _mostly(st.one_of(st.none(), st.text(min_size=1, max_size=4), st.just("é" * 100_000),
                          st.lists(st.text(min_size=1, max_size=4), max_size=3)),
                st.one_of(st.text(any_char, max_size=4), st.integers(), st.binary(max_size=3), st.just(["", "x"])))
settings_ = st.fixed_dictionaries({}, optional={
    "max_new_tokens": _mostly(st.integers(1, 40), bad_ints),
    "min_new_tokens": _mostly(st.integers(0, 3), bad_ints),
    "do_sample": _mostly(st.booleans(), st.text(max_size=2)),
    "temperature": _mostly(st.one_of(st.floats(0, 1e308), st.sampled_from([1e-300, 5e-324, 1e308])), bad_numbers),
    "top_k": _mostly(st.integers(0, 2**70), bad_ints),
    "top_p": _mostly(st.floats(1e-300, 1.0), bad_numbers),
    "repetition_penalty": _mostly(st.floats(1e-300, 1e300), bad_numbers),
    "seed": _mostly(st.one_of(st.none(), st.integers(0, 2**70)), st.one_of(st.integers(-5, -1), st.text(max_size=2),
                                                                          st.floats())),
    "stop": stops})


def _one_line_error(call):
    """Run call(); return its result, or None if it raised a one-line GptexportError (anything else fails)."""
    try:
        result = call()
    except GptexportError as e:
        assert str(e) and "\n" not in str(e), repr(str(e))
        event(f"error: {str(e).split(',')[0][:40]}")
        return None
    event("valid result")
    return result


@settings(max_examples=300, **SETTINGS)
@given(prompt=prompts, kwargs=settings_)
@example(prompt="0", kwargs={"temperature": -2**63 - 1})  # beyond int64: np.isfinite raised TypeError
@example(prompt="a", kwargs={"top_p": 10**400})  # float() overflows
def test_api_generate_bad_input(fake_model, prompt, kwargs):
    result = _one_line_error(lambda: fake_model.generate(prompt, **kwargs))
    if result is not None:
        expected = str if isinstance(prompt, str) else list
        assert isinstance(result, expected)


@settings(max_examples=120, **SETTINGS)
@given(prompt=prompts, kwargs=settings_)
def test_api_stream_bad_input(fake_model, prompt, kwargs):
    pieces = _one_line_error(lambda: list(fake_model.stream(prompt, **kwargs)))
    if pieces is not None:
        assert all(isinstance(p, str) and p for p in pieces)


@settings(max_examples=30, **SETTINGS)
@given(temperature=st.one_of(st.floats(0, 1e308), st.sampled_from([1e-300, 5e-324, 1e-45, 1e-7, 1e308])),
       top_p=st.floats(1e-300, 1.0, exclude_min=False), top_k=st.integers(0, 2**40),
       penalty=st.one_of(st.floats(1e-300, 1e300), st.sampled_from([1e-300, 1e300])), seed=st.integers(0, 2**64))
def test_sampling_extremes_on_real_logits(tiny_export, temperature, top_p, top_k, penalty, seed):
    model = _tiny_model(tiny_export)
    text, tokens = model.generate("Hello there", max_new_tokens=3, do_sample=True, temperature=temperature,
                                  top_p=top_p, top_k=top_k, repetition_penalty=penalty, seed=seed,
                                  return_tokens=True)
    assert isinstance(text, str) and 1 <= len(tokens) <= 3
    assert all(0 <= t < model.manifest["config"]["vocab_size"] for t in tokens)


def test_tiny_temperature_is_greedy_not_noise(tiny_export):
    model = _tiny_model(tiny_export)
    greedy = model.generate("Hello there", max_new_tokens=6, return_tokens=True)[1]
    for temperature in (1e-300, 5e-324):
        got = model.generate("Hello there", max_new_tokens=6, do_sample=True, temperature=temperature, seed=1,
                             return_tokens=True)[1]
        assert got == greedy


_MODELS = {}


def _tiny_model(tiny_export):
    if "gpt2" not in _MODELS:
        _MODELS["gpt2"] = runtime.load(tiny_export("gpt2")[1])
    return _MODELS["gpt2"]


@pytest.mark.parametrize("provider, message", [
    ("cuda" if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers() else "tpu",
     "requested but this onnxruntime has no CUDAExecutionProvider|unknown provider"),
    ("CUDA", "unknown provider 'CUDA'; choose one of: cpu, cuda"),
    (["cpu"], "unknown provider"), (None, "unknown provider"), ("", "unknown provider"),
])
def test_provider_errors(fake_built, provider, message):
    with pytest.raises(ProviderError, match=message):
        runtime.load(fake_built, provider=provider)


def test_cuda_silently_falling_back_to_cpu_is_refused(fake_built, monkeypatch):
    """onnxruntime-gpu on a machine without a usable GPU makes a CPU-only session; we say so at load."""
    import gptexport.runtime.session as session

    monkeypatch.setattr(session, "resolve_providers", lambda p: ["CUDAExecutionProvider", "CPUExecutionProvider"]
                        if p == "cuda" else ["CPUExecutionProvider"])
    real = session.ort.InferenceSession
    monkeypatch.setattr(session.ort, "InferenceSession",
                        # a CPU-only session, made whatever was asked (the strict no-fallback option included)
                        lambda path, sess_options=None, providers=None, **kwargs: real(
                            path, providers=["CPUExecutionProvider"]))
    with pytest.raises(ProviderError, match="could not use CUDAExecutionProvider"):
        runtime.model.load(fake_built, provider="cuda")


@pytest.mark.parametrize("artifact_dir", [None, 5, b"/nonexistent/\xff", "\udcff", ""])
def test_bad_artifact_paths(artifact_dir):
    with pytest.raises(GptexportError):
        runtime.load(artifact_dir)
    with pytest.raises(GptexportError):
        runtime.generate(artifact_dir, "x")


# -- the command line ------------------------------------------------------------------------------------------

argv_text = st.one_of(st.text("abc é", min_size=1, max_size=8),  # and what a shell can pass:
                      st.binary(max_size=10).filter(lambda b: b"\0" not in b).map(os.fsdecode))
flag_values = st.one_of(st.sampled_from(["1", "2", "0.9", "5", "8"]),
                        st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e-300", "1e308", "abc", "", "0.5",
                                         "99999999999999999999", "-99999999999999999999"]), argv_text)
flags = st.lists(st.tuples(st.sampled_from(["--max-new-tokens", "--min-new-tokens", "--temperature", "--top-k",
                                            "--top-p", "--repetition-penalty", "--seed", "--stop", "--provider"]),
                           flag_values), max_size=4)
switches = st.lists(st.sampled_from(["--do-sample", "--stream", "--stats"]), max_size=3, unique=True)


def _run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            gptrun_main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def _assert_clean(code, out, err):
    if code == 0:
        assert "error" not in err
    else:
        assert code == 2, (code, err)
        assert err.startswith("gptrun: error: ") and err.count("\n") == 1, err
        assert "internal error" not in err and "Traceback" not in err, err


@settings(max_examples=150, **SETTINGS)
@given(prompt=argv_text.filter(lambda a: not a.startswith("-")), flags=flags, switches=switches)
def test_cli_bad_input(fake_built, prompt, flags, switches):
    argv = ["generate", str(fake_built), prompt, *[x for pair in flags for x in pair], *switches]
    code, out, err = _run_cli(argv)
    event("exit 0" if code == 0 else "exit 2")
    _assert_clean(code, out, err)


@pytest.mark.parametrize("args", [
    [b"generate", b"{dir}", b"a\xff\xfe"],
    [b"generate", b"{dir}", b"a", b"--stop", b"\xc3"],
    [b"generate", b"{dir}", b"a", b"--top-k", b"\xff"],
    [b"generate", b"{dir}\xff", b"a"],
    [b"info", b"{dir}/\xff"],
    [b"generate", b"{dir}", b"a", b"--seed", b"-1"],
    [b"generate", b"{dir}", b"a", b"--temperature", b"nan", b"--do-sample"],
    [b"generate", b"{dir}", b"a", b"--max-new-tokens", b"-5"],
    [b"generate", b"{dir}", b"a", b"--provider", b"cuda"],
])
def test_cli_subprocess_undecodable_argv(fake_built, args):
    argv = [a.replace(b"{dir}", os.fsencode(fake_built)) for a in args]
    result = subprocess.run([sys.executable, "-c", "from runtime.cli import main; main()", *argv], cwd=ROOT,
                            capture_output=True, timeout=120)
    err = result.stderr.decode("utf-8", "backslashreplace")
    assert result.returncode == 2 and result.stdout == b"", err
    assert err.startswith("gptrun: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "internal error" not in err


def test_cli_huge_stop_string_streams(fake_built):
    code, out, err = _run_cli(["generate", str(fake_built), "xa", "--max-new-tokens", "20", "--stream",
                               "--stop", "é" * 1_000_000])
    assert code == 0 and out.startswith("é你"), err
