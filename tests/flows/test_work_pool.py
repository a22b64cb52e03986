"""deploy/prefect.yaml, as the README says to use it: a process work pool, `prefect deploy`, a worker."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.flows.test_serve import ROOT
from tests.prefectserver import api as call, deployments, start_prefect_server, stop, wait_for_run


@pytest.mark.slow
def test_prefect_yaml_deploys_and_a_process_worker_runs_it(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    api, server = start_prefect_server(home)
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(home), "PWD": str(ROOT),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "2"}
    prefect = [sys.executable, "-m", "prefect"]
    worker = None
    try:
        for cmd in (["work-pool", "create", "trainflow", "--type", "process"],
                    ["--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml"]):
            out = subprocess.run(prefect + cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
            assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        found = deployments(api)
        assert set(found) == {"nightly", "on-demand", "prepare", "sweep"}
        assert found["sweep"]["parameters"]["params"]["sweep"]["trials"] == 8
        schedule = found["nightly"]["schedules"][0]["schedule"]
        assert (schedule["cron"], schedule["timezone"]) == ("0 3 * * *", "UTC")
        assert found["on-demand"]["parameters"]["params"]["train"] == {"epochs": 12, "lr": 0.01}

        worker = subprocess.Popen(prefect + ["worker", "start", "--pool", "trainflow"], cwd=ROOT, env=env,
                                  stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        smoke = {"data": {"kind": "digits", "image_size": 8}, "train": {"epochs": 1, "lr": 0.01},
                 "cluster": {"num_workers": 1}, "publish": {"store": str(tmp_path / "store")}}
        response = call("POST", f"{api}/deployments/{found['on-demand']['id']}/create_flow_run",
                        json={"parameters": {"params": smoke}})
        assert response.status_code == 201, response.text
        run = wait_for_run(api, response.json()["id"])
        assert run["state_type"] == "COMPLETED", (run["state"], (tmp_path / "worker.log").read_text()[-3000:])
        assert (tmp_path / "store" / "models" / "seed-cnn" / "champion.json").exists()
    finally:
        if worker is not None:
            stop(worker)
        stop(server)
