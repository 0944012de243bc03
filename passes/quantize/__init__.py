"""Quantization passes: observers, PTQ Q/DQ insertion, QAT, dynamic INT8, FP16, sensitivity."""

from passes import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, __path__)
