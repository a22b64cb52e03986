"""The cluster configs in deploy/: the `ray up` file against the schema inside the installed Ray, the
KubeRay manifest's required fields and secrets, one image for both, and a Dockerfile that takes its pins
from pyproject.toml. Each checker returns the problems it found, so every check is also shown to fail."""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RAY_UP = DEPLOY / "ray-cluster-aws.yaml"
KUBERAY = DEPLOY / "kuberay-raycluster.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
# x86_64 EC2 families with NVIDIA GPUs (g5g is ARM: the image would not run there).
GPU_FAMILIES = frozenset({"g4dn", "g5", "g6", "g6e", "gr6", "p3", "p3dn", "p4d", "p4de", "p5", "p5e", "p5en"})
SECRET_ENV = re.compile(r"RAY_AUTH_TOKEN|AWS_\w+")
REQUIREMENTS_SCRIPT = re.compile(r"^RUN python - <<'PY'\n(.*?)\nPY$", re.S | re.M)
BASE_IMAGE = re.compile(r"^FROM\s+python:(\d+\.\d+)-slim\S*", re.M)


def load_yaml(path: Path) -> dict[str, Any]:
    """Parse one YAML document (anchors resolved, as kubectl and `ray up` see it)."""
    return yaml.safe_load(path.read_text())


def ray_schema() -> dict[str, Any]:
    """The cluster-config JSON schema that the installed Ray validates `ray up` files against."""
    return json.loads(importlib.resources.files("ray.autoscaler").joinpath("ray-schema.json").read_text())


