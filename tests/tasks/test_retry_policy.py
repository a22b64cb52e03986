"""One retry budget: IO errors are retried with backoff by Prefect, user mistakes never are."""

from __future__ import annotations

import pytest
from prefect import flow, task
from prefect.testing.utilities import prefect_test_harness

from cluster.errors import UserError
from tasks.common import retry_unless_user_error
from tasks.ingest import ingest_task
from tasks.preprocess import preprocess_task
from tasks.publish import publish_task
from tasks.train import train_task

ATTEMPTS: list[str] = []


@task(retries=3, retry_delay_seconds=0, retry_condition_fn=retry_unless_user_error)
def flaky(kind: str, failures: int) -> int:
    ATTEMPTS.append(kind)
    if ATTEMPTS.count(kind) <= failures:
        raise UserError(f"{kind}: cannot succeed") if kind == "user" else ConnectionResetError("store hiccup")
    return ATTEMPTS.count(kind)


@flow
def call(kind: str, failures: int) -> int:
    return flaky(kind, failures)


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_io_errors_are_retried_and_user_errors_are_not(harness):
    ATTEMPTS.clear()
    assert call("io", 2) == 3  # two hiccups, then success on the third attempt
    with pytest.raises(UserError, match="cannot succeed"):
        call("user", 1)
    assert ATTEMPTS.count("user") == 1  # failed at once: no retry could have fixed it


@pytest.mark.parametrize(("stage", "retries", "delays"), [
    (ingest_task, 3, [2, 8, 30]),
    (preprocess_task, 2, [2, 10]),
    (train_task, 1, [5]),
    (publish_task, 3, [2, 8, 30]),
])
def test_every_stage_that_retries_skips_user_errors(stage, retries, delays):
    """The budget in the README's table is the one the tasks carry."""
    configured = stage.retry_delay_seconds
    assert stage.retries == retries
    assert (list(configured) if isinstance(configured, list) else [configured]) == delays
    assert stage.retry_condition_fn is retry_unless_user_error
