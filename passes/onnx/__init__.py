"""ONNX-level passes on onnx-graphsurgeon graphs (``passes.onnx.CheckTensorRT`` and friends)."""

from passes import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, __path__)
