"""gptexport: export GPT-2 and GPT-J from torch to ONNX and run them without torch.

One import name, three layers (data flows one way):

    gptexport.exporter   torch + transformers -> ONNX artifact directory   (the `export` extra)
    gptexport.graphs     onnx-only graph passes: fusion, fp16, int8/int4   (the `export` extra)
    gptexport.runtime    numpy + onnxruntime + tokenizers: load, generate   (the base install)

    from gptexport import runtime
    text = runtime.generate("gpt2-onnx", "Hello", max_new_tokens=20)

The repository keeps the three as top-level folders; setuptools' package-dir maps them under this package, so
nothing else is installed at top level.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("gptexport")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"
