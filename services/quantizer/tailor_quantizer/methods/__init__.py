"""Quantization methods. Importing this package registers every method (cheaply: no torch import)."""

from tailor_quantizer.methods.registry import (
    Caps,
    Method,
    QuantizeJob,
    get_method,
    list_methods,
    parse_config,
    register,
)

# Each import registers its method; the order does not matter (list_methods sorts by name).
from tailor_quantizer.methods import auto_mixed, bnb, compressed, float_cast, gguf, int8_dynamic, onnx_static  # noqa: E402, F401  isort: skip

__all__ = ["Caps", "QuantizeJob", "Method", "get_method", "list_methods", "parse_config", "register"]
