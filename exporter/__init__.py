"""gptexport's exporter: transformers GPT-2 / GPT-J (torch) -> ONNX artifact directory."""

__version__ = "0.1.0"
