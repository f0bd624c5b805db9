"""Where an export's pieces come from: the checkpoint's tokenizer (checked against the model, GPT-2's only when it
ships none, said so) and hub checkpoints (huggingface_hub's own offline mode and proxies, one pinned commit).
Issue 17, items 3 and 6. No network: the hub is a fake snapshot directory behind a mocked snapshot_download."""

from __future__ import annotations

import json
import socket

import pytest

from gptexport.exporter.build import ExportOptions, export
from gptexport.exporter.cli import _summary
from gptexport.exporter.presets import ExportError

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from tiny_models import make_checkpoint

    ckpt = tmp_path_factory.mktemp("tiny") / "checkpoint"
    ckpt.mkdir()
    make_checkpoint(ckpt, "gpt2")
    return ckpt


def _copy(src, dst, skip=()):
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _export(ckpt, tmp_path, **kwargs):
    return export(ExportOptions(model=str(ckpt), output=str(tmp_path / "out"), validate=False, **kwargs))


# ---- item 3: the tokenizer -----------------------------------------------------------------------------------------

def test_checkpoint_tokenizer_is_recorded(tiny_checkpoint, tmp_path):
    result = _export(tiny_checkpoint, tmp_path)
    assert result.manifest["tokenizer"] == {"origin": "checkpoint", "fallback": False, "vocab_size": 50257,
                                            "note": "the checkpoint's own tokenizer"}
    assert "WARNING tokenizer" not in _summary(result)


def test_fallback_only_without_tokenizer_files_and_said_so(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path / "bare", skip={"tokenizer.json"})
    result = _export(ckpt, tmp_path)
    assert result.manifest["tokenizer"]["origin"] == "gpt2" and result.manifest["tokenizer"]["fallback"]
    assert ("WARNING tokenizer: the checkpoint ships no tokenizer files: GPT-2's vocabulary was used (50257 tokens)"
            in _summary(result))
    assert json.loads((result.output / "manifest.json").read_text())["tokenizer"]["fallback"] is True


def test_broken_tokenizer_files_are_refused_not_replaced(tiny_checkpoint, tmp_path):
    """vocab.json without merges.txt used to fall back to GPT-2's tokenizer without a word."""
    ckpt = _copy(tiny_checkpoint, tmp_path / "broken", skip={"tokenizer.json"})
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    (ckpt / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(ExportError, match=r"cannot read the tokenizer of .*broken.* \(tokenizer_config.json, "
                                          r"vocab.json\).*fix or remove its tokenizer files"):
        _export(ckpt, tmp_path)
    assert not (tmp_path / "out").exists()


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    import transformers

    from gptexport.exporter.tokenizer import gpt2_tokenizer

    ckpt = tmp_path / "small-vocab"
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=1000,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(ckpt))
    gpt2_tokenizer().save(str(ckpt / "tokenizer.json"))
    with pytest.raises(ExportError, match="has 50257 tokens but the model's vocab_size is 1000"):
        _export(ckpt, tmp_path)


def test_tokenizer_whose_eos_is_not_the_models_is_refused(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path / "eos")
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    config = json.loads((ckpt / "config.json").read_text())
    config["eos_token_id"] = 7
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"maps its eos token '<\|endoftext\|>' to id 50256, but the model's "
                                          r"eos_token_id is 7"):
        _export(ckpt, tmp_path)


# ---- item 6: the hub -----------------------------------------------------------------------------------------------

@pytest.fixture
def fake_hub(tiny_checkpoint, tmp_path, monkeypatch):
    """snapshot_download answered from a fake cache snapshot (snapshots/<sha>); the calls are recorded."""
    import huggingface_hub

    snapshot = _copy(tiny_checkpoint, tmp_path / "cache" / "models--owner--tiny" / "snapshots" / SHA)
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False, **kwargs):
        calls.append({"repo_id": repo_id, "revision": revision, "patterns": allow_patterns,
                      "local_files_only": local_files_only})
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


@pytest.mark.parametrize("stream_", [False, True], ids=["in-memory", "streamed"])
def test_hub_export_pins_one_revision_behind_a_proxy(fake_hub, tmp_path, monkeypatch, stream_):
    """Behind an HTTPS proxy a raw TCP connection to port 443 fails: the old probe said "no network"."""
    def no_direct_connections(*args, **kwargs):
        raise OSError("direct connections are blocked; only the proxy is reachable")

    monkeypatch.setattr(socket, "create_connection", no_direct_connections)
    monkeypatch.setattr("huggingface_hub.is_offline_mode", lambda: False)
    result = export(ExportOptions(model="owner/tiny", output=str(tmp_path / "out"), validate=False, stream=stream_))
    assert result.manifest["model"]["source"] == "hub" and result.manifest["model"]["revision"] == SHA
    assert f"revision: {SHA}" in _summary(result)
    assert fake_hub[0]["revision"] is None  # the default branch, resolved to a commit once ...
    assert len(fake_hub) >= 2 and all(c["revision"] == SHA for c in fake_hub[1:])  # ... then read at that commit
    assert any("*.safetensors" in c["patterns"] for c in fake_hub[1:])
    assert not any(c["local_files_only"] for c in fake_hub)


def test_hub_offline_mode_reads_the_cache_only(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.is_offline_mode", lambda: True)
    result = export(ExportOptions(model="owner/tiny", output=str(tmp_path / "out"), validate=False))
    assert result.manifest["model"]["revision"] == SHA
    assert all(c["local_files_only"] for c in fake_hub)


def test_hub_not_cached_offline_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def snapshot_download(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot find the requested files in the disk cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr("huggingface_hub.is_offline_mode", lambda: True)
    with pytest.raises(ExportError, match=r"cannot fetch 'owner/tiny' from the Hugging Face Hub \(HF_HUB_OFFLINE is "
                                          r"set and it is not in the local cache\); .*local directory"):
        export(ExportOptions(model="owner/tiny", output=str(tmp_path / "out"), validate=False))
