"""``trainflow submit``: run the pipeline as a Ray job on a cluster, for drivers off the cluster's network.

The job's runtime_env carries this project's code (as ``trainflow run`` does
when it connects itself), its entrypoint is ``trainflow run`` with the user's
options, and the job supervisor sets ``RAY_ADDRESS``, so the run inside
connects to its own cluster. The log is followed until the job ends.

Everything here goes through Ray's public ``JobSubmissionClient``. What its
API answers wrong (no dashboard, no job agent, a job that never started, a
dashboard lost while following) becomes a one-sentence :class:`UserError`;
only a head whose job agent is still starting is waited for, a bounded time.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cluster.errors import UserError
from cluster.execution.session import TOKEN_FIX, project_runtime_env

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

# The head's job agent registers some seconds after its dashboard answers; each try already waits up to 10 s
# on the head's side before it answers "no agent", so this is about five tries.
AGENT_WAIT_S = 60.0
RETRY_EVERY_S = 2.0
# What Ray's job head answers (HTTP 500) while no job agent has registered with it.
NO_AGENT = "No available agent to submit job"


def _api_errors() -> tuple[type[BaseException], ...]:
    """What JobSubmissionClient raises when the Jobs API fails: RuntimeError for an HTTP error status,
    OSError for requests' connection errors, aiohttp's for the log stream."""
    import aiohttp

    return RuntimeError, OSError, aiohttp.ClientError


def _reason(exc: BaseException, limit: int = 240) -> str:
    """The API's answer as one short line: the last line of a server-side traceback, whitespace collapsed."""
    text = str(exc)
    if "Traceback (most recent call last)" in text:
        text = [line for line in text.splitlines() if line.strip()][-1]
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _client(address: str) -> JobSubmissionClient:
    from urllib.parse import urlsplit

    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if urlsplit(address).scheme not in ("http", "https"):  # Ray would read host:port as a GCS and wait for it
        raise UserError(f"--address {address!r} is not a dashboard URL; give the head's http://HOST:8265.")
    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise UserError(f"--address {address!r}: the Ray cluster refused this client's authentication token; "
                        f"{TOKEN_FIX}") from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"--address {address!r}: cannot reach a Ray dashboard there ({_reason(exc, 160)}); "
                        "give the head's http://HOST:8265.") from None


def submit_when_agent_ready(client: JobSubmissionClient, address: str, *, wait_s: float = AGENT_WAIT_S,
                            note: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True),
                            sleep: Callable[[float], None] = time.sleep,
                            clock: Callable[[], float] = time.monotonic, **job) -> str:
    """``client.submit_job(**job)``, tried again while the head has no job agent yet; returns the job's id.

    Raises:
        UserError: The agent did not come within ``wait_s`` seconds, or the API refused the job.
    """
    from ray.exceptions import AuthenticationError

    deadline, told = clock() + wait_s, False
    while True:
        try:
            return client.submit_job(**job)
        except AuthenticationError:
            raise UserError(f"--address {address!r}: the Ray cluster refused this client's authentication "
                            f"token; {TOKEN_FIX}") from None
        except _api_errors() as exc:
            if NO_AGENT not in str(exc):
                raise UserError(f"--address {address!r}: the Ray cluster did not accept the job "
                                f"({_reason(exc)}); fix what it names and submit again.") from None
            if clock() + RETRY_EVERY_S > deadline:
                raise UserError(
                    f"--address {address!r}: the Ray head has no job agent after {wait_s:g} s ({NO_AGENT}); "
                    "see dashboard_agent.log in the head's Ray logs (on one machine, give each node its own "
                    "--dashboard-agent-listen-port), then submit again.") from None
            if not told:
                note(f"trainflow: the Ray head's job agent is not up yet; trying again for up to {wait_s:g} s")
                told = True
        sleep(RETRY_EVERY_S)


def submit_run(address: str, run_args: list[str], *, env_vars: dict[str, str], follow: bool = True,
               write: Callable[[str], None] = sys.stdout.write, agent_wait_s: float = AGENT_WAIT_S) -> int:
    """Submit ``trainflow run RUN_ARGS`` as a Ray job; follow its log and return its exit code.

    ``env_vars`` reach the job's driver and workers (for example ``PREFECT_API_URL``, so the run shows in
    the user's Prefect UI); secrets do not belong there: nodes take credentials from their own environment.
    With ``follow=False`` return 0 once the job is accepted. Ctrl-C while following stops the job.

    Raises:
        UserError: The Jobs API failed (see :func:`submit_when_agent_ready`), the job failed before
            ``trainflow run`` started, or the dashboard went away while following.
    """
    client = _client(address)
    runtime_env = {**project_runtime_env(), "env_vars": env_vars}
    job_id = submit_when_agent_ready(client, address, wait_s=agent_wait_s, runtime_env=runtime_env,
                                     entrypoint=shlex.join(["python", "-m", "flows.cli", "run", *run_args]))
    write(f"trainflow: submitted Ray job {job_id} to {address}\n")
    if not follow:
        return 0
    try:
        return _follow_to_end(client, address, job_id, write)
    except _api_errors() as exc:
        raise UserError(f"--address {address!r}: lost the Ray dashboard while following job {job_id} "
                        f"({_reason(exc, 160)}); the job may still run: `ray job status {job_id} "
                        f"--address {address}`.") from None


def _follow_to_end(client: JobSubmissionClient, address: str, job_id: str, write: Callable[[str], None]) -> int:
    from ray.job_submission import JobStatus

    try:
        asyncio.run(_follow(client, job_id, write))
    except KeyboardInterrupt:
        client.stop_job(job_id)
        write(f"trainflow: stopped Ray job {job_id}\n")
        return 130
    info = client.get_job_info(job_id)
    write(f"trainflow: Ray job {job_id} {info.status.value}\n")
    if info.status == JobStatus.SUCCEEDED:
        return 0
    if info.status == JobStatus.FAILED and info.driver_exit_code is None:  # no exit code: Ray's failure, not the run's
        raise UserError(f"Ray job {job_id} on {address} failed in Ray, not in `trainflow run` "
                        f"({_reason(info.message or 'no reason given')}); see `ray job logs {job_id} "
                        f"--address {address}`.")
    return info.driver_exit_code or 1


async def _follow(client: JobSubmissionClient, job_id: str, write: Callable[[str], None]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        write(chunk)
