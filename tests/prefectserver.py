"""A real Prefect server for the tests, and an API helper that retries the way Prefect's own client does.

The server runs `prefect server start` on 127.0.0.1 with its own PREFECT_HOME
(SQLite unless settings say otherwise) and is stopped by PID. Under load its
SQLite database answers `503 Service Unavailable` for a busy write lock;
Prefect documents that status as retryable and its client retries it, so
`api()` does the same instead of failing a test on a transient lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cluster.ports import free_port

RETRYABLE = {429, 502, 503}


def stop(process: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True, and everything in its group."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def api(method: str, url: str, json: object = None, attempts: int = 8) -> httpx.Response:
    """One Prefect API call; a retryable status is tried again with backoff (0.5 s doubling, 8 tries ≈ 60 s)."""
    delay = 0.5
    for attempt in range(attempts):
        response = httpx.request(method, url, json=json, timeout=30)
        if response.status_code not in RETRYABLE or attempt == attempts - 1:
            return response
        time.sleep(delay)
        delay = min(delay * 2, 15)
    raise AssertionError("unreachable")


def start_prefect_server(home: Path, **settings: str) -> tuple[str, subprocess.Popen]:
    """`prefect server start` on 127.0.0.1 with its own home; returns the API URL and the process."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5", "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           **settings}
    log = open(home / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    api_url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return api_url, process
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise AssertionError((home / "server.log").read_text()[-3000:])
        time.sleep(1)


def deployments(api_url: str) -> dict[str, dict]:
    return {d["name"]: d for d in api("POST", f"{api_url}/deployments/filter", json={}).json()}


def wait_for_run(api_url: str, run_id: str, timeout: float = 420) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = api("GET", f"{api_url}/flow_runs/{run_id}").json()
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or time.monotonic() > deadline:
            return run
        time.sleep(2)
