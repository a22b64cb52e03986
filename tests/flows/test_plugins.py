"""Plugins without a fork: a package of the user's, with its own pyproject.toml, registers a model and a recipe
under the entry-point groups `trainflow.models` and `trainflow.recipes`; once installed, `trainflow` lists them and
a run trains with them by name, as with a built-in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.flows.test_cli import trainflow

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "tinyplug"
version = "0.1.0"

[project.entry-points."trainflow.models"]
tinyplug = "tinyplug:tiny_net"

[project.entry-points."trainflow.recipes"]
plug_sgd = "tinyplug:RECIPE"

[tool.setuptools]
py-modules = ["tinyplug"]
"""

MODULE = '''\
"""A user's package: a network builder and a recipe, registered by entry point."""

from cluster.recipes import Recipe


def tiny_net(num_classes, in_channels, image_size):
    from torch import nn

    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, num_classes))


RECIPE = Recipe(name="plug_sgd", summary="the article's SGD, from a plugin", model="seed_cnn",
                parts={"torch": "cluster.recipes.article:torch_parts"})
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """The package built and installed (pip, from its pyproject.toml) into a folder of its own: the environment
    that puts that folder on the path, as an installed package's site would be."""
    tmp = tmp_path_factory.mktemp("plugin")
    (tmp / "src").mkdir()
    (tmp / "src" / "pyproject.toml").write_text(PYPROJECT)
    (tmp / "src" / "tinyplug.py").write_text(MODULE)
    site = tmp / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--target", str(site), str(tmp / "src")], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert list(site.glob("tinyplug-0.1.0.dist-info/entry_points.txt"))
    return {"PYTHONPATH": str(site)}


def test_an_installed_plugin_is_listed(installed):
    listed = trainflow("presets", env=installed)
    assert listed.returncode == 0, listed.stderr[-3000:]
    found = json.loads(listed.stdout)
    assert found["models"]["tinyplug"] == "tinyplug:tiny_net"
    assert found["recipes"]["plug_sgd"] == "the article's SGD, from a plugin"
    assert "tinyplug" not in json.loads(trainflow("presets").stdout)["models"]  # not installed: not there


@pytest.mark.slow
def test_a_run_trains_and_predicts_with_an_installed_plugins_model_and_recipe(installed, tmp_path):
    store = str(tmp_path / "store")
    run = trainflow("run", "--preset", "smoke", "--model", "tinyplug", "--recipe", "plug_sgd", "--store", store,
                    "--json", env=installed)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout[run.stdout.index("{"):])
    assert summary["run_id"].startswith("tinyplug-") and summary["epochs_trained"] == 1
    lineage = json.loads((Path(store) / "models/seed-cnn/versions/1/lineage.json").read_text())
    assert (lineage["parameters"]["train"]["model"], lineage["parameters"]["train"]["recipe"]) == \
        ("tinyplug", "plug_sgd")
    image = tmp_path / "one.png"
    Image.new("L", (8, 8), 128).save(image)
    predicted = trainflow("predict", str(image), "--store", store, "--json", env=installed)
    assert predicted.returncode == 0, predicted.stderr[-3000:]  # the network rebuilt by its registered name
    assert len(json.loads(predicted.stdout[predicted.stdout.index("{"):])["predictions"]) == 1
    without = trainflow("predict", str(image), "--store", store)
    assert without.returncode == 2 and "model='tinyplug' is unknown" in without.stderr, without.stderr[-2000:]
