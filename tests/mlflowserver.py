"""A real MLflow tracking server for the tests: `mlflow server`, SQLite backend, artifacts in SeaweedFS.

Full MLflow runs from a venv of its own (.venv/mlflow-server, which `make test` builds from
deploy/mlflow-server.txt); the project talks to it with its client (mlflow-skinny). Clients send artifacts
through the server (``mlflow-artifacts:``), which alone holds the S3 credentials. Bound to 127.0.0.1,
stopped by PID.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from cluster.ports import free_port
from tests.prefectserver import stop
from tests.s3server import S3Server

SERVER_BIN = Path(sys.prefix) / "mlflow-server" / "bin" / "mlflow"


@dataclass
class MlflowServer:
    uri: str
    artifacts: str  # where the server keeps artifacts: s3://BUCKET/PREFIX in SeaweedFS
    process: subprocess.Popen
    log: Path

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def stop(self) -> None:
        stop(self.process)


def unavailable() -> str | None:
    """Why no server can start here, or None."""
    if not SERVER_BIN.exists():
        return f"{SERVER_BIN} is missing: `make test` builds it from deploy/mlflow-server.txt"
    return None


def start(workdir: Path, s3: S3Server, timeout: float = 120) -> MlflowServer:
    """Start the server and wait until it answers its health check."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    artifacts = f"s3://{s3.bucket}/mlflow-artifacts"
    # no job execution (MLflow's GenAI jobs, which the tests never run): without it the server starts eight idle
    # job consumers that poll for the rest of the session
    env = {**os.environ, **s3.env(), "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = workdir / "mlflow.log"
    command = [str(SERVER_BIN), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--artifacts-destination", artifacts]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=workdir, env=env, start_new_session=True)
    server = MlflowServer(uri=f"http://127.0.0.1:{port}", artifacts=artifacts, process=process, log=log)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{server.uri}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"mlflow server did not start; the end of {log}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
