"""Graph passes over onnx-ir models: fusion into onnxruntime contrib ops. Imports onnx and onnx-ir only, never torch."""
