"""`trainflow submit` when the Ray Jobs API answers wrong: one line and exit code 2, or a bounded wait for the
head's job agent; never a traceback.

Ray's real ``JobSubmissionClient`` talks to a stand-in for the head's dashboard on 127.0.0.1 (aiohttp, as
Ray's own job head is) that answers the Jobs API's routes as ``ray/dashboard/modules/job/job_head.py`` does,
including its "no available agent" reply. The unreachable dashboard is tested through the command itself.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from aiohttp import web

from cluster.errors import UserError
from cluster.execution import jobs
from cluster.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
NO_AGENT_REPLY = "No available agent to submit job, please try again later."  # job_head.py's words


class FakeDashboard:
    """The Jobs API of a Ray head on 127.0.0.1: the first ``no_agent`` submissions get job_head.py's "no
    agent" reply, later ones are accepted; a job's info and log stream are as ``job`` says."""

    def __init__(self, *, no_agent: int = 0, job: dict | None = None, logs: tuple[str, ...] = ()) -> None:
        self.no_agent, self.job, self.logs = no_agent, job or {}, logs
        self.submissions: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.url = ""

    async def version(self, request: web.Request) -> web.Response:
        import ray

        return web.json_response({"version": "4", "ray_version": ray.__version__, "ray_commit": "test"})

    async def submit(self, request: web.Request) -> web.Response:
        self.submissions.append(await request.json())
        if len(self.submissions) <= self.no_agent:
            return web.Response(text=NO_AGENT_REPLY, status=500)
        return web.json_response({"job_id": "raysubmit_test", "submission_id": "raysubmit_test"})

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response({"type": "SUBMISSION", "submission_id": "raysubmit_test", "entrypoint": "x",
                                  "status": "SUCCEEDED", "message": None, "driver_exit_code": 0, **self.job})

    async def tail(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        for chunk in self.logs:
            await ws.send_str(chunk)
        await ws.close()
        return ws

    async def package(self, request: web.Request) -> web.Response:
        return web.Response(status=200)  # every runtime_env package "already uploaded"

    def __enter__(self) -> FakeDashboard:
        app = web.Application()
        app.add_routes([web.get("/api/version", self.version), web.post("/api/jobs/", self.submit),
                        web.get("/api/jobs/{job_id}", self.info), web.get("/api/jobs/{job_id}/logs/tail", self.tail),
                        web.get("/api/packages/{protocol}/{name}", self.package)])
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Clock:
    """time.monotonic and time.sleep for the retry loop, without waiting."""

    def __init__(self) -> None:
        self.now, self.slept = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def client(url: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(url)


def test_a_submission_waits_for_the_job_agent_and_goes_through(clock):
    notes = []
    with FakeDashboard(no_agent=3) as dashboard:
        job_id = jobs.submit_when_agent_ready(client(dashboard.url), dashboard.url, entrypoint="echo hi",
                                              note=notes.append, sleep=clock.sleep, clock=clock)
    assert job_id == "raysubmit_test"
    assert len(dashboard.submissions) == 4 and clock.slept == [jobs.RETRY_EVERY_S] * 3
    assert len(notes) == 1 and "job agent is not up yet" in notes[0]  # said once, not per try


def test_no_job_agent_within_the_wait_is_one_sentence_naming_the_fix(clock):
    with FakeDashboard(no_agent=1000) as dashboard, pytest.raises(UserError) as caught:
        jobs.submit_when_agent_ready(client(dashboard.url), dashboard.url, wait_s=10, entrypoint="echo hi",
                                     note=lambda _: None, sleep=clock.sleep, clock=clock)
    message = str(caught.value)
    assert "no job agent after 10 s" in message and "--dashboard-agent-listen-port" in message, message
    assert "\n" not in message and clock.now <= 10
    assert len(dashboard.submissions) == 6  # at 0, 2, 4, 6, 8 and 10 s


def test_another_refusal_is_not_retried():
    class Refusing(FakeDashboard):
        async def submit(self, request: web.Request) -> web.Response:
            self.submissions.append(await request.json())
            return web.Response(text="Traceback (most recent call last):\n  File \"x\"\nValueError: bad entrypoint",
                                status=400)

    with Refusing() as dashboard, pytest.raises(UserError) as caught:
        jobs.submit_when_agent_ready(client(dashboard.url), dashboard.url, entrypoint="echo hi",
                                     sleep=lambda s: pytest.fail("slept"))
    assert "did not accept the job (ValueError: bad entrypoint" in str(caught.value), caught.value
    assert len(dashboard.submissions) == 1


def test_a_job_that_fails_in_ray_is_a_user_error_and_a_failed_run_its_exit_code():
    output = []
    never_started = {"status": "FAILED", "driver_exit_code": None,
                     "message": "Job supervisor actor failed to start\nruntime_env setup failed: no such pip package"}
    with FakeDashboard(job=never_started) as dashboard, pytest.raises(UserError) as caught:
        jobs.submit_run(dashboard.url, ["--epochs", "1"], env_vars={}, write=output.append)
    assert "failed in Ray, not in `trainflow run`" in str(caught.value) and "no such pip package" in str(caught.value)
    assert "\n" not in str(caught.value)
    with FakeDashboard(job={"status": "FAILED", "driver_exit_code": 3}, logs=("the run's own error\n",)) as dashboard:
        assert jobs.submit_run(dashboard.url, ["--epochs", "1"], env_vars={}, write=output.append) == 3
    assert "the run's own error\n" in output and output[-1].endswith("FAILED\n")
    job = dashboard.submissions[0]
    assert job["entrypoint"].endswith("flows.cli run --epochs 1")
    assert len(job["runtime_env"]["py_modules"]) == 3, job["runtime_env"]  # flows, tasks, cluster: the code travels


def submit(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run([sys.executable, "-m", "flows.cli", "submit", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env=env)


@pytest.mark.parametrize("address", ["http://127.0.0.1:{port}", "127.0.0.1:{port}"])
def test_submit_where_no_dashboard_listens_is_one_line_and_exit_2(address):
    run = submit("--address", address.format(port=free_port()), "--epochs", "1")
    errors = [line for line in run.stderr.splitlines() if line.startswith("trainflow: error:")]
    assert run.returncode == 2 and len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "http://HOST:8265" in errors[0], errors[0]
    assert run.stdout == ""


def test_the_helpers_reply_matches_rays_job_head():
    """The stand-in answers "no agent" in Ray's words, and the retry keys on them: fails when Ray rewords it."""
    job_head = importlib.util.find_spec("ray.dashboard.modules.job.job_head")  # read, not imported

    assert NO_AGENT_REPLY in Path(job_head.origin).read_text()
    assert jobs.NO_AGENT in NO_AGENT_REPLY
