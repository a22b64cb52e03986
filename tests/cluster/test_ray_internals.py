"""Loud tests for each Ray internal the project keeps (cluster/execution/ray_internals.py): a Ray upgrade that
changes one fails here, by name, instead of silently changing what users see."""

from __future__ import annotations

import inspect
import os

import pytest

from cluster.execution import ray_internals


@pytest.mark.parametrize("setting", sorted(ray_internals.TRAIN_SETTINGS.values()))
def test_each_train_setting_is_still_read_by_train_and_copied_to_its_controller(setting):
    from ray.train.v2._internal import constants

    assert setting in vars(constants).values(), f"Ray Train no longer reads {setting}"
    assert setting in constants.ENV_VARS_TO_PROPAGATE, f"Ray Train no longer copies {setting} to its controller"


def test_train_settings_hold_for_the_block_and_leave_a_users_own_values(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "1")  # the user's own
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "7")
    with ray_internals.train_settings(start_timeout_s=12.5):
        assert os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "12.5"
        assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
        assert os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "1"
    assert os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "7"
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in os.environ


def test_the_preemption_watcher_is_off_on_one_machine_only(monkeypatch):
    watcher = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
    monkeypatch.delenv(watcher, raising=False)
    with ray_internals.train_settings(start_timeout_s=5, one_machine=True):
        assert os.environ[watcher] == "0"
    with ray_internals.train_settings(start_timeout_s=5):  # a cluster: Train's default
        assert watcher not in os.environ
    monkeypatch.setenv(watcher, "1")  # the user's own
    with ray_internals.train_settings(start_timeout_s=5, one_machine=True):
        assert os.environ[watcher] == "1"
    assert os.environ[watcher] == "1"


def test_a_start_timeout_is_told_apart_from_other_controller_errors():
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    assert list(inspect.signature(WorkerGroupStartupTimeoutError).parameters) == ["num_workers"]
    assert ray_internals.is_start_timeout(ControllerError(WorkerGroupStartupTimeoutError(num_workers=2)))
    assert not ray_internals.is_start_timeout(ControllerError(RuntimeError("something else")))
    assert not ray_internals.is_start_timeout(RuntimeError("not Train's"))


def test_the_gcs_answers_a_question_with_this_process_token(ray_local):
    import ray

    ray_internals.ask_gcs_cluster_id(ray.get_runtime_context().gcs_address)  # raises if the call changed
