"""gptexport's torch-free runtime: numpy + onnxruntime + tokenizers.

    from gptexport.runtime import load
    model = load("out/gpt2")
    print(model.generate("Hello", max_new_tokens=20))
"""

from .errors import ArtifactError, GenerationError, GptexportError, ProviderError
from .manifest import FORMAT_VERSION, MANIFEST_NAME, checksum_files, file_entry, read_manifest, write_manifest
from .heads import HeadModel, InputError, answer, choose, classify, embed, load_head, tag
from .model import Completion, Model, Result, Stats, TextStream, generate, load
from .sampling import SamplingParams

__all__ = [
    "ArtifactError", "GenerationError", "GptexportError", "ProviderError",
    "FORMAT_VERSION", "MANIFEST_NAME", "checksum_files", "file_entry", "read_manifest", "write_manifest",
    "HeadModel", "InputError", "answer", "choose", "classify", "embed", "load_head", "tag",
    "Completion", "Model", "Result", "Stats", "TextStream", "generate", "load", "SamplingParams",
]
