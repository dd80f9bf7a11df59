"""Quantization methods. Importing this package registers every method (cheaply: no torch import)."""

from tailor_quantizer.methods.registry import (
    Caps,
    Job,
    Method,
    get_method,
    list_methods,
    parse_config,
    register,
)

# Each import registers its method; the order does not matter (list_methods sorts by name).
from tailor_quantizer.methods import bnb, float_cast, int8_dynamic  # noqa: E402, F401  isort: skip

__all__ = ["Caps", "Job", "Method", "get_method", "list_methods", "parse_config", "register"]
