"""Issue 17 item 14: gptexport prints the sha256 of the manifest it wrote, the digest a deployment pins."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

from tiny_models import make_checkpoint


def test_gptexport_prints_the_manifest_digest(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    make_checkpoint(ckpt, "gpt2")
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "gptexport.exporter.cli", str(ckpt), "-o", str(out),
                           "--no-validate"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    printed = re.findall(r"^manifest sha256: ([0-9a-f]{64})$", proc.stdout, re.M)
    assert printed == [hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()]
    from gptexport import runtime
    assert runtime.load(out, manifest_sha256=printed[0]).manifest_sha256 == printed[0]
