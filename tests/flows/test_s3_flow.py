"""The pipeline and the registry commands against a real S3 server, with only the AWS environment set."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.flows.test_cli import trainflow
from tests.s3server import SECRET_KEY


def keys(server, prefix: str) -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=server.bucket, Prefix=prefix + "/")
    return sorted(o["Key"][len(prefix) + 1:] for page in pages for o in page.get("Contents", []))


@pytest.mark.slow
def test_flow_on_s3_then_registry_commands(s3_server):
    prefix = f"runs-{uuid.uuid4().hex[:8]}"
    store = f"s3://{s3_server.bucket}/{prefix}"
    args = ["run", "--preset", "digits-quickstart", "--epochs", "8", "--image-size", "16", "--workers", "1",
            "--store", store, "--json"]
    first = trainflow(*args)
    assert first.returncode == 0, first.stderr[-4000:]
    summary = json.loads(first.stdout[first.stdout.index("{"):])
    assert summary["accuracy"] > 0.85 and (summary["version"], summary["promoted"]) == (1, True)
    stored = keys(s3_server, prefix)
    assert "models/seed-cnn/champion.json" in stored and "models/seed-cnn/versions/1/manifest.json" in stored
    assert any(k.startswith("prepared/") and k.endswith("meta.json") for k in stored)
    assert any(k.startswith("checkpoints/") and k.endswith("/model.pt") for k in stored)  # Ray wrote to S3

    second = trainflow(*args)
    assert second.returncode == 0, second.stderr[-4000:]
    again = json.loads(second.stdout[second.stdout.index("{"):])
    assert [s["skipped"] for s in again["stages"]] == [True, True, True, False, False]
    assert (again["version"], again["promoted"]) == (2, False)

    listed = json.loads(trainflow("models", "list", "--store", store).stdout)
    assert listed == [{"name": "seed-cnn", "versions": [1, 2], "champion": 1}]
    shown = json.loads(trainflow("models", "show", "seed-cnn", "--store", store).stdout)
    assert shown["version"] == 1 and shown["metrics"]["accuracy"] == summary["accuracy"]
    promoted = trainflow("models", "promote", "seed-cnn", "2", "--store", store, "--reason", "canary passed")
    assert promoted.returncode == 0, promoted.stderr
    assert json.loads(promoted.stdout)["version"] == 2
    shown = json.loads(trainflow("models", "show", "seed-cnn", "2", "--store", store).stdout)
    assert shown["promotions"][-1]["promoted_by"] == "manual" and shown["promotions"][-1]["reason"] == "canary passed"

    for out in (first, second):  # the secret never reaches logs, output or the published lineage
        assert SECRET_KEY not in out.stdout + out.stderr
    assert SECRET_KEY not in json.dumps(shown)


def test_wrong_secret_fails_before_anything_starts_and_writes_nothing(s3_server):
    prefix = f"denied-{uuid.uuid4().hex[:8]}"
    out = trainflow("run", "--store", f"s3://{s3_server.bucket}/{prefix}", timeout=120,
                    env={"AWS_SECRET_ACCESS_KEY": "wrong-secret"})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused the credentials" in lines[0] and "AWS_SECRET_ACCESS_KEY" in lines[0]
    assert "wrong-secret" not in out.stderr
    assert keys(s3_server, prefix) == []
