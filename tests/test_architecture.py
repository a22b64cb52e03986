"""Import direction flows → tasks → cluster, and no framework loaded by importing the flow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = {"torch", "torchvision"}
TENSORFLOW = {"tensorflow", "keras", "tensorflow_datasets"}
FRAMEWORKS = TORCH | TENSORFLOW
# What each package may never import, not even inside a function: cluster is all that talks to Ray, and the
# flows run in the Prefect process, which loads no framework (TensorFlow after torch in one process has segfaulted).
FORBIDDEN = {
    "cluster": {"tasks", "flows", "prefect"},
    "tasks": {"flows", "ray"},
    "flows": {"ray"} | FRAMEWORKS,
}
# The modules that may import a framework at their top: each framework's own folder, and the recipes written for one
BACKENDS = {**{str(p.relative_to(ROOT)): TORCH for p in (ROOT / "cluster/pytorch").glob("*.py")},
            **{str(p.relative_to(ROOT)): TENSORFLOW for p in (ROOT / "cluster/tf").glob("*.py")},
            "cluster/recipes/fast_cifar.py": TORCH, "cluster/recipes/fast_cifar_muon.py": TORCH,
            "cluster/recipes/finetune.py": TORCH}
BACKENDS = {path: libs for path, libs in BACKENDS.items() if not path.endswith("__init__.py")}
PACKAGES = ("flows", "tasks", "cluster")


def imported_modules(path: Path, top_level_only: bool = False) -> set[str]:
    """Every module ``path`` imports: import statements (deferred ones too, unless ``top_level_only``),
    ``from package import module`` as that module, and ``importlib.import_module("literal")`` calls."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    modules = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
            modules |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            modules.add(node.args[0].value)
    return modules


def imported_roots(path: Path, top_level_only: bool) -> set[str]:
    return {name.split(".")[0] for name in imported_modules(path, top_level_only)}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_graph() -> dict[str, set[str]]:
    """The project's modules and, for each, the project modules it imports (an imported name that is not a
    module, ``from cluster.x import f``, counts as its module)."""
    paths = {module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        targets = set()
        for imported in imported_modules(path):
            while imported and imported not in paths:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):  # a package's own __init__
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path, top_level_only=False) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_frameworks_are_imported_only_by_backends_or_lazily():
    offenders = [
        str(path.relative_to(ROOT))
        for package in FORBIDDEN
        for path in (ROOT / package).rglob("*.py")
        if str(path.relative_to(ROOT)) not in BACKENDS and imported_roots(path, top_level_only=True) & FRAMEWORKS
    ]
    assert offenders == []


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_backend_never_imports_the_other_framework(backend):
    """TensorFlow after torch works in one process, the other order has segfaulted: a backend loads only its own."""
    other = FRAMEWORKS - BACKENDS[backend]
    assert imported_roots(ROOT / backend, top_level_only=False) & other == set()


def test_importing_the_flow_and_cli_loads_no_framework():
    code = ("import sys, flows.pipeline, flows.cli, flows.params; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'torchvision', 'ray.train') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_no_import_circle():
    """Deferred imports and ``import_module("...")`` calls count: a circle hidden in a function is still one."""
    assert cycles(project_graph()) == []


def test_the_cycle_finder_finds_a_deferred_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_cluster_root_holds_the_neutral_core_only():
    """The core at cluster/'s root; Ray, the worker contract and each framework in folders of their own."""
    root = sorted(path.name for path in (ROOT / "cluster").glob("*.py"))
    assert len(root) <= 8, root
    for path in (ROOT / "cluster").glob("*.py"):
        assert not imported_roots(path, top_level_only=False) & ({"ray"} | FRAMEWORKS), path.name


@pytest.mark.parametrize("folder, never", [
    ("cluster/worker", {"ray"} | FRAMEWORKS | {"cluster.execution", "cluster.pytorch", "cluster.tf"}),
    ("cluster/execution", FRAMEWORKS | {"cluster.pytorch", "cluster.tf", "cluster.recipes"}),
    ("cluster/pytorch", TENSORFLOW | {"cluster.execution", "cluster.tf"}),
    ("cluster/tf", TORCH | {"cluster.execution", "cluster.pytorch"}),
])
def test_rooms_lean_on_the_core_and_never_on_each_other(folder, never):
    """Execution reaches a framework only through the registry's "module:attribute" strings."""
    offenders = {}
    for path in (ROOT / folder).rglob("*.py"):
        hits = {name for name in imported_modules(path) if name in never or name.split(".")[0] in never
                or any(name.startswith(prefix + ".") for prefix in never)}
        if hits:
            offenders[str(path.relative_to(ROOT))] = sorted(hits)
    assert offenders == {}


def private_imports(path: Path, library: str) -> set[str]:
    """Modules of ``library`` that ``path`` imports whose dotted name has a part starting with an underscore."""
    return {name for name in imported_modules(path)
            if name.split(".")[0] == library and any(part.startswith("_") for part in name.split(".")[1:])}


@pytest.mark.parametrize("library, allowed", [("ray", {"cluster/execution/ray_internals.py"}),
                                              ("prefect", {"flows/prefect_internals.py"})])
def test_internals_of_a_dependency_stay_in_its_one_module(library, allowed):
    users = {str(path.relative_to(ROOT)) for package in PACKAGES for path in (ROOT / package).rglob("*.py")
             if private_imports(path, library) or f"{library}._" in path.read_text()}
    assert users <= allowed, users - allowed


def test_no_underscore_name_is_imported_across_modules():
    """A name starting with an underscore is its module's own business."""
    offenders = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                    offenders += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                                  if a.name.startswith("_")]
    assert offenders == []
