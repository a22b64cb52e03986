"""`trainflow sweep` end to end: trials on Ray Tune with ASHA, the driver killed mid-sweep and the sweep resumed,
the best trial published, the trials' table in Prefect and nested runs in a real MLflow server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.tracking import ENV
from tests.flows.test_cli import ROOT, trainflow

EPOCHS, TRIALS = 4, 4
# one trial at a time, in fp32 on every CPU: ASHA's decisions then depend on the trials' (deterministic)
# accuracies alone, not on which of two trials reaches a rung first or on what `auto` picks on this CPU
ARGS = ["sweep", "--preset", "digits-quickstart", "--image-size", "8", "--workers", "1", "--epochs", str(EPOCHS),
        "--precision", "fp32", "--search", "lr=loguniform:0.001:0.1", "--search", "batch_size=choice:32,64",
        "--trials", str(TRIALS), "--max-concurrent", "1", "--mlflow-experiment", "sweep", "--json"]


def checkpoints(store: Path, run_id: str) -> list[str]:
    return sorted(p.name for p in (store / "checkpoints" / run_id).glob("checkpoint_*"))


def table_versions(key: str) -> list:
    """Every version of the Prefect table artifact ``key``, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # the session's server, which the sweeps' processes used (this process read its settings before it was set)
    with temporary_settings({PREFECT_API_URL: os.environ["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return sorted(found, key=lambda a: a.created)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_sweep_killed_mid_way_resumes_and_publishes_its_best_trial(mlflow_server, tmp_path):
    store, log = tmp_path / "store", tmp_path / "first.log"
    command = [sys.executable, "-m", "flows.cli", *ARGS, "--store", str(store)]
    env = {**os.environ, ENV: mlflow_server.uri}
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:  # until the first trial has finished and the second has trained an epoch
        deadline = time.monotonic() + 300
        while not (re.search(rf"_00000 .* epoch {EPOCHS}/{EPOCHS}:", text := log.read_text())
                   and re.search(r"_00001 .* epoch 1/", text)):
            assert first.poll() is None, text[-4000:]
            assert time.monotonic() < deadline, text[-4000:]
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)  # the driver: Prefect's flow, Tune's controller and the local Ray
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert not (store / "models").exists()  # nothing published by the killed sweep
    text = log.read_text()
    first_trial_run = next(line for line in text.splitlines() if "_00000 (" in line)
    assert not re.search(r"_0000[23] \(", text)  # one trial at a time
    done_runs = {p.name: checkpoints(store, p.name) for p in (store / "checkpoints").iterdir()}

    rerun = trainflow(*ARGS, "--store", str(store), env={ENV: mlflow_server.uri})
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    summary = json.loads(rerun.stdout[rerun.stdout.index("{"):])
    trials = summary["trials"]
    assert len(trials) == TRIALS and len({t["run_id"] for t in trials}) == TRIALS
    assert all(set(t["values"]) == {"lr", "batch_size"} and t["error"] is None for t in trials)
    # the finished trial was not trained again: its run's checkpoints are as the killed sweep left them
    first_id = trials[0]["trial_id"]
    assert first_id.endswith("_00000") and first_id in first_trial_run
    assert checkpoints(store, trials[0]["run_id"]) == done_runs[trials[0]["run_id"]]
    assert f"trial {first_id} " not in rerun.stderr  # nor reported again
    # ASHA: the trials that trailed at a rung stopped there; the others ran every epoch
    stopped = [t for t in trials if t["stopped_early"]]
    assert stopped and all(t["epochs"] < EPOCHS for t in stopped), trials
    assert all(t["epochs"] == EPOCHS for t in trials if not t["stopped_early"])
    best = next(t for t in trials if t["trial_id"] == summary["best_trial_id"])
    finishers = [t for t in trials if not t["stopped_early"]]
    assert best["last_val_accuracy"] == max(t["last_val_accuracy"] for t in finishers)
    # the best trial's run is what was evaluated and published, its lineage naming the sweep and the trial
    assert summary["run_id"] == best["run_id"] and summary["version"] == 1 and summary["promoted"]
    lineage = json.loads((store / "models" / "seed-cnn" / "versions" / "1" / "lineage.json").read_text())
    assert lineage["run_id"] == best["run_id"]
    assert lineage["parameters"]["sweep"]["id"] == summary["sweep_id"]
    assert lineage["parameters"]["sweep"]["trial_id"] == best["trial_id"]
    assert {k: lineage["parameters"]["train"][k] for k in best["values"]} == best["values"]

    # the Prefect UI's table: a new version as each trial starts and ends, the last with every trial
    versions = table_versions(f"{summary['sweep_id']}-trials")
    assert len(versions) >= 2 * (TRIALS - 1), len(versions)
    last = versions[-1].data if isinstance(versions[-1].data, list) else json.loads(versions[-1].data)
    assert [row["trial"] for row in last] == [t["trial_id"] for t in trials]
    assert [row["stopped early"] for row in last] == [t["stopped_early"] for t in trials]
    assert all(row["status"] == "finished" for row in last)

    # MLflow: the sweep's run, each trial's nested in it with each epoch once; the best with the test results
    client = mlflow_server.client()
    sweep_run = client.get_run(summary["mlflow_run_id"])
    assert sweep_run.info.status == "FINISHED" and sweep_run.data.tags["trainflow.best_trial"] == best["trial_id"]
    experiment = client.get_experiment_by_name("sweep").experiment_id
    nested = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{sweep_run.info.run_id}'")
    assert sorted(r.data.params["sweep.trial_id"] for r in nested) == [t["trial_id"] for t in trials]
    for run in nested:
        trial = next(t for t in trials if t["trial_id"] == run.data.params["sweep.trial_id"])
        assert run.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy"))
        assert steps == list(range(1, trial["epochs"] + 1)), (trial, steps)
        assert run.data.tags["trainflow.stopped_early"] == str(trial["stopped_early"])
        if trial is best:
            assert run.data.metrics["test_accuracy"] == summary["accuracy"]
        else:
            assert "test_accuracy" not in run.data.metrics
    assert len(client.search_runs([experiment])) == TRIALS + 1  # the resumed sweep made no second runs

    # the same sweep once more: found finished in the store; nothing trained, published or tracked again
    again = trainflow(*ARGS, "--store", str(store), env={ENV: mlflow_server.uri})
    assert again.returncode == 0, again.stderr[-4000:]
    repeat = json.loads(again.stdout[again.stdout.index("{"):])
    assert {s["name"]: s["skipped"] for s in repeat["stages"]} == {
        "ingest": True, "preprocess": True, "sweep": True, "evaluate": False, "publish": True}
    assert repeat["epochs_trained"] == 0 and repeat["already_published"] and repeat["version"] == 1
    assert [t["trial_id"] for t in repeat["trials"]] == [t["trial_id"] for t in trials]
    assert repeat["mlflow_run_id"] == summary["mlflow_run_id"]
    assert len(client.search_runs([experiment])) == TRIALS + 1


@pytest.mark.parametrize("args, says", [
    (["--search", "lr=gaussian:0:1"], "choice:a,b,c, uniform:lo:hi, loguniform:lo:hi or int:lo:hi"),
    (["--search", "batch_size=choice:32,33"], "a trial could draw batch_size=33"),
    (["--search", "lr=uniform:0.01:0.1", "--search", "lr=choice:0.1"], "names a parameter twice"),
    (["--val-fraction", "0"], "chooses its best trial by validation accuracy"),
    (["--trials", "0"], "sweep.trials"),
])
def test_a_sweep_that_cannot_work_is_one_line_before_any_work(tmp_path, args, says):
    run = trainflow("sweep", "--preset", "smoke", "--workers", "2", "--store", str(tmp_path / "store"), *args)
    errors = [line for line in run.stderr.splitlines() if line.startswith("trainflow: error:")]
    assert run.returncode == 2 and len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert says in errors[0], errors[0]
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.json"))


def test_the_trial_table_on_the_console_marks_the_best_and_says_how_each_ended():
    from types import SimpleNamespace

    from flows.cli import format_trials
    from tasks.refs import Trial

    trials = [Trial(trial_id="a_00000", run_id="r0", values={"lr": 0.0123, "batch_size": 64}, epochs=4,
                    best_val_accuracy=0.9, last_val_accuracy=0.88, stopped_early=False),
              Trial(trial_id="a_00001", run_id="r1", values={"lr": 0.1, "batch_size": 32}, epochs=1,
                    best_val_accuracy=0.2, last_val_accuracy=0.2, stopped_early=True),
              Trial(trial_id="a_00002", run_id="r2", values={"lr": 0.05, "batch_size": 32}, epochs=0,
                    best_val_accuracy=None, last_val_accuracy=None, stopped_early=False, error="boom")]
    lines = format_trials(SimpleNamespace(sweep_id="sweep-x", best_trial_id="a_00000", trials=trials)).splitlines()
    assert lines[1] == "sweep sweep-x: 3 trial(s)" and lines[2].split() == ["trial", "batch_size", "lr", "best", "val",
                                                                            "epochs", "outcome"]
    assert lines[3].split() == ["a_00000", "64", "0.0123", "0.9000", "4", "finished", "<-", "best,", "published"]
    assert lines[4].endswith("stopped early") and lines[5].split()[-2:] == ["failed:", "boom"]


def test_a_searched_batch_larger_than_the_training_set_stops_the_sweep_before_any_trial(tmp_path):
    store = tmp_path / "store"
    run = trainflow("sweep", "--preset", "smoke", "--workers", "2", "--store", str(store), "--search",
                    "batch_size=choice:32,4096")
    errors = [line for line in run.stderr.splitlines() if line.startswith("trainflow: error:")]
    assert run.returncode == 2 and len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "could draw batch_size=4096, and then batch_size=4096 is larger than the training set" in errors[0]
    assert {p.name for p in store.iterdir()} == {"prepared"}  # the prepared data only: no trial, sweep or model
