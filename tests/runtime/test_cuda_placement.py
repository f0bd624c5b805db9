"""Issue 17 item 5: provider "cuda" never falls back to the CPU node by node without a word.

No GPU here: the wiring is tested with onnxruntime's InferenceSession replaced by a fake that records the options
it was given and answers as onnxruntime-gpu does (its refusal text under session.disable_cpu_ep_fallback)."""

import json
import warnings

import onnxruntime as ort
import pytest

from gptexport import runtime
from gptexport.runtime import session as rs
from gptexport.runtime.errors import ArtifactError, ProviderError

# onnxruntime's own words when session.disable_cpu_ep_fallback refuses a graph (inference_session.cc)
ORT_REFUSAL = ("[ONNXRuntimeError] : 1 : FAIL : This session contains graph nodes that are assigned to the default "
               "CPU EP, but fallback to CPU EP has been explicitly disabled by the user.")


@pytest.mark.parametrize("dtype, kv_layout, kv_dtype, refused", [
    ("float32", "concat", "float32", None),
    ("float16", "concat", "float16", None),
    ("int4", "concat", "float32", None),  # MatMulNBits has float and float16 CUDA kernels
    ("float16", "shared_buffer", "float16", None),
    ("float32", "shared_buffer", "float32", "GroupQueryAttention"),
    ("int4", "shared_buffer", "float32", "GroupQueryAttention"),
    ("int8", "concat", "float32", "DynamicQuantizeMatMul"),
])
def test_which_artifacts_run_on_cuda(dtype, kv_layout, kv_dtype, refused):
    manifest = {"dtype": dtype, "kv_dtype": kv_dtype, **({"kv_layout": kv_layout} if kv_layout != "concat" else {})}
    if refused is None:
        rs.check_cuda_placement(manifest, "a")
        return
    with pytest.raises(ProviderError, match=rf"provider 'cuda' refused for a \(dtype {dtype}, kv layout "
                                            rf"{kv_layout}\): .*{refused}.*--provider cpu"):
        rs.check_cuda_placement(manifest, "a")


def test_load_refuses_an_int8_artifact_on_cuda_before_any_session(artifact, monkeypatch):
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["dtype"] = "int8"
    monkeypatch.setattr(runtime.model, "create_session", lambda *a, **k: pytest.fail("a session was created"))
    with pytest.raises(ProviderError, match="DynamicQuantizeMatMul"):
        runtime.load(artifact, provider="cuda", manifest=manifest)


class FakeCudaOrt:
    """InferenceSession as onnxruntime-gpu answers it; `strict` says what the strict attempt does."""

    def __init__(self, strict):
        self.strict, self.calls = strict, []

    def __call__(self, source, sess_options=None, providers=None, **kwargs):
        try:
            entry = sess_options.get_session_config_entry(rs.DISABLE_CPU_FALLBACK)
        except RuntimeError:  # onnxruntime: "SessionOptions does not have configuration with key: ..."
            entry = None
        self.calls.append({"providers": list(providers), "disable_cpu_fallback": entry,
                           "enable_fallback": kwargs.get("enable_fallback")})
        if entry == "1" and self.strict != "ok":
            raise RuntimeError(self.strict)
        session = type("Session", (), {})()
        session.get_providers = lambda: list(providers)
        return session


@pytest.fixture
def cuda_available(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])

    def install(strict):
        fake = FakeCudaOrt(strict)
        monkeypatch.setattr(ort, "InferenceSession", fake)
        return fake

    return install


def test_cuda_session_asks_onnxruntime_to_refuse_cpu_fallback(cuda_available, tmp_path):
    fake = cuda_available("ok")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rs.create_session(tmp_path / "model.onnx", "cuda")
    assert fake.calls == [{"providers": ["CUDAExecutionProvider"], "disable_cpu_fallback": "1",
                           "enable_fallback": 0}]  # no CPU provider listed: onnxruntime rejects it with the option


def test_cpu_placed_nodes_are_a_loud_warning_not_silent(cuda_available, tmp_path):
    fake = cuda_available(ORT_REFUSAL)
    with pytest.warns(rs.CPUFallbackWarning, match=r"provider 'cuda': onnxruntime placed some nodes of .*model.onnx "
                                                   r"on the CPU"):
        session = rs.create_session(tmp_path / "model.onnx", "cuda")
    assert session.get_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert [c["disable_cpu_fallback"] for c in fake.calls] == ["1", None]
    assert all(c["enable_fallback"] == 0 for c in fake.calls)  # Python's silent CPU retry stays off


def test_other_cuda_failures_are_one_line_not_retried(cuda_available, tmp_path):
    fake = cuda_available("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 100: no CUDA-capable device is detected\n"
                          "more detail")
    with pytest.raises(ArtifactError, match=r"onnxruntime could not load .*model.onnx: .*no CUDA-capable device "
                                            r"is detected$"):
        rs.create_session(tmp_path / "model.onnx", "cuda")
    assert len(fake.calls) == 1


def test_cpu_sessions_are_unchanged(artifact):
    assert runtime.load(artifact).decoder.session.get_providers() == ["CPUExecutionProvider"]
