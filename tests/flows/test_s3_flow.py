"""The pipeline and the registry commands against a real S3 server, with only the AWS environment set."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.flows.test_cli import trainflow
from tests.prefectserver import api as call, start_prefect_server, stop
from tests.s3server import ACCESS_KEY, SECRET_KEY


def keys(server, prefix: str) -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=server.bucket, Prefix=prefix + "/")
    return sorted(o["Key"][len(prefix) + 1:] for page in pages for o in page.get("Contents", []))


def everything_the_server_recorded(api: str) -> str:
    """Every flow run's parameters, every log line and every artifact on a Prefect server, as one text."""
    runs = call("POST", f"{api}/flow_runs/filter", json={}).json()
    logs, offset = [], 0
    while batch := call("POST", f"{api}/logs/filter", json={"offset": offset, "limit": 200}).json():
        logs += batch
        offset += len(batch)
    artifacts = call("POST", f"{api}/artifacts/filter", json={}).json()
    assert runs and len(artifacts) >= 4 and any("epoch 8/8" in e["message"] for e in logs)  # real records
    kinds = [a["type"] for a in artifacts]
    assert "progress" in kinds and "table" in kinds and any("data:image/png;base64," in str(a["data"])
                                                             for a in artifacts)  # the confusion matrix
    return json.dumps([[r["parameters"] for r in runs], [entry["message"] for entry in logs],
                       [a["data"] for a in artifacts], [a.get("description") for a in artifacts]])


@pytest.mark.slow
@pytest.mark.timeout(600)  # about 90 s
def test_flow_on_s3_then_registry_commands(s3_server, tmp_path):
    prefix = f"runs-{uuid.uuid4().hex[:8]}"
    store = f"s3://{s3_server.bucket}/{prefix}"
    # TensorFlow here (torch runs on S3 in tests/e2e/test_ray_cluster.py): its checkpoints, release and the
    # artifacts and logs of its run on a real Prefect server
    args = ["run", "--preset", "digits-quickstart", "--epochs", "8", "--image-size", "16", "--workers", "1",
            "--framework", "tensorflow", "--store", store, "--json"]
    (tmp_path / "prefect").mkdir()
    api, server = start_prefect_server(tmp_path / "prefect")  # a real server, so its records can be scanned
    try:
        first = trainflow(*args, env={"PREFECT_API_URL": api})
        recorded = everything_the_server_recorded(api)
    finally:
        stop(server)
    assert first.returncode == 0, first.stderr[-4000:]
    summary = json.loads(first.stdout[first.stdout.index("{"):])
    assert summary["accuracy"] > 0.85 and (summary["version"], summary["promoted"]) == (1, True)
    stored = keys(s3_server, prefix)
    assert "models/seed-cnn/champion.json" in stored and "models/seed-cnn/versions/1/manifest.json" in stored
    assert any(k.startswith("prepared/") and k.endswith("/manifest.json") for k in stored)
    assert any(k.startswith("checkpoints/") and k.endswith("/model.keras") for k in stored)  # Ray wrote to S3
    assert "models/seed-cnn/versions/1/model.keras" in stored

    second = trainflow(*args)
    assert second.returncode == 0, second.stderr[-4000:]
    again = json.loads(second.stdout[second.stdout.index("{"):])
    assert [s["skipped"] for s in again["stages"]] == [True, True, True, False, True]
    assert (again["version"], again["promoted"], again["already_published"]) == (1, False, True)
    assert {k for k in keys(s3_server, prefix) if k.startswith("models/")} == {k for k in stored
                                                                               if k.startswith("models/")}

    listed = json.loads(trainflow("models", "list", "--store", store).stdout)
    assert listed == [{"name": "seed-cnn", "versions": [1], "champion": 1}]
    shown = json.loads(trainflow("models", "show", "seed-cnn", "--store", store).stdout)
    assert shown["version"] == 1 and shown["metrics"]["accuracy"] == summary["accuracy"]
    promoted = trainflow("models", "promote", "seed-cnn", "1", "--store", store, "--reason", "canary passed")
    assert promoted.returncode == 0, promoted.stderr
    assert json.loads(promoted.stdout)["version"] == 1
    shown = json.loads(trainflow("models", "show", "seed-cnn", "1", "--store", store).stdout)
    assert shown["promotions"][-1]["promoted_by"] == "manual" and shown["promotions"][-1]["reason"] == "canary passed"

    # the credentials never reach run parameters, logs, artifacts, output or anything in the store
    texts = [out.stdout + out.stderr for out in (first, second)] + [recorded, json.dumps(shown)]
    texts += [s3_server.client().get_object(Bucket=s3_server.bucket, Key=f"{prefix}/{key}")["Body"].read().decode()
              for key in stored if key.endswith((".json", ".md"))]
    assert any("seed-cnn" in text for text in texts[4:])  # lineage, cards and metrics were read
    for text in texts:
        assert SECRET_KEY not in text and ACCESS_KEY not in text


@pytest.mark.parametrize(("env", "words"), [
    ({"AWS_SECRET_ACCESS_KEY": "wrong-secret"}, ["refused the credentials", "AWS_SECRET_ACCESS_KEY"]),
    ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, ["cannot reach", "http://127.0.0.1:9"]),  # nothing listens on 9
], ids=["bad-credentials", "unreachable"])
def test_store_problems_fail_before_anything_starts_and_write_nothing(s3_server, env, words):
    prefix = f"denied-{uuid.uuid4().hex[:8]}"
    out = trainflow("run", "--store", f"s3://{s3_server.bucket}/{prefix}", timeout=120, env=env)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"trainflow: error: --store 's3://{s3_server.bucket}/"), out.stderr
    for word in words:
        assert word in lines[0]
    assert "wrong-secret" not in out.stderr
    assert keys(s3_server, prefix) == []
