"""`trainflow up`, a run that uses what it started, and `trainflow down`: real processes, stopped by PID."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from cluster.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def trainflow(*args: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def raylet_node_id(ray_start_pid: int) -> str:
    """The node id on the command line of the raylet under `trainflow up`'s `ray start` process."""
    for proc in psutil.Process(ray_start_pid).children(recursive=True):
        argv = proc.cmdline()
        if argv and argv[0].endswith("/raylet"):
            return next(arg.split("=", 1)[1] for arg in argv if arg.startswith("--node_id="))
    raise AssertionError("no raylet under `ray start`")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_up_then_runs_use_its_server_and_ray_and_down_stops_only_them(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "RAY_ADDRESS")}
    env["TRAINFLOW_HOME"] = str(tmp_path / "home")
    env["PREFECT_HOME"] = str(tmp_path / "prefect")  # a database of its own: the only flow run is this test's
    started = trainflow("up", "--prefect-port", str(free_port()), "--cpus", "2", env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    state = json.loads((tmp_path / "home" / "services.json").read_text())
    ours = [psutil.Process(state[name]["pid"]) for name in ("prefect", "ray")]
    ours += [child for proc in ours for child in proc.children(recursive=True)]
    try:
        assert "already up" in trainflow("up", env=env).stdout  # a second `up` starts nothing
        assert oct((tmp_path / "home" / "ray_token").stat().st_mode & 0o777) == "0o600"

        run = trainflow("run", "--preset", "smoke", "--store", str(tmp_path / "store"), "--json", env=env)
        assert run.returncode == 0, run.stderr[-4000:]
        assert "using `trainflow up`'s Prefect server" in run.stderr
        # the run is in up's server (its UI lists it) ...
        listed = httpx.post(f"{state['prefect_url']}/flow_runs/filter", json={}, timeout=30).json()
        assert [r["state"]["type"] for r in listed] == ["COMPLETED"], listed
        # ... with its logs, up to the flow engine's last line
        logs = httpx.post(f"{state['prefect_url']}/logs/filter", timeout=30, json={
            "logs": {"flow_run_id": {"any_": [listed[0]["id"]]}}, "sort": "TIMESTAMP_DESC", "limit": 50}).json()
        assert any("Finished in state Completed" in log["message"] for log in logs), [log["message"] for log in logs]
        # ... and its workers ran on up's Ray node
        lineage = json.loads(next((tmp_path / "store" / "models").glob("*/versions/1/lineage.json")).read_text())
        assert {w["node_id"] for w in lineage["workers"]} == {raylet_node_id(state["ray"]["pid"])}
        # a run the CLI did not start (the flow called as `trainflow serve` or a Prefect worker calls it) trains
        # on up's Ray as well, instead of starting a Ray of its own
        code = ("import sys; from flows.params import build_params; from flows.pipeline import train_pipeline; "
                "train_pipeline(build_params('smoke', {'publish': {'store': sys.argv[1]}}))")
        served = subprocess.run([sys.executable, "-c", code, str(tmp_path / "served")], cwd=ROOT, timeout=300,
                                env={**env, "PREFECT_API_URL": state["prefect_url"]}, capture_output=True, text=True)
        assert served.returncode == 0, served.stderr[-4000:]
        lineage = json.loads(next((tmp_path / "served" / "models").glob("*/versions/1/lineage.json")).read_text())
        assert {w["node_id"] for w in lineage["workers"]} == {raylet_node_id(state["ray"]["pid"])}
    finally:
        stopped = trainflow("down", env=env)
    assert stopped.returncode == 0 and "stopped prefect" in stopped.stdout, stopped.stdout + stopped.stderr
    _, alive = psutil.wait_procs(ours, timeout=10)
    assert not alive, [" ".join(p.cmdline()[:3]) for p in alive]
    assert not (tmp_path / "home" / "services.json").exists()
    assert "nothing to stop" in trainflow("down", env=env).stdout
