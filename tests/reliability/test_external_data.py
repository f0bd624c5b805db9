"""External data can never make the runtime read outside the artifact directory.

Each hostile artifact has a consistent manifest (its checksums pass), so the refusal comes from the external-data
check in runtime.onnx_refs, and it comes before ONNX Runtime opens anything (create_session is never called).
"""

import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import _get_all_tensors, uses_external_data

import fake_artifact as fa
from gptexport import runtime
import gptexport.runtime.model
from gptexport.runtime.errors import ArtifactError
from gptexport.runtime.manifest import write_manifest
from gptexport.runtime.onnx_refs import check_external_data, external_data_locations, scan_locations


def _externalize(tensor: TensorProto, location: str, data: bytes) -> None:
    """Point `tensor` at `location` (offset 0, len(data)) instead of holding its bytes."""
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _hostile_artifact(directory, location: str, data_path=None):
    """A fake artifact whose logits table lives at `location`; the table bytes are written to `data_path`."""
    directory.mkdir(parents=True, exist_ok=True)
    model = fa.make_graph(fa.make_table(fa.chain("a", fa.CONTINUATION)))
    table = next(t for t in model.graph.initializer if t.name == "table")
    data = table.raw_data
    _externalize(table, location, data)
    if data_path is not None:
        data_path.write_bytes(data)
    onnx.save(model, str(directory / "model.onnx"))
    fa.make_tokenizer().save(str(directory / "tokenizer.json"))
    write_manifest(directory, fa.manifest_body())  # lists every regular file: the checksums pass
    return directory


@pytest.fixture
def no_session(monkeypatch):
    """Fail the test if onnxruntime is asked to open the model."""
    calls = []
    monkeypatch.setattr(runtime.model, "create_session", lambda *a, **k: calls.append(a) or 1 / 0)
    return calls


def test_external_data_inside_the_directory_loads(tmp_path):
    directory = tmp_path / "ok"
    _hostile_artifact(directory, "model.onnx.data", directory / "model.onnx.data")
    write_manifest(directory, fa.manifest_body())  # now model.onnx.data is listed too
    model = runtime.load(directory, verify="full")
    assert model.generate("xa", max_new_tokens=20) == fa.CONTINUATION


def test_dot_relative_location_inside_is_accepted(tmp_path):
    directory = tmp_path / "ok"
    _hostile_artifact(directory, "./model.onnx.data", directory / "model.onnx.data")
    write_manifest(directory, fa.manifest_body())
    assert check_external_data(directory, "model.onnx", {"model.onnx.data": {}}) == ["model.onnx.data"]


def test_parent_relative_location_refused(tmp_path, no_session):
    directory = _hostile_artifact(tmp_path / "art", "../secret.bin", tmp_path / "secret.bin")
    with pytest.raises(ArtifactError, match=r"external data '../secret.bin' outside the artifact directory"):
        runtime.load(directory, verify="full")
    assert no_session == []


def test_absolute_location_refused(tmp_path, no_session):
    directory = _hostile_artifact(tmp_path / "art", "/etc/passwd")
    with pytest.raises(ArtifactError, match=r"external data '/etc/passwd' outside the artifact directory"):
        runtime.load(directory, verify="full")
    assert no_session == []


def test_symlink_inside_pointing_out_refused(tmp_path, no_session):
    secret = tmp_path / "secret.bin"
    directory = _hostile_artifact(tmp_path / "art", "weights.bin", secret)
    (directory / "weights.bin").symlink_to(secret)  # checksum_files skips symlinks: the manifest stays valid
    runtime.manifest.read_manifest(directory, verify="full")
    with pytest.raises(ArtifactError, match=r"external data 'weights.bin', which is a symlink"):
        runtime.load(directory, verify="full")
    assert no_session == []


def test_symlinked_subdirectory_refused(tmp_path, no_session):
    outside = tmp_path / "outside"
    outside.mkdir()
    directory = _hostile_artifact(tmp_path / "art", "sub/w.bin", outside / "w.bin")
    (directory / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ArtifactError, match="symlink"):
        runtime.load(directory, verify="full")
    assert no_session == []


