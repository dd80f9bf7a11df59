"""Tests that need an optional part (llama-cpp-python, MLServer's venv): without it they skip, saying why;
with the part's TAILOR_REQUIRE_* variable set to 1 (what `make test` sets) its absence fails them instead,
so CI never counts a skipped test as passing."""

from __future__ import annotations

import os

import pytest


def require(available: bool, why: str, variable: str, how_to_install: str) -> None:
    """Return when `available`; else fail (`variable`=1) or skip, naming why and how to install it."""
    if available:
        return
    if os.environ.get(variable) == "1":
        pytest.fail(f"{variable}=1 but {why}")
    pytest.skip(f"{why}; {how_to_install} ({variable}=1 makes this a failure)")


def require_llama_cpp() -> None:
    from tailor_runtime.ml.gguf_io import llama_cpp_availability

    available, why = llama_cpp_availability()
    require(available, why, "TAILOR_REQUIRE_LLAMA_CPP", "install requirements-llamacpp.txt")
