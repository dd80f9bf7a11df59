"""setup.py's role extras: every name pinned in requirements.txt, `all` is the whole file, and each role's
extra holds every third-party distribution that the role's own code imports (read with ast, module- and
function-level imports alike) and that the shared runtime imports at module level. The light client is
installed for real, alone, by tests/integration/test_sdk.py."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("tailor_setup", ROOT / "setup.py")
setup_py = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup_py)  # its setup() call is behind `if __name__ == "__main__"`
FIRST_PARTY = re.compile(r"^(tailor|tailor_\w+|support|tests|conftest)$")
# Optional accelerations installed apart from the extras (CUDA kernels, llama.cpp's build): code imports
# them lazily and says what is missing when they are not there.
OPTIONAL_FILES = ("requirements-gpu.txt", "requirements-llamacpp.txt")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports(files, module_level_only: bool) -> set[str]:
    found = set()
    for file in files:
        tree = ast.parse(file.read_text())
        nodes = tree.body if module_level_only else ast.walk(tree)
        for node in nodes:
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if not FIRST_PARTY.match(m) and m not in sys.stdlib_module_names}


def _optional() -> set[str]:
    names = set()
    for file in OPTIONAL_FILES:
        for line in (ROOT / file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                names.add(_normal(re.split(r"[\[=<>!~ ;]", line, maxsplit=1)[0]))
    return names


def _distributions(modules: set[str]) -> set[str]:
    """Import names -> installed distribution names (optional accelerations left out); an import that no
    installed package provides is reported."""
    table = importlib.metadata.packages_distributions()
    optional = _optional()
    modules = {
        m
        for m in modules
        if _normal(m) not in optional and not {_normal(d) for d in table.get(m, [])} & optional
    }
    missing = sorted(m for m in modules if m not in table)
    assert not missing, f"imported, but no installed distribution provides them: {missing}"
    return {_normal(d) for m in modules for d in table[m]}


def _python_files(folder: Path) -> list[Path]:
    return [f for f in folder.rglob("*.py") if "tests" not in f.relative_to(folder).parts]


def test_every_role_names_only_pinned_packages_and_all_is_the_whole_file():
    pins = setup_py.pins()
    for role, names in setup_py.ROLES.items():
        assert set(names) <= set(pins), (role, sorted(set(names) - set(pins)))
    assert set(setup_py.CLIENT) <= set(pins)
    with pytest.raises(SystemExit, match="does not pin"):
        setup_py.requirements(["not-a-pinned-package"])


def _role_sources(role: str) -> tuple[Path, list[Path]]:
    """A role's own package, and the kit it runs on (whose imports count at module level only)."""
    if role == "web":  # the HTTP front is a client of the gateway: it runs on the SDK, not the server kit
        return ROOT / "web" / "tailor_web", _python_files(ROOT / "sdk" / "tailor")
    own = ROOT / ("gateway/tailor_gateway" if role == "gateway" else f"services/{role}/tailor_{role}")
    return own, [f for f in _python_files(ROOT / "runtime" / "tailor_runtime") if "ml" not in f.parts]


@pytest.mark.parametrize(
    "role", ["gateway", "selector", "trainer", "quantizer", "benchmarker", "exporter", "web"]
)
def test_each_role_extra_holds_what_its_code_imports(role):
    own, kit = _role_sources(role)
    needed = _distributions(_imports(_python_files(own), False) | _imports(kit, True))
    declared = {_normal(n) for n in setup_py.ROLES[role]}
    # Distributions that arrive with a declared one (grpcio-tools' protobuf, opentelemetry-api's own deps).
    bundled = {_normal(r.split(";")[0].split(" ")[0]) for n in declared for r in _requires(n)}
    assert needed <= declared | bundled, (
        f"{role} imports {sorted(needed - declared - bundled)}, not in its extra"
    )


def _requires(name: str) -> list[str]:
    try:
        return [re.split(r"[\[=<>!~ ;(]", r, maxsplit=1)[0] for r in importlib.metadata.requires(name) or []]
    except importlib.metadata.PackageNotFoundError:
        return []
