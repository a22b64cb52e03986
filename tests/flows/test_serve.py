"""Deployments against a real Prefect server: `trainflow serve`, schedules, runs created through the API."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.prefectserver import api, deployments, start_prefect_server, stop, wait_for_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A Prefect server on SQLite, stopped by PID after the module."""
    url, process = start_prefect_server(tmp_path_factory.mktemp("prefect-home"))
    yield url
    stop(process)


@pytest.fixture(scope="module")
def served(prefect_server, tmp_path_factory):
    """`trainflow serve --every 3600` against the server; yields the store its runs publish to."""
    store = tmp_path_factory.mktemp("served") / "store"
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    log_path = store.parent / "serve.log"
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--every", "3600", "--store", str(store)],
                               cwd=ROOT, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while len(deployments(prefect_server)) < 4:
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(1)
    yield store
    stop(process)


@pytest.mark.slow
def test_nightly_schedule_is_declared_and_active(prefect_server, served):
    nightly = deployments(prefect_server)["nightly"]
    schedule = nightly["schedules"][0]
    assert schedule["active"] and schedule["schedule"]["cron"] == "0 3 * * *"
    assert schedule["schedule"]["timezone"] == "UTC"
    assert nightly["parameter_openapi_schema"]["definitions"]["TrainParams"]["properties"]["epochs"]["minimum"] == 1
    sweep = deployments(prefect_server)["sweep"]  # the same form, and the search's section
    form = sweep["parameter_openapi_schema"]["definitions"]
    assert form["TrainParams"] == nightly["parameter_openapi_schema"]["definitions"]["TrainParams"]
    assert form["SweepSection"]["properties"]["trials"]["minimum"] == 1
    assert sweep["parameters"]["params"]["sweep"]["search"] == ["lr=loguniform:0.001:0.1"]


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "tensorflow"])  # in this order, by one served process
def test_on_demand_run_through_the_api_completes_with_artifacts(prefect_server, served, framework):
    deployment = deployments(prefect_server)["on-demand"]
    params = deployment["parameters"]["params"]
    params = {**params, "data": {**params["data"], "image_size": 8},
              "train": {**params["train"], "epochs": 2, "framework": framework},
              "cluster": {**params["cluster"], "num_workers": 1}}
    response = api("POST", f"{prefect_server}/deployments/{deployment['id']}/create_flow_run",
                   json={"parameters": {"params": params}})
    assert response.status_code == 201, response.text
    run = wait_for_run(prefect_server, response.json()["id"])
    assert run["state_type"] == "COMPLETED", run["state"]
    assert run["name"] == f"digits · {framework} · 2 epochs"
    artifacts = api("POST", f"{prefect_server}/artifacts/filter",
                    json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}).json()
    kinds = sorted(a["type"] for a in artifacts)
    assert kinds.count("progress") == 1 and "table" in kinds and kinds.count("markdown") >= 3
    assert next(a for a in artifacts if a["type"] == "progress")["data"] == 100.0
    assert any("data:image/png;base64," in str(a["data"]) for a in artifacts)  # the confusion matrix
    assert (served / "models" / "seed-cnn" / "champion.json").exists()
    checkpoints = {p.name for p in (served / "checkpoints").glob("*/checkpoint_*/*")}
    assert {"torch": "model.pt", "tensorflow": "model.keras"}[framework] in checkpoints


@pytest.mark.slow
def test_prepare_deployment_writes_prepared_data_into_the_store(prefect_server, served):
    deployment = deployments(prefect_server)["prepare"]
    params = deployment["parameters"]["params"]
    assert params["store"] == str(served) and params["data"]["kind"] == "digits"
    params = {**params, "data": {**params["data"], "image_size": 10}}
    response = api("POST", f"{prefect_server}/deployments/{deployment['id']}/create_flow_run",
                   json={"parameters": {"params": params}})
    assert response.status_code == 201, response.text
    run = wait_for_run(prefect_server, response.json()["id"])
    assert run["state_type"] == "COMPLETED", run["state"]
    assert run["name"] == "digits · 10 px"
    manifests = list((served / "prepared").glob("*/manifest.json"))
    assert any(json.loads(m.read_text())["image_size"] == 10 for m in manifests)


@pytest.mark.slow
def test_invalid_parameters_are_refused_before_a_run_starts(prefect_server, served):
    deployment = deployments(prefect_server)["on-demand"]
    params = deployment["parameters"]["params"]
    for bad in ({"train": {**params["train"], "epochs": 0}}, {"train": {**params["train"], "framework": "caffe"}}):
        response = api("POST", f"{prefect_server}/deployments/{deployment['id']}/create_flow_run",
                       json={"parameters": {"params": {**params, **bad}}})
        assert response.status_code == 409, response.text
        assert "Validation failed" in response.text or "validation" in response.text.lower()


