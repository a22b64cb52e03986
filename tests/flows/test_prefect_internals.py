"""flows/ and tasks/ use Prefect's public API only: no private module, no underscore name, nothing of the
server's own code (``prefect.server``: its app, its ``SubprocessASGIServer``). A Prefect internal that some day
buys users what no public API can belongs in flows/prefect_internals.py alone, with a loud test of its own;
this test leaves that one module out."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = ROOT / "flows" / "prefect_internals.py"
PRIVATE_PATH = re.compile(r"^prefect(\.\w+)*\._\w")  # prefect._internal, prefect.context._x, ...


def private_uses(source: str) -> list[str]:
    """The Prefect internals ``source`` reaches: imports of private or server modules and names, and
    ``import_module``-style strings naming a private module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _private_module(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("prefect"):
            if _private_module(node.module):
                found.append(node.module)
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and PRIVATE_PATH.match(node.value):
            found.append(node.value)
    return found


def _private_module(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "prefect" and (any(p.startswith("_") for p in parts) or parts[:2] == ["prefect", "server"])


def sources() -> list[Path]:
    return sorted(p for folder in ("flows", "tasks") for p in (ROOT / folder).rglob("*.py") if p != ALLOWED)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_prefect_internal_outside_its_one_module(path):
    assert private_uses(path.read_text()) == [], f"{path.relative_to(ROOT)}: move it to {ALLOWED.name} with a test"


def test_the_check_sees_each_kind_of_internal():
    assert private_uses("from prefect.server.api.server import SubprocessASGIServer") == ["prefect.server.api.server"]
    assert private_uses("import prefect._internal.concurrency") == ["prefect._internal.concurrency"]
    assert private_uses("from prefect.context import _temporary_global_settings_context") == \
        ["prefect.context._temporary_global_settings_context"]
    assert private_uses("importlib.import_module('prefect._internal.x')") == ["prefect._internal.x"]
    assert private_uses("from prefect import flow, get_client\nfrom prefect.settings import PREFECT_API_URL") == []