def schema_errors(config: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Every violation of ``schema``, as ``path: message``; empty when ``config`` is valid."""
    errors = Draft7Validator(schema).iter_errors(config)
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}" for e in errors)


def node_type_problems(config: dict[str, Any]) -> list[str]:
    """What Ray checks beyond the schema, plus: every worker node type is an x86 NVIDIA GPU instance.

    Args:
        config: a parsed `ray up` cluster config.

    Returns:
        One sentence per problem; empty when none.
    """
    types = config.get("available_node_types", {})
    head = config.get("head_node_type")
    problems = [] if head in types else [f"head_node_type {head!r} is not one of available_node_types"]
    if sum(t.get("min_workers", 0) for t in types.values()) > config.get("max_workers", 2):
        problems.append("the node types' min_workers add up to more than max_workers")
    workers = {name: t for name, t in types.items() if name != head}
    if not workers:
        problems.append("no worker node type")
    for name, node_type in workers.items():
        if node_type.get("min_workers", 0) > node_type.get("max_workers", config.get("max_workers", 2)):
            problems.append(f"{name}: min_workers is above max_workers")
        family = str(node_type["node_config"].get("InstanceType", "")).split(".")[0]
        if family not in GPU_FAMILIES:
            problems.append(f"{name}: {node_type['node_config'].get('InstanceType')!r} is not an NVIDIA GPU type")
        if node_type.get("resources", {}).get("GPU", 0) < 1:
            problems.append(f"{name}: resources declare no GPU")
    return problems


def start_command_problems(commands: list[str], token_mounts: set[str]) -> list[str]:
    """Why ``commands`` would not start Ray with token auth; empty when they do.

    Args:
        commands: a node's ``*_start_ray_commands``.
        token_mounts: remote paths in ``file_mounts`` (``~/...``), where a token file may come from.

    Returns:
        One sentence per problem; empty when none.
    """
    starts = [c for c in commands if re.search(r"\bray start\b", c)]
    if not starts:
        return ["no `ray start` command"]
    problems = []
    for command in starts:
        before = command[: command.index("ray start")]
        if not re.search(r"\bRAY_AUTH_MODE=token\b", before):
            problems.append(f"RAY_AUTH_MODE=token is not set before `ray start`: {command!r}")
        token = re.search(r"\bRAY_AUTH_TOKEN(_PATH)?=([^\s;]+)", before)
        if token is None:
            problems.append(f"neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set: {command!r}")
        elif token.group(1) and token.group(2).replace("$HOME/", "~/") not in token_mounts:
            problems.append(f"the token file {token.group(2)} is not in file_mounts")
        elif not token.group(1) and not token.group(2).startswith(('"$(', "$(")):
            problems.append("RAY_AUTH_TOKEN is written inline instead of read at start")
    return problems


def _at(obj: Any, path: str) -> Any:
    """``obj`` at a dotted path (``a.b.0.c``), or None where any step is missing."""
    for step in path.split("."):
        if isinstance(obj, list) and step.isdigit() and int(step) < len(obj):
            obj = obj[int(step)]
        elif isinstance(obj, dict) and step in obj:
            obj = obj[step]
        else:
            return None
    return obj


HEAD_REQUIRED = ("apiVersion", "kind", "metadata.name", "spec.headGroupSpec.rayStartParams",
                 "spec.headGroupSpec.template.spec.containers.0.name",
                 "spec.headGroupSpec.template.spec.containers.0.image")
GROUP_REQUIRED = ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams",
                  "template.spec.containers.0.name", "template.spec.containers.0.image")


def gpu_limit(container: dict[str, Any]) -> int:
    """How many NVIDIA GPUs a container's limits claim (0 when none)."""
    return int(((container.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0))


def worker_group_problems(where: str, group: dict[str, Any]) -> list[str]:
    """Missing fields, replica counts out of order, and GPU limits that ``num-gpus`` contradicts.

    Args:
        where: the group's place in the manifest, for the messages.
        group: one entry of ``spec.workerGroupSpecs``.

    Returns:
        One sentence per problem; empty when none.
    """
    problems = [f"{where}.{path} is missing" for path in GROUP_REQUIRED if _at(group, path) in (None, "")]
    counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
    if all(isinstance(c, int) for c in counts) and not counts[0] <= counts[1] <= counts[2]:
        problems.append(f"{where}: needs minReplicas <= replicas <= maxReplicas, got {counts}")
    for c, container in enumerate(_at(group, "template.spec.containers") or []):
        declared = int((group.get("rayStartParams") or {}).get("num-gpus", gpu_limit(container)))
        if gpu_limit(container) != declared:
            problems.append(f"{where}.containers.{c}: limits {gpu_limit(container)} nvidia.com/gpu "
                            f"but num-gpus is {declared}")
    return problems


def kuberay_shape_problems(manifest: dict[str, Any]) -> list[str]:
    """Missing or inconsistent fields of a KubeRay ``RayCluster``; empty when it is well formed.

    Args:
        manifest: the parsed manifest.

    Returns:
        One sentence per problem, naming the field.
    """
    problems = [f"{path} is missing" for path in HEAD_REQUIRED if _at(manifest, path) in (None, "")]
    if manifest.get("apiVersion") != "ray.io/v1" or manifest.get("kind") != "RayCluster":
        problems.append("not a ray.io/v1 RayCluster")
    groups = _at(manifest, "spec.workerGroupSpecs") or []
    if not groups:
        problems.append("spec.workerGroupSpecs is missing")
    for i, group in enumerate(groups):
        problems += worker_group_problems(f"spec.workerGroupSpecs.{i}", group)
    containers = [c for g in groups for c in _at(g, "template.spec.containers") or []]
    if groups and not any(gpu_limit(c) for c in containers):
        problems.append("no worker group has an nvidia.com/gpu limit")
    return problems


def kuberay_containers(manifest: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every container of the cluster with where it sits; the autoscaler sidecar counts as one."""
    for c, container in enumerate(_at(manifest, "spec.headGroupSpec.template.spec.containers") or []):
        yield f"head container {c}", container
    for g, group in enumerate(_at(manifest, "spec.workerGroupSpecs") or []):
        for c, container in enumerate(_at(group, "template.spec.containers") or []):
            yield f"worker group {group.get('groupName', g)} container {c}", container
    if _at(manifest, "spec.enableInTreeAutoscaling"):
        yield "autoscaler", _at(manifest, "spec.autoscalerOptions") or {}


def env_problems(where: str, env: list[dict[str, Any]]) -> list[str]:
    """Token auth on, and every token or AWS variable taken from a Secret, never written inline.

    Args:
        where: the container, for the messages.
        env: its ``env`` list.

    Returns:
        One sentence per problem; empty when none.
    """
    by_name = {e.get("name"): e for e in env}
    problems = [] if _at(by_name, "RAY_AUTH_MODE.value") == "token" else [f"{where}: RAY_AUTH_MODE is not token"]
    if "RAY_AUTH_TOKEN" not in by_name:
        problems.append(f"{where}: no RAY_AUTH_TOKEN")
    for name, entry in by_name.items():
        if SECRET_ENV.fullmatch(str(name)) and ("value" in entry or _at(entry, "valueFrom.secretKeyRef") is None):
            problems.append(f"{where}: {name} must come from valueFrom.secretKeyRef, not be written inline")
    return problems


def kuberay_problems(manifest: dict[str, Any]) -> list[str]:
    """All that :func:`kuberay_shape_problems` and :func:`env_problems` find, for every container."""
    problems = kuberay_shape_problems(manifest)
    for where, container in kuberay_containers(manifest):
        problems += env_problems(where, container.get("env") or [])
    return problems


def images(ray_up: dict[str, Any], manifest: dict[str, Any]) -> set[str]:
    """Every image the two configs name (a `ray up` head_image/worker_image counts too)."""
    docker = ray_up.get("docker", {})
    named = {docker.get(k) for k in ("image", "head_image", "worker_image")}
    named |= {t.get("docker", {}).get("worker_image") for t in ray_up.get("available_node_types", {}).values()}
    return (named - {None}) | {c.get("image") for where, c in kuberay_containers(manifest) if where != "autoscaler"}


# --- ray up ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_up() -> dict[str, Any]:
    return load_yaml(RAY_UP)


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return load_yaml(KUBERAY)


def test_ray_up_config_is_valid_for_the_installed_ray(ray_up):
    assert schema_errors(ray_up, ray_schema()) == []
    assert node_type_problems(ray_up) == []


@pytest.mark.parametrize("breakage, expected", [
    (lambda c: c.update(max_worker=4), "Additional properties are not allowed ('max_worker'"),
    (lambda c: c.update(max_workers="four"), "max_workers: 'four' is not of type 'integer'"),
    (lambda c: c["available_node_types"]["ray.worker.gpu"].update(min_worker=1), "ray.worker.gpu"),
    (lambda c: c.pop("provider"), "'provider' is a required property"),
])
def test_schema_check_rejects_a_broken_copy(ray_up, breakage, expected):
    broken = copy.deepcopy(ray_up)
    breakage(broken)
    errors = schema_errors(broken, ray_schema())
    assert any(expected in e for e in errors), errors


def test_workers_are_gpu_nodes_and_a_cpu_worker_is_caught(ray_up):
    workers = [name for name in ray_up["available_node_types"] if name != ray_up["head_node_type"]]
    assert workers and all(ray_up["available_node_types"][w]["resources"]["GPU"] >= 1 for w in workers)
    broken = copy.deepcopy(ray_up)
    broken["available_node_types"][workers[0]]["node_config"]["InstanceType"] = "m5.xlarge"
    broken["available_node_types"][workers[0]]["min_workers"] = 9
    assert node_type_problems(broken) == [
        "the node types' min_workers add up to more than max_workers",
        f"{workers[0]}: min_workers is above max_workers",
        f"{workers[0]}: 'm5.xlarge' is not an NVIDIA GPU type",
    ]


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_ray_starts_with_token_auth_from_a_mounted_file(ray_up, key):
    assert start_command_problems(ray_up[key], set(ray_up["file_mounts"])) == []
    assert start_command_problems(ray_up[key], set()) == ["the token file $HOME/.ray/auth_token is not in file_mounts"]


@pytest.mark.parametrize("command, problem", [
    ("export RAY_AUTH_TOKEN_PATH=~/token; ray start --head", "RAY_AUTH_MODE=token is not set"),
    ("export RAY_AUTH_MODE=token; ray start --head", "neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH"),
    ("export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=abc123; ray start --head", "written inline"),
    ("export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/elsewhere; ray start --head", "not in file_mounts"),
    ("ray stop", "no `ray start` command"),
])
def test_start_command_check_rejects_missing_or_inline_auth(command, problem):
    problems = start_command_problems(["ray stop", command], {"~/token"})
    assert len(problems) == 1 and problem in problems[0]


def test_setup_commands_are_set_so_rays_defaults_never_reinstall_packages(ray_up):
    # Left out, `ray up` takes them from Ray's defaults.yaml, which pip-installs Ray over the image's.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert ray_up[key] == [], key


# --- KubeRay ----------------------------------------------------------------------------------------------


def test_kuberay_manifest_is_complete_and_keeps_secrets_in_secrets(manifest):
    assert kuberay_problems(manifest) == []
    containers = dict(kuberay_containers(manifest))
    assert set(containers) == {"head container 0", "worker group gpu container 0", "autoscaler"}


@pytest.mark.parametrize("path", [
    "metadata.name",
    "spec.headGroupSpec.rayStartParams",
    "spec.headGroupSpec.template.spec.containers.0.image",
    "spec.workerGroupSpecs.0.groupName",
    "spec.workerGroupSpecs.0.maxReplicas",
    "spec.workerGroupSpecs.0.template.spec.containers.0.image",
])
def test_kuberay_check_rejects_a_missing_field(manifest, path):
    broken = copy.deepcopy(manifest)
    *parents, last = path.split(".")
    del _at(broken, ".".join(parents))[last]
    assert f"{path} is missing" in kuberay_problems(broken)


def test_kuberay_check_rejects_inline_secrets_bad_counts_and_no_gpu(manifest):
    broken = copy.deepcopy(manifest)
    group = broken["spec"]["workerGroupSpecs"][0]
    group.update(replicas=group["maxReplicas"] + 1)
    worker = group["template"]["spec"]["containers"][0]
    worker["env"] = [e for e in worker["env"] if e["name"] != "AWS_SECRET_ACCESS_KEY"]
    worker["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "inline-secret"})
    del worker["resources"]["limits"]["nvidia.com/gpu"]
    broken["spec"]["autoscalerOptions"]["env"] = []
    problems = kuberay_problems(broken)
    assert "worker group gpu container 0: AWS_SECRET_ACCESS_KEY must come from valueFrom.secretKeyRef, " \
           "not be written inline" in problems
    assert any("minReplicas <= replicas <= maxReplicas" in p for p in problems)
    assert "no worker group has an nvidia.com/gpu limit" in problems
    assert {"autoscaler: RAY_AUTH_MODE is not token", "autoscaler: no RAY_AUTH_TOKEN"} <= set(problems)


def test_both_configs_run_one_image(ray_up, manifest):
    assert len(images(ray_up, manifest)) == 1, images(ray_up, manifest)


# --- Dockerfile -------------------------------------------------------------------------------------------


def test_dockerfile_takes_the_dependencies_from_pyproject(tmp_path):
    dockerfile = DOCKERFILE.read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert re.search(r"^COPY\s+pyproject\.toml\b", dockerfile, re.M)
    # No pin copied by hand: neither a torch version nor any dependency's specifier appears.
    assert not re.search(r"torch\s*[=<>~]=", dockerfile)
    assert [d for d in project["dependencies"] if d in dockerfile] == []
    # The build stage's script, run here on the real pyproject.toml, lists exactly those dependencies (and
    # MLflow's client, for runs submitted as Ray jobs that track themselves).
    script = REQUIREMENTS_SCRIPT.search(dockerfile)
    assert script, "no `RUN python - <<'PY' ... PY` step"
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    subprocess.run([sys.executable, "-c", script.group(1)], cwd=tmp_path, check=True, timeout=30)
    expected = [*project["dependencies"], *project["optional-dependencies"]["mlflow"], "ray[default]"]
    assert (tmp_path / "requirements.txt").read_text().splitlines() == expected


def test_dockerfile_python_satisfies_requires_python():
    versions = BASE_IMAGE.findall(DOCKERFILE.read_text())
    froms = re.findall(r"^FROM\s", DOCKERFILE.read_text(), re.M)
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert versions and len(versions) == len(froms), "every stage should start from an official python:X.Y-slim"
    assert len(set(versions)) == 1, f"the stages use different Pythons: {versions}"
    assert SpecifierSet(requires).contains(f"{versions[0]}.0"), (versions[0], requires)