def test_unlisted_file_inside_refused(tmp_path, no_session):
    directory = _hostile_artifact(tmp_path / "art", "extra.bin")  # written after the manifest: not listed
    (directory / "extra.bin").write_bytes(b"\0" * 64)
    with pytest.raises(ArtifactError, match="which the manifest does not list"):
        runtime.load(directory, verify="full")
    assert no_session == []


@pytest.mark.parametrize("location", ["a/../../x", "..", "C:\\x", "c:x", "a\\..\\..\\x", "", "x\x00y", "//etc/x"])
def test_odd_locations_refused(tmp_path, location, no_session):
    directory = _hostile_artifact(tmp_path / "art", location)
    with pytest.raises(ArtifactError, match="outside the artifact directory"):
        runtime.load(directory, verify="full")


def _nested_model(location: str) -> onnx.ModelProto:
    """A location hidden in a sparse initializer and in a Constant inside an If's else-branch."""
    value = numpy_helper.from_array(np.ones(4, np.float32), "c")
    _externalize(value, location, b"\0" * 16)
    inner = helper.make_graph([helper.make_node("Constant", [], ["y"], value=value)], "inner", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    sparse_values = numpy_helper.from_array(np.ones(1, np.float32), "s")
    _externalize(sparse_values, location + ".sparse", b"\0" * 4)
    sparse = helper.make_sparse_tensor(sparse_values, numpy_helper.from_array(np.array([0], np.int64), "i"), [4])
    node = helper.make_node("If", ["cond"], ["out"], then_branch=inner, else_branch=inner)
    graph = helper.make_graph([node], "outer", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4])],
                              sparse_initializer=[sparse])
    return helper.make_model(graph)


def test_scanner_finds_nested_and_sparse_locations(tmp_path):
    onnx.save(_nested_model("../deep.bin"), str(tmp_path / "m.onnx"))
    assert sorted(external_data_locations(tmp_path / "m.onnx")) == ["../deep.bin", "../deep.bin",
                                                                    "../deep.bin.sparse"]


def _varint(n: int) -> bytes:
    out = b""
    while n >= 0x80:
        out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
    return out + bytes([n])


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def test_deeply_nested_graph_does_not_overflow_the_stack():
    entry = _field(1, b"location") + _field(2, b"../deep.bin")
    graph = _field(5, _field(13, entry))  # GraphProto.initializer with external data
    for _ in range(5000):  # graph -> node -> attribute -> g -> graph ...: far past Python's recursion limit
        graph = _field(1, _field(5, _field(6, graph)))
    assert scan_locations(_field(7, graph)) == [b"../deep.bin"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(min_size=1, max_size=20), min_size=0, max_size=5))
def test_scanner_agrees_with_onnx(tmp_path, locations):
    model = fa.make_graph(fa.make_table())
    for tensor, location in zip(model.graph.initializer, locations):
        _externalize(tensor, location, b"")
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    loaded = onnx.load(str(path), load_external_data=False)
    expected = [e.value for t in _get_all_tensors(loaded) if uses_external_data(t) for e in t.external_data
                if e.key == "location"]
    assert sorted(external_data_locations(path)) == sorted(expected)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_scanner_on_garbage_raises_only_artifact_error(tmp_path, data):
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    try:
        assert isinstance(external_data_locations(path), list)
    except ArtifactError as e:
        assert "\n" not in str(e)


def test_truncated_model_is_one_clear_error(tmp_path, fake_built):
    data = (fake_built / "model.onnx").read_bytes()
    (tmp_path / "m.onnx").write_bytes(data[:len(data) // 2])
    with pytest.raises(ArtifactError, match="not a valid ONNX protobuf"):
        external_data_locations(tmp_path / "m.onnx")


def test_empty_and_unreadable_model(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"")
    assert external_data_locations(tmp_path / "m.onnx") == []
    with pytest.raises(ArtifactError, match="cannot read"):
        external_data_locations(tmp_path / "missing.onnx")
    assert os.path.exists(tmp_path / "m.onnx")
