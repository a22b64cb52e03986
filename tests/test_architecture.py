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
BACKENDS = {"cluster/torch_backend.py": TORCH, "cluster/torch_loop.py": TORCH, "cluster/torch_allreduce.py": TORCH,
            "cluster/torch_sharded.py": TORCH,
            "cluster/recipes/fast_cifar.py": TORCH, "cluster/recipes/fast_cifar_muon.py": TORCH,
            "cluster/tf_backend.py": TENSORFLOW, "cluster/tf_loop.py": TENSORFLOW}


def imported_roots(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    roots = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


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
