"""The installed dependencies are the ones pyproject.toml pins and deploy/constraints.txt locks, and every install
(the Makefile's, the Docker image's) goes through that constraints file."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"
# The dependencies whose internals or binaries the project leans on: pinned in pyproject.toml itself.
PINNED = ("ray", "prefect", "torch", "torchvision", "tensorflow")
ONE_MINOR = ("ray", "prefect")  # `==X.Y.*`: the code reaches deepest into these


def requirements() -> dict[str, Requirement]:
    """pyproject.toml's requirements, the extras' included, by canonical name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


def constraints() -> dict[str, Version]:
    """deploy/constraints.txt as name → exact version."""
    locked = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"deploy/constraints.txt: {line!r} is not NAME==VERSION"
            locked[canonicalize_name(name)] = Version(version)
    return locked


def installed(name: str) -> Version | None:
    try:
        return Version(importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.mark.parametrize("name", ONE_MINOR)
def test_ray_and_prefect_are_pinned_to_one_minor_version(name):
    specifiers = list(requirements()[name].specifier)
    assert len(specifiers) == 1 and specifiers[0].operator == "==", specifiers
    assert re.fullmatch(r"\d+\.\d+\.\*", specifiers[0].version), specifiers[0]


@pytest.mark.parametrize("name", PINNED)
def test_the_installed_version_matches_the_pin_and_the_constraints(name):
    version = installed(name)
    if version is None:
        assert name == "tensorflow", f"{name} is a base dependency but is not installed"
        pytest.skip("the tensorflow extra is not installed (`make test` installs it)")
    requirement, locked = requirements()[name], constraints()[name]
    assert version in requirement.specifier, f"{name} {version} installed, pyproject.toml wants {requirement}"
    assert version == locked, f"{name} {version} installed, deploy/constraints.txt has {locked}"


def test_every_installed_package_the_constraints_name_has_their_version():
    drifted = {name: (str(installed(name)), str(locked)) for name, locked in constraints().items()
               if installed(name) not in (None, locked)}
    assert not drifted, f"installed vs deploy/constraints.txt: {drifted}; `make` reinstalls, or regenerate the file"


def test_the_constraints_satisfy_pyproject_and_leave_the_project_out():
    locked = constraints()
    assert "trainflow" not in locked  # the checkout is installed editable, never from the lock
    for name, requirement in requirements().items():
        assert name in locked, f"{name} is a dependency in pyproject.toml but not in deploy/constraints.txt"
        assert locked[name] in requirement.specifier, f"deploy/constraints.txt has {name} {locked[name]}, " \
                                                      f"pyproject.toml wants {requirement}"


def test_the_makefile_installs_every_time_through_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^CONSTRAINTS\s*:?=\s*deploy/constraints\.txt\s*$", makefile, re.M)
    installs = [line for line in makefile.splitlines() if re.search(r"\bpip install\b", line)]
    server = [line for line in installs if "$(MLFLOW_SERVER)/bin/pip" in line]
    assert len(installs) - len(server) >= 2, installs  # the venv's, and the test extra's
    for line in installs:
        if line in server:  # the tests' MLflow server, in a venv of its own: its own lock, exact throughout
            assert re.search(r"\s-r\s+deploy/mlflow-server\.txt\s*$", line), line
        else:
            assert re.search(r"\s-c\s+(\$\(CONSTRAINTS\)|deploy/constraints\.txt)\s", line), line
    server_lock = [line for line in (ROOT / "deploy" / "mlflow-server.txt").read_text().splitlines()
                   if line.strip() and not line.startswith("#")]
    assert server_lock and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][^\s=]*", line) for line in server_lock), server_lock


def test_the_dockerfile_installs_through_the_constraints():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    copied = re.search(r"^COPY\s+deploy/constraints\.txt\s+(\S+)\s*$", dockerfile, re.M)
    assert copied, "the image should COPY deploy/constraints.txt"
    installs = re.findall(r"pip install [^\n]*", dockerfile)
    assert installs and all(f"-c {copied.group(1)}" in line for line in installs), installs
