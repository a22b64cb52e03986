"""``trainflow submit``: run the pipeline as a Ray job on a cluster, for drivers off the cluster's network.

The job's runtime_env carries this project's code (as ``trainflow run`` does
when it connects itself), its entrypoint is ``trainflow run`` with the user's
options, and the job supervisor sets ``RAY_ADDRESS``, so the run inside
connects to its own cluster. The log is followed until the job ends.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
from collections.abc import Callable

from cluster.errors import UserError
from cluster.runtime import TOKEN_FIX, project_runtime_env


def _client(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise UserError(f"--address {address!r}: the Ray cluster refused this client's authentication token; "
                        f"{TOKEN_FIX}") from None
    except (ConnectionError, RuntimeError) as exc:
        raise UserError(f"--address {address!r}: cannot reach a Ray dashboard there "
                        f"({' '.join(str(exc).split())[:160]}); give the head's http://HOST:8265.") from None


def submit_run(address: str, run_args: list[str], *, env_vars: dict[str, str], follow: bool = True,
               write: Callable[[str], None] = sys.stdout.write) -> int:
    """Submit ``trainflow run RUN_ARGS`` as a Ray job; follow its log and return its exit code.

    ``env_vars`` reach the job's driver and workers (for example ``PREFECT_API_URL``, so the run shows in
    the user's Prefect UI); secrets do not belong there: nodes take credentials from their own environment.
    With ``follow=False`` return 0 once the job is accepted. Ctrl-C while following stops the job.
    """
    from ray.job_submission import JobStatus

    client = _client(address)
    runtime_env = {**project_runtime_env(), "env_vars": env_vars}
    job_id = client.submit_job(entrypoint=shlex.join(["python", "-m", "flows.cli", "run", *run_args]),
                               runtime_env=runtime_env)
    write(f"trainflow: submitted Ray job {job_id} to {address}\n")
    if not follow:
        return 0
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
    return info.driver_exit_code or 1


async def _follow(client, job_id: str, write: Callable[[str], None]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        write(chunk)
