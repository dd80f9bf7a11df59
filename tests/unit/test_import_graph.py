"""The first-party import graph, read statically with `ast` (nothing is imported).

Two graphs over the modules of the eight first-party packages: module-level imports (run when the module
is imported: the top level, class bodies, `try`/`if` blocks, but not `if TYPE_CHECKING:`) and
function-level imports (inside a def, run when it is called). A cycle in the module-level graph makes the
import order matter (a partially initialised module seen from the other side); function-level imports are
how a cycle is broken on purpose, so they are recorded apart and not checked. `importlib.import_module`
(the architecture registry's families, the exporter's formats, the format loaders) is not seen.

- No module-level cycle outside `KNOWN_CYCLES` (each a strongly connected component, named, with why it is
  there). A new cycle, or a module joining a known one, fails and prints the cycle. A known one that is gone
  fails too, so the list only shrinks.
- Nothing in `runtime/tailor_runtime` outside `tailor_runtime/ml` imports torch or transformers at module
  level (the gateway, the selector and the CLI import the runtime without loading torch).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Package name -> the folder holding it.
PACKAGES = {
    "tailor": REPO / "sdk" / "tailor",  # the SDK (the generated stubs under it live in gen/, not read here)
    "tailor_runtime": REPO / "runtime" / "tailor_runtime",
    "tailor_gateway": REPO / "gateway" / "tailor_gateway",
    "tailor_cli": REPO / "cli" / "tailor_cli",
    "tailor_quantizer": REPO / "services" / "quantizer" / "tailor_quantizer",
    "tailor_trainer": REPO / "services" / "trainer" / "tailor_trainer",
    "tailor_benchmarker": REPO / "services" / "benchmarker" / "tailor_benchmarker",
    "tailor_exporter": REPO / "services" / "exporter" / "tailor_exporter",
    "tailor_selector": REPO / "services" / "selector" / "tailor_selector",
}

# Module-level cycles that exist and are accepted: the modules of one strongly connected component ->
# why. Remove an entry once its cycle is gone (the test says so).
KNOWN_CYCLES: dict[frozenset[str], str] = {}

# Modules of tailor_runtime outside tailor_runtime.ml allowed to import torch/transformers at module
# level: module -> why.
KNOWN_HEAVY_IMPORTS: dict[str, str] = {}

# Packages (or parts) that must not load torch/transformers when imported, not even through another
# first-party module's module-level imports: the gateway, the selector ("pure logic, no torch") and the
# CLI start without torch; the runtime outside `ml` is what they import.
LIGHT = ("tailor", "tailor_runtime", "tailor_gateway", "tailor_selector", "tailor_cli")

HEAVY = {"torch", "transformers"}


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    # imported name -> first line, per kind
    top: dict[str, int] = field(default_factory=dict)
    local: dict[str, int] = field(default_factory=dict)


def discover(packages: dict[str, Path]) -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for package, root in packages.items():
        assert root.is_dir(), f"{package}: {root} is missing"
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = [package, *rel.parts]
            if "tests" in rel.parts:
                continue
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            modules[".".join(parts)] = Module(".".join(parts), path, is_package)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: Module, known: set[str]) -> list[tuple[str, int, bool, bool]]:
    """(absolute imported name, line, at module level, named explicitly) for every import of the file.

    `import a.b` names a.b. `from X import n` names X and, if X.n is a module, X.n; X itself only
    implicitly when every n is a submodule (`from . import sibling` needs X initialised, not its body
    finished)."""
    tree = ast.parse(module.path.read_text(), filename=str(module.path))
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    found: list[tuple[str, int, bool, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for orelse in child.orelse:  # `else:` of TYPE_CHECKING runs
                    visit_one(orelse, top)
                continue
            visit_one(child, top)

    def visit_one(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, node.lineno, top, True))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: -(node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            found.append((target, node.lineno, top, len(submodules) < len(node.names)))
            found.extend((name, node.lineno, top, True) for name in submodules)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            visit(node, False)
        else:
            visit(node, top)

    visit(tree, True)
    return found


def build(packages: dict[str, Path] = PACKAGES) -> dict[str, Module]:
    modules = discover(packages)
    for module in modules.values():
        for name, line, top, explicit in _imports(module, set(modules)):
            root = name.split(".")[0]
            if root not in packages:
                if root in HEAVY and top:
                    module.top.setdefault(name, line)
                continue
            # importing a.b.c runs a, a.b and a.b.c; the importer's own ancestors are already running,
            # so they count only when named explicitly (`from pkg import name_defined_in_pkg`)
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target not in modules or target == module.name:
                    continue
                if module.name.startswith(target + ".") and not (explicit and target == name):
                    continue
                kind = module.top if top else module.local
                kind.setdefault(target, line)
    return modules


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module (or with a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    components.append(sorted(component))
    return components


def a_cycle(graph: dict[str, set[str]], component: list[str], modules: dict[str, Module]) -> str:
    """One concrete cycle through the component's first module, as `a (line) -> b (line) -> a`."""
    members = set(component)
    start = component[0]
    # breadth-first from start back to start, inside the component
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [start]
                    while node != start:
                        path.append(node)
                        node = previous[node]
                    path.append(start)
                    path.reverse()
                    hops = [f"{a} (line {modules[a].top[b]})" for a, b in zip(path, path[1:], strict=False)]
                    return " -> ".join([*hops, start])
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return build()


