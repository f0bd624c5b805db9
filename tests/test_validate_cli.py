"""`gptexport validate DIR`: an artifact exported with --no-validate is validated afterwards, as the export would
have (streamed like the export), and the result recorded in its manifest; a broken artifact or bad input is refused
in one line with exit 2 and the artifact left as it was."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from gptexport.exporter.build import ExportOptions, export
from gptexport.exporter.cli import main
from gptexport.runtime.manifest import checksum_files, manifest_digest


def _validate(capsys, *args):
    with pytest.raises(SystemExit) as err:
        main(["validate", *map(str, args)])
        raise SystemExit(0)
    out = capsys.readouterr()
    return err.value.code, out.out, out.err


def _errors(err):
    """The lines of stderr that are not progress lines (`✓ [1/3] load ...`)."""
    return [line for line in err.strip().splitlines() if not line.startswith("✓")]


def _manifest(directory):
    return json.loads((directory / "manifest.json").read_text())


@pytest.fixture(scope="module")
def streamed_int4(tiny_checkpoint, tmp_path_factory):
    """A streamed random-weight GPT-J int4 shared_buffer artifact exported with --no-validate (the 6B command's
    path at tiny size)."""
    out = tmp_path_factory.mktemp("validate") / "gptj-int4"
    export(ExportOptions(model=str(tiny_checkpoint("gptj-partial-rotary")), output=str(out), random_weights=True,
                         seed=3, stream=True, dtype="int4", kv_layout="shared_buffer", validate=False))
    return out


def test_validate_a_streamed_int4_shared_buffer_artifact(streamed_int4, tmp_path, capsys):
    artifact = tmp_path / "a"
    import shutil

    shutil.copytree(streamed_int4, artifact)
    before = _manifest(artifact)
    assert before["validation"]["skipped"] and before["streamed"] and before["model"]["seed"] == 3
    code, out, err = _validate(capsys, artifact)
    assert code == 0, err
    after = _manifest(artifact)
    v = after["validation"]
    assert v["passed"] and v["validated_by"]["command"] == "gptexport validate"
    assert v["full_artifact"]["passed"] and v["full_artifact"]["tokens"] >= 20  # the artifact itself, streamed
    assert v["structural"]["passed"] and v["reduced_config"]["num_layers"] == 2
    assert {k: after[k] for k in after if k != "validation"} == {k: before[k] for k in before if k != "validation"}
    assert f"manifest sha256: {manifest_digest(artifact)}" in out and "validation (reduced" in out
    assert not [p for p in artifact.parent.iterdir() if p.name.startswith(".")]  # no staging dir left behind
    from gptexport import runtime

    runtime.load(artifact, verify="full")  # the files still match the rewritten manifest


def test_validate_in_memory_artifact_records_the_full_validation(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "gpt2-int8"
    export(ExportOptions(model=str(tiny_checkpoint("gpt2")), output=str(out), dtype="int8", validate=False))
    code, text, err = _validate(capsys, out)
    assert code == 0, err
    v = _manifest(out)["validation"]
    assert v["passed"] and v["method"] == "full: this artifact against its torch model"
    assert v["distribution"]["kl_mean"] < v["limits"]["kl_mean"] and "validation (full" in text


def test_validate_refuses_broken_scales_and_leaves_the_artifact(streamed_int4, tmp_path, capsys):
    """The lm_head's scales x4 with the checksums made to match (a broken quantizer, not a corrupt file): a tiny
    random model's nearly flat distributions hide one hidden MatMul's error, never the head's."""
    import shutil

    artifact = tmp_path / "broken"
    shutil.copytree(streamed_int4, artifact)
    proto = onnx.load(str(artifact / "model.onnx"))
    scale = next(t for t in proto.graph.initializer if t.name.endswith("scales") and "lm_head" in t.name)
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(4.0), scale.name))
    onnx.save(proto, str(artifact / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    manifest = {**_manifest(artifact), "files": checksum_files(artifact)}
    (artifact / "manifest.json").write_text(json.dumps(manifest, indent=2))
    before = (artifact / "manifest.json").read_bytes()
    code, out, err = _validate(capsys, artifact)
    assert code == 2 and out == ""
    assert len(_errors(err)) == 1 and "validation failed" in err and "left as it was" in err
    assert "full artifact: mean KL divergence" in err
    assert (artifact / "manifest.json").read_bytes() == before


def test_validate_refuses_a_file_that_differs_from_its_checksum(streamed_int4, tmp_path, capsys):
    import shutil

    artifact = tmp_path / "corrupt"
    shutil.copytree(streamed_int4, artifact)
    data = bytearray((artifact / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (artifact / "model.onnx.data").write_bytes(bytes(data))
    before = (artifact / "manifest.json").read_bytes()
    code, out, err = _validate(capsys, artifact)
    assert code == 2 and len(_errors(err)) == 1 and "model.onnx.data" in err
    assert (artifact / "manifest.json").read_bytes() == before


def test_validate_bad_input_is_one_line(tmp_path, capsys, streamed_int4, tiny_checkpoint):
    code, _, err = _validate(capsys, tmp_path / "missing")
    assert code == 2 and "is not a directory" in err and len(_errors(err)) == 1
    (tmp_path / "empty").mkdir()
    code, _, err = _validate(capsys, tmp_path / "empty")
    assert code == 2 and "no manifest.json" in err and len(_errors(err)) == 1
    # a checkpoint of another model (GPT-2, not the artifact's GPT-J) is refused before any validation
    other = tiny_checkpoint("gpt2")
    capsys.readouterr()  # what making the checkpoint printed
    code, _, err = _validate(capsys, streamed_int4, "--checkpoint", other)
    assert code == 2 and "is not the artifact's model" in err and len(_errors(err)) == 1
