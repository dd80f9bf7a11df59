"""The `web` extra holds every third-party distribution that web/tailor_web imports, and what the SDK it
is built on imports at module level; checked with tests/unit/test_packaging.py's own helpers, which
check the other roles."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "tailor_packaging_checks", ROOT / "tests/unit/test_packaging.py"
)
packaging = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(packaging)


def test_the_web_extra_holds_what_the_web_front_imports():
    own = packaging._python_files(ROOT / "web" / "tailor_web")
    # The SDK at module level only: its torch conversion is a lazy import the light client does without.
    sdk = packaging._python_files(ROOT / "sdk" / "tailor")
    needed = packaging._distributions(packaging._imports(own, False) | packaging._imports(sdk, True))
    declared = {packaging._normal(n) for n in packaging.setup_py.ROLES["web"]}
    bundled = {
        packaging._normal(r.split(";")[0].split(" ")[0]) for n in declared for r in packaging._requires(n)
    }
    assert needed <= declared | bundled, (
        f"web imports {sorted(needed - declared - bundled)}, not in its extra"
    )
    assert {"fastapi", "uvicorn", "python-multipart"} <= declared
