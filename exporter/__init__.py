"""gptexport's exporter: transformers GPT-2 / GPT-J (torch) -> ONNX artifact directory."""

from gptexport import __version__

__all__ = ["__version__"]