def _graph(modules: dict[str, Module], kind: str) -> dict[str, set[str]]:
    return {name: {t for t in getattr(m, kind) if t in modules} for name, m in modules.items()}


def test_the_graph_is_read(modules):
    # the graph is not empty by accident (a wrong root, a parse that finds nothing)
    assert {"tailor_runtime.server", "tailor_gateway.engine", "tailor_cli.main"} <= set(modules)
    top = _graph(modules, "top")
    assert "tailor_runtime.errors" in top["tailor_runtime.interceptors"]
    assert sum(len(v) for v in top.values()) > 200
    assert sum(len(v) for v in _graph(modules, "local").values()) > 0


def test_no_new_module_level_import_cycles(modules):
    top = _graph(modules, "top")
    found = {frozenset(c): c for c in strongly_connected(top)}
    new = [a_cycle(top, c, modules) for key, c in found.items() if key not in KNOWN_CYCLES]
    gone = [sorted(key) for key in KNOWN_CYCLES if key not in found]
    message = []
    if new:
        message.append(
            "module-level import cycles (move one import into the function that needs it, or split the "
            "module):\n  " + "\n  ".join(new)
        )
    if gone:
        message.append(
            "KNOWN_CYCLES lists cycles that no longer exist (remove them):\n  " + "\n  ".join(map(str, gone))
        )
    assert not message, "\n".join(message)


def test_runtime_outside_ml_does_not_import_torch_at_module_level(modules):
    heavy = {
        name: sorted(f"{t} (line {line})" for t, line in m.top.items() if t.split(".")[0] in HEAVY)
        for name, m in modules.items()
        if name.startswith("tailor_runtime.")
        and not (name == "tailor_runtime.ml" or name.startswith("tailor_runtime.ml."))
    }
    offenders = {name: found for name, found in heavy.items() if found and name not in KNOWN_HEAVY_IMPORTS}
    gone = [name for name in KNOWN_HEAVY_IMPORTS if not heavy.get(name)]
    assert not offenders, f"torch/transformers at module level outside tailor_runtime.ml: {offenders}"
    assert not gone, f"KNOWN_HEAVY_IMPORTS lists modules that no longer import them (remove): {gone}"


def _is_light(name: str) -> bool:
    if name == "tailor_runtime.ml" or name.startswith("tailor_runtime.ml."):
        return False
    return name.split(".")[0] in LIGHT


def test_light_packages_do_not_load_torch_through_other_modules(modules):
    top = _graph(modules, "top")
    heavy = {name for name, m in modules.items() if any(t.split(".")[0] in HEAVY for t in m.top)}
    offenders = {}
    for name in sorted(n for n in modules if _is_light(n)):
        # breadth-first over module-level imports; the first path that reaches a heavy module
        previous = {name: None}
        frontier = [name]
        while frontier and name not in offenders:
            following = []
            for node in frontier:
                if node in heavy:
                    path = []
                    while node is not None:
                        path.append(node)
                        node = previous[node]
                    offenders[name] = " -> ".join(reversed(path))
                    break
                for child in sorted(top[node]):
                    if child not in previous:
                        previous[child] = node
                        following.append(child)
            frontier = following
    assert not offenders, "loads torch/transformers at import:\n  " + "\n  ".join(offenders.values())


def test_the_checker_on_a_package_of_its_own(tmp_path):
    # a <-> b at module level is a cycle; c imports a only inside a function and under TYPE_CHECKING
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\nimport torch\n")
    (pkg / "b.py").write_text("from pkg.a import thing\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
        "def f():\n    from .a import thing\n"
    )
    found = build({"pkg": pkg})
    assert set(found["pkg.a"].top) == {"pkg.b", "torch"}
    assert set(found["pkg.b"].top) == {"pkg.a"}
    assert found["pkg.c"].top == {} and set(found["pkg.c"].local) == {"pkg.a"}
    graph = _graph(found, "top")
    assert strongly_connected(graph) == [["pkg.a", "pkg.b"]]
    assert a_cycle(graph, ["pkg.a", "pkg.b"], found) == "pkg.a (line 1) -> pkg.b (line 1) -> pkg.a"


def test_a_package_and_its_submodule_importing_names_from_each_other_is_a_cycle(tmp_path):
    # the registry pattern: __init__ imports a family module, which takes `register` from __init__
    reg = tmp_path / "reg"
    reg.mkdir()
    (reg / "__init__.py").write_text("def register(x):\n    return x\nfrom .fam import F\n")
    (reg / "fam.py").write_text("from reg import register\nF = register(1)\n")
    (reg / "quiet.py").write_text("from . import fam\n")  # needs reg initialised, not finished: no edge
    found = build({"reg": reg})
    assert set(found["reg.quiet"].top) == {"reg.fam"}
    assert strongly_connected(_graph(found, "top")) == [["reg", "reg.fam"]]


def test_the_cycle_finder_finds_a_cycle():
    # the checker itself: a -> b -> c -> a is one component, d -> d a self-loop, e alone is none
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "e"}, "d": {"d"}, "e": set()}
    assert sorted(strongly_connected(graph)) == [["a", "b", "c"], ["d"]]
