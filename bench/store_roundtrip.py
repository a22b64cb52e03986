#!/usr/bin/env python3
"""Artifact-store throughput: a 50 MB object through the S3 store and the folder store.

Starts a local SeaweedFS (the tests' S3 server) on 127.0.0.1, then times
``put_file`` and ``get_file`` (multipart, sha256-verified) of a 50 MB file
through ``S3Store`` and, as the baseline in the same run, through ``FileStore``.
With ``--flow`` it also times a whole ``trainflow run`` on the bundled digits
(1 worker, 8 epochs, 16 px) with ``--store s3://…`` and with a folder store.
Prints one JSON object; best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.store import open_store  # noqa: E402
from tests import s3server  # noqa: E402

SIZE = 50 * 1024 * 1024


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def roundtrip(store, work: Path, repeats: int) -> dict:
    source = work / "payload.bin"
    up = min(timed(lambda: store.put_file("bench/payload.bin", source)) for _ in range(repeats))
    down = min(timed(lambda: store.get_file("bench/payload.bin", work / "back.bin")) for _ in range(repeats))
    assert (work / "back.bin").read_bytes() == source.read_bytes()
    return {"upload_MB_per_s": round(SIZE / up / 1e6, 1), "download_MB_per_s": round(SIZE / down / 1e6, 1)}


def flow_seconds(store: str, env: dict[str, str]) -> float:
    cmd = [sys.executable, "-m", "flows.cli", "run", "--preset", "digits-quickstart", "--epochs", "8",
           "--image-size", "16", "--workers", "1", "--store", store, "--json"]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=1200)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return round(time.perf_counter() - start, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flow", action="store_true", help="also time the digits flow on S3 vs a folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="trainflow-store-bench-") as tmp:
        work = Path(tmp)
        (work / "payload.bin").write_bytes(os.urandom(SIZE))
        server = s3server.start(work / "seaweedfs")
        try:
            os.environ.update(server.env())
            result = {
                "object_MB": SIZE / 1e6,
                "s3": roundtrip(open_store(f"s3://{server.bucket}/bench"), work, args.repeats),
                "folder": roundtrip(open_store(str(work / "folder-store")), work, args.repeats),
                "s3_server": "SeaweedFS (weed mini) on 127.0.0.1",
            }
            if args.flow:
                cache = {"TRAINFLOW_CACHE_DIR": str(work / "cache")}
                result["digits_flow_s"] = {"s3": flow_seconds(f"s3://{server.bucket}/flow", cache),
                                           "folder": flow_seconds(str(work / "flow-store"), cache)}
        finally:
            server.stop()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
