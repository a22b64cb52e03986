"""The same run locally and on a real two-node Ray cluster (one CPU per node), as JSON with the ratio.

Starts SeaweedFS and the cluster the tests use (tests/s3server.py,
tests/raycluster.py; the second node hidden from this checkout and the stores
when `unshare` is permitted), then runs `trainflow run` twice with the same
parameters and an S3 store: first with a local Ray (2 workers on this
machine), then with `--ray-address` (2 workers placed SPREAD). Wall time,
time inside epochs and the rest come from each run's own summary.

    .venv/bin/python bench/cluster_run.py [--epochs 6]
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

from tests import raycluster, s3server  # noqa: E402

RUN = ["run", "--dataset", "digits", "--image-size", "16", "--lr", "0.01", "--workers", "2", "--json"]


def timed_run(args: list[str], env: dict[str, str], cwd: Path) -> dict:
    started = time.perf_counter()
    out = subprocess.run([str(Path(sys.executable).parent / "trainflow"), *args], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"trainflow {' '.join(args)} failed:\n{out.stderr[-4000:]}")
    summary = json.loads(out.stdout[out.stdout.index("{\n"):])
    stages = {s["name"]: round(s["seconds"], 1) for s in summary["stages"]}
    return {"wall_s": round(wall, 1), "epochs_s": round(summary["training_seconds"], 1),
            "outside_epochs_s": round(wall - summary["training_seconds"], 1), "stages_s": stages,
            "nodes": summary["nodes"], "accuracy": summary["accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    s3 = s3server.start(work / "s3")
    cache = work / "cache"
    env = {**os.environ, **s3.env(), "TRAINFLOW_CACHE_DIR": str(cache), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("RAY_ADDRESS", None)
    node_env = {**s3.env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                "TRAINFLOW_CACHE_DIR": str(cache)}
    cluster = raycluster.start_cluster(work / "cluster", hidden_paths=[cache], node_env=node_env)
    try:
        cluster.add_node(num_cpus=1, hidden=raycluster.hiding_unsupported() is None)
        epochs = ["--epochs", str(args.epochs)]
        local = timed_run([*RUN, *epochs, "--store", f"s3://{s3.bucket}/local"],
                          {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, work)
        remote_env = {k: v for k, v in {**env, **cluster.env}.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        remote = timed_run([*RUN, *epochs, "--store", f"s3://{s3.bucket}/cluster", "--ray-address",
                            cluster.gcs_address, "--placement-strategy", "SPREAD"], remote_env, work)
    finally:
        cluster.stop()
        s3.stop()
    print(json.dumps({"local": local, "two_nodes": remote,
                      "wall_ratio_two_nodes_vs_local": round(remote["wall_s"] / local["wall_s"], 2),
                      "epochs_ratio_two_nodes_vs_local": round(remote["epochs_s"] / local["epochs_s"], 2)}, indent=2))


if __name__ == "__main__":
    main()
