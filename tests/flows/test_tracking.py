"""Runs tracked in MLflow: a real `mlflow server` (SQLite, artifacts in SeaweedFS), read back with MlflowClient."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from cluster.errors import UserError
from tasks.tracking import ENV, RUN_KEY_TAG, Tracking, TrackedRun, tracking_for
from tests.flows.test_cli import ROOT, trainflow
from tests.s3server import SECRET_KEY


def test_off_without_a_uri_and_credentials_in_one_are_refused(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert tracking_for(None, "e", {}) is None
    monkeypatch.setenv(ENV, "http://127.0.0.1:5000")
    assert tracking_for("", "e", {}) is None  # an empty parameter turns the environment's tracking off
    tracking = tracking_for(None, "e", {"train": {"lr": 0.01, "model": None}, "data": {"kind": "digits"}})
    assert tracking.uri == "http://127.0.0.1:5000"
    assert tracking.params == {"train.lr": "0.01", "train.model": "", "data.kind": "digits"}
    with pytest.raises(UserError, match="MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
        tracking_for("https://me:secret@mlflow.example.com", "e", {})


def test_a_server_that_does_not_answer_is_one_line_before_any_work(tmp_path):
    from cluster.ports import free_port

    run = trainflow("run", "--preset", "smoke", "--store", str(tmp_path / "store"),
                    "--mlflow-uri", f"http://127.0.0.1:{free_port()}")
    errors = [line for line in run.stderr.splitlines() if line.startswith("trainflow: error:")]
    assert run.returncode == 2 and len(errors) == 1, run.stderr[-3000:]
    assert "does not answer" in errors[0] and "--mlflow-uri" in errors[0]
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.json"))


def runs_of(client, experiment: str, run_id: str) -> list:
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], filter_string=f"tags.`trainflow.run_id` = '{run_id}'")


@pytest.mark.slow
def test_a_run_is_one_mlflow_run_and_a_reused_rerun_adds_nothing(mlflow_server, s3_server, tmp_path):
    store = str(tmp_path / "store")
    args = ["run", "--preset", "smoke", "--epochs", "3", "--store", store, "--mlflow-experiment", "one-run", "--json"]
    first = trainflow(*args, env={ENV: mlflow_server.uri})
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout[first.stdout.index("{"):])
    client = mlflow_server.client()
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == summary["run_id"]
    assert run.data.tags["trainflow.run_id"] == summary["run_id"]
    assert run.data.tags["trainflow.release_uri"] == summary["release_uri"]
    assert run.data.params["train.epochs"] == "3" and run.data.params["data.kind"] == "digits"
    assert run.data.params["tracking.experiment"] == "one-run"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2, 3]
    assert run.data.metrics["test_accuracy"] == summary["accuracy"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"confusion.png", "per_class.json"}
    png = client.download_artifacts(run.info.run_id, "confusion.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = json.loads(open(client.download_artifacts(run.info.run_id, "per_class.json", str(tmp_path))).read())
    assert [row[0] for row in table["data"]] == [str(c) for c in range(10)] and table["columns"][0] == "class"
    # the artifacts are in SeaweedFS, written by the server, which alone holds the S3 credentials
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_server.bucket,
                                                                 Prefix="mlflow-artifacts/")["Contents"]]
    assert any(k.endswith("/confusion.png") for k in keys), keys
    recorded = [*run.data.params.values(), *run.data.tags.values()]
    assert not any(SECRET_KEY in value for value in recorded)

    # the same run again: training reused, the finished MLflow run left as it was
    again = trainflow(*args, env={ENV: mlflow_server.uri})
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout[again.stdout.index("{"):])["mlflow_run_id"] == run.info.run_id
    assert len(runs_of(client, "one-run", summary["run_id"])) == 1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2, 3]

    # without a URI: nothing tracked, and MLflow not imported by the flow's process
    overrides = {"train": {"epochs": 3}, "publish": {"store": store}}
    code = ("import json, sys; from flows.params import build_params; from flows.pipeline import train_pipeline; "
            f"s = train_pipeline(build_params('smoke', {overrides!r})); "
            "print(json.dumps([s.mlflow_run_id, 'mlflow' in sys.modules]))")
    untracked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                               env={k: v for k, v in os.environ.items() if k != ENV})
    assert untracked.returncode == 0, untracked.stderr[-3000:]
    assert json.loads(untracked.stdout.strip().splitlines()[-1]) == [None, False]


def test_a_run_left_without_parameters_gets_them_when_it_is_continued(mlflow_server):
    """A driver killed between MLflow's create_run and its log_batch leaves a run with no parameters: the re-run,
    which continues that run, logs them (the run is found by its checkpoints' URI, as after any crash)."""
    client = mlflow_server.client()
    experiment = client.create_experiment("half-created")
    checkpoints = "s3://trainflow/checkpoints/half-created-run"
    left = client.create_run(experiment, tags={RUN_KEY_TAG: hashlib.sha256(checkpoints.encode()).hexdigest()})
    tracking = Tracking(uri=mlflow_server.uri, experiment="half-created", params={"train.lr": "0.01", "seed": "0"})
    continued = TrackedRun.open(tracking, checkpoints, "half-created-run", "fingerprint")
    assert continued.run_id == left.info.run_id
    assert client.get_run(left.info.run_id).data.params == {"train.lr": "0.01", "seed": "0"}
    assert TrackedRun.open(tracking, checkpoints, "half-created-run", "fingerprint").run_id == left.info.run_id
