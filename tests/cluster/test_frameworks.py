"""The framework registry: the form's choices, a missing framework named before anything starts, lazy parts."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from cluster.errors import UserError
from cluster.frameworks import FRAMEWORKS, get_framework, load
from flows.params import PipelineParams, build_params, preflight
from tests.flows.test_cli import ROOT


def test_the_form_offers_the_registered_frameworks():
    schema = PipelineParams.model_json_schema()["$defs"]["TrainParams"]["properties"]["framework"]
    assert schema["enum"] == list(FRAMEWORKS) == ["torch", "tensorflow"]
    assert "MultiWorkerMirroredStrategy" in schema["description"]


def test_every_part_a_record_names_exists():
    for spec in FRAMEWORKS.values():
        for target in (spec.train, spec.backend_config, spec.predict, spec.probabilities):
            module, _, attribute = target.partition(":")
            source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
            assert f"def {attribute}(" in source, target  # checked without importing the framework


def test_a_missing_framework_is_one_sentence_naming_the_install(monkeypatch, tmp_path):
    absent = replace(FRAMEWORKS["tensorflow"], modules=("tensorflow_not_installed_here",))
    with pytest.raises(UserError) as info:
        absent.check_installed()
    assert str(info.value) == ("framework='tensorflow' needs tensorflow_not_installed_here, which is not installed "
                               "here; run: pip install 'trainflow[tensorflow]'")
    monkeypatch.setitem(FRAMEWORKS, "tensorflow", absent)
    params = build_params("smoke", {"train": {"framework": "tensorflow"}, "publish": {"store": str(tmp_path)}})
    with pytest.raises(UserError, match=r"pip install 'trainflow\[tensorflow\]'"):
        preflight(params)  # before Ray, Prefect or the store are touched
    assert list(tmp_path.iterdir()) == []


def test_unknown_names_and_lazy_loading():
    with pytest.raises(UserError, match="framework='mxnet' is unknown; choose one of torch, tensorflow."):
        get_framework("mxnet")
    # The backend configs are built (and pickled) where the trainer is: they load no framework
    code = ("import pickle, sys; from cluster.frameworks import FRAMEWORKS, load; "
            "configs = [load(spec.backend_config)(False) for spec in FRAMEWORKS.values()]; pickle.dumps(configs); "
            "print(sorted(m for m in ('torch', 'tensorflow') if m in sys.modules)); "
            "load(FRAMEWORKS['torch'].predict); print(sorted(m for m in ('torch', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-3:] == ["[]", "['torch']", ""]
    assert callable(load("cluster.frameworks:get_framework"))


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed")
def test_tensorflow_batches_never_wait_for_the_tf_data_autotuner():
    """An autotuned tf.data pipeline held every epoch's end until its optimiser's next wake-up (0.63 s, 1.27 s, ...):
    the loop's batches are built without it. Checked on the pipeline's options, in a process of TensorFlow alone,
    because an epoch's wall time on a shared machine tells the wait from a busy core only by chance."""
    code = ("import numpy as np; from cluster.tf.loop import in_memory_batches; "
            "ds = in_memory_batches(np.zeros((10, 4, 4, 3), np.uint8), np.zeros(10, np.int64), 4); "
            "print(ds.options().autotune.enabled, [int(len(y)) for _, y in ds])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "False [4, 4, 2]", out.stdout
