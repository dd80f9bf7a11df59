"""Optional libraries: whether one can run in this process, and why not.

Methods and formats import their library lazily; `importable` is the one check they all use to say, in
ListMethods and in refusals, that a library is missing or broken.
"""

from __future__ import annotations

import functools


@functools.cache
def importable(*modules: str) -> tuple[bool, str]:
    """(True, "") when every module imports; else why not. A real import, not a find_spec: a wheel whose
    native library does not load must count as unavailable. Cached: some imports cost seconds
    (bitsandbytes pulls in torch._dynamo) and the answer does not change within a process."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, or a broken native library raising anything
            return False, f"{name} cannot be imported here ({type(exc).__name__}: {str(exc)[:200]})"
    return True, ""