@pytest.mark.slow
def test_interval_deployment_starts_a_run_by_itself(prefect_server, served):
    interval = deployments(prefect_server)["interval"]
    deadline = time.monotonic() + 420
    while True:
        runs = api("POST", f"{prefect_server}/flow_runs/filter",
                   json={"flow_runs": {"deployment_id": {"any_": [interval["id"]]}}}).json()
        done = [r for r in runs if r["state_type"] == "COMPLETED"]
        if done or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert done, [(r["name"], r["state_type"]) for r in runs]
    assert done[0]["auto_scheduled"]


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def form_property(page, title: str):
    """One parameter's block in Prefect's run form, found by its title."""
    return page.locator(f"xpath=//*[normalize-space(text())='{title} (Optional)']"
                        "/ancestor::*[contains(concat(' ', @class, ' '), ' schema-form-property ')][1]")


def choose(page, title: str, option: str) -> None:
    """Pick an enum value in the form's select: open it from the keyboard, then click the option.

    Playwright's pointer click lands while the options pop-over is still moving into place,
    so the option receives a DOM click event instead.
    """
    select = form_property(page, title)
    select.locator("button.p-select-button__control").focus()
    page.keyboard.press("ArrowDown")
    page.get_by_role("option", name=option, exact=True).dispatch_event("click")
    from playwright.sync_api import expect

    expect(select.locator(".p-select-button__value")).to_have_text(option)


@pytest.mark.slow
def test_custom_run_from_the_browser_completes_with_artifacts(prefect_server, served, image_folder, tmp_path):
    """Headless Chromium: open the deployment, open the custom-run form, choose a dataset and epochs, submit, wait."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    images = image_folder("browser-images", classes=3, per_class=30, size=12)
    ui = prefect_server.removesuffix("/api")
    deployment = deployments(prefect_server)["on-demand"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{ui}/deployments", wait_until="networkidle")
        page.get_by_role("link", name="on-demand").first.click()
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run", exact=True).click()
        page.wait_for_url(re.compile(r".*/run\?.*"))
        page.wait_for_load_state("networkidle")
        choose(page, "Dataset", "folder")
        for title, value in (("Dataset path", str(images)), ("Image size", "8"), ("Epochs", "3"), ("Ray workers", "1")):
            form_property(page, title).locator("input, textarea").first.fill(value)
        page.get_by_role("button", name="Submit").click()

        deadline = time.monotonic() + 60
        while True:
            runs = api("POST", f"{prefect_server}/flow_runs/filter", json={
                "flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}}).json()
            mine = [r for r in runs if r["parameters"]["params"]["train"]["epochs"] == 3]
            if mine or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert len(mine) == 1, "the form did not create a run"
        params = mine[0]["parameters"]["params"]
        assert (params["data"]["kind"], params["data"]["path"]) == ("folder", str(images))
        assert (params["data"]["image_size"], params["cluster"]["num_workers"]) == (8, 1)
        run = wait_for_run(prefect_server, mine[0]["id"])
        assert run["state_type"] == "COMPLETED", run["state"]
        assert run["name"] == "folder:browser-images · torch · 3 epochs"

        page.goto(f"{ui}/runs/flow-run/{run['id']}", wait_until="networkidle")
        page.get_by_text("Completed").first.wait_for()
        page.screenshot(path=str(tmp_path / "finished-run.png"), full_page=True)
        browser.close()
    assert (tmp_path / "finished-run.png").stat().st_size > 10_000
    artifacts = api("POST", f"{prefect_server}/artifacts/filter",
                    json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}).json()
    assert next(a for a in artifacts if a["type"] == "progress")["data"] == 100.0
    assert any(a["type"] == "table" for a in artifacts)
    assert any(a["type"] == "markdown" and "data:image/png;base64," in a["data"] for a in artifacts)


@pytest.mark.slow
def test_ctrl_c_ends_serve_even_when_the_runner_cannot_stop(prefect_server, tmp_path):
    """A runner whose shutdown hangs (here: pausing the schedules never returns, as on a server that stopped
    answering) is ended by the watchdog STOP_GRACE_S after the Ctrl-C, with a line that says so."""
    code = ("import asyncio, flows.deployments as d; from prefect.runner import Runner\n"
            "async def stuck(self): await asyncio.sleep(3600)\n"
            "Runner._pause_schedules = stuck; d.STOP_GRACE_S = 2.0; d.serve_all()")
    log = tmp_path / "serve.log"
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=open(log, "w"),
                               stderr=subprocess.STDOUT, env={**os.environ, "PREFECT_API_URL": prefect_server},
                               start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while "Your deployments are being served" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130, log.read_text()[-3000:]
        assert time.monotonic() - interrupted < 15
        output = log.read_text()
        assert "trainflow: stopping: pausing the deployments' schedules" in output
        assert "did not stop within 2 s; exiting without it" in output
    finally:
        stop(process)
