"""S3 specifics against a real server: credentials, integrity, ingest from a prefix."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cluster.errors import UserError
from tasks.ingest import check_source, ingest
from tasks.store import open_store
from tests.conftest import make_tar, run_threads


def upload_folder(server, local: Path, prefix: str) -> None:
    client = server.client()
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(path), server.bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


def test_wrong_secret_is_one_clear_error_and_writes_nothing(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = open_store(f"s3://{s3_server.bucket}/wrong-secret")
    with pytest.raises(UserError, match="refused the credentials.*AWS_SECRET_ACCESS_KEY"):
        store.check()
    with pytest.raises(UserError, match="refused the credentials"):
        store.put_bytes("x", b"1")
    listed = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="wrong-secret/")
    assert listed.get("KeyCount", 0) == 0
    assert "not-the-secret" not in str(store.__dict__.get("uri"))


def test_missing_bucket_and_missing_name_are_user_errors(s3_server):
    with pytest.raises(UserError, match="does not exist"):
        open_store("s3://no-such-bucket-here/x").check()
    with pytest.raises(UserError, match="names no bucket"):
        open_store("s3://")


def test_a_corrupted_object_is_detected_on_read(s3_server, tmp_path):
    store = open_store(f"s3://{s3_server.bucket}/corrupt")
    store.put_bytes("obj", b"good bytes")
    s3_server.client().put_object(Bucket=s3_server.bucket, Key="corrupt/obj", Body=b"evil bytes",
                                  Metadata={"sha256": hashlib.sha256(b"good bytes").hexdigest()})
    with pytest.raises(OSError, match="corrupt"):
        store.get_bytes("obj")
    with pytest.raises(OSError, match="corrupt"):
        store.get_file("obj", tmp_path / "obj")
    assert not (tmp_path / "obj").exists()


def test_an_s3_prefix_is_read_in_place_and_prepares_the_local_folders_shards(s3_server, image_folder, tmp_path):
    """Ingest lists the prefix (nothing lands on this disk) and the decoding reads each object from S3: the
    shards are the bytes a local copy gives; the raw fingerprint follows the listing."""
    from tasks.preprocess import PreprocessConfig, preprocess

    local = image_folder("pets", classes=3, per_class=10)
    (local / "class_0" / "README.txt").write_text("ignored")
    upload_folder(s3_server, local, "datasets/pets/wrapper")  # a lone wrapper folder is stepped through
    source = f"folder:s3://{s3_server.bucket}/datasets/pets"
    check_source(source)
    remote = ingest(source, tmp_path / "cache")
    assert remote.counts == {"all": 30} and remote.classes == ("class_0", "class_1", "class_2")
    assert remote.ignored_files == 1
    assert remote.origin == f"s3://{s3_server.bucket}/datasets/pets"
    assert remote.splits == {"all": f"{remote.origin}/wrapper"}
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # read in place: no copy here
    assert ingest(source, tmp_path / "cache").fingerprint == remote.fingerprint

    cfg = PreprocessConfig(image_size=12)
    prepared = preprocess(remote, cfg, str(tmp_path / "store"))
    assert prepared.fingerprint == preprocess(ingest(f"folder:{local}", tmp_path / "cache"), cfg,
                                              str(tmp_path / "local-store")).fingerprint

    s3_server.client().put_object(Bucket=s3_server.bucket, Key="datasets/pets/wrapper/class_1/0000.png",
                                  Body=(local / "class_2" / "0000.png").read_bytes())
    with pytest.raises(UserError, match="changed since it was ingested"):
        preprocess(remote, cfg, str(tmp_path / "store-2"))  # the listing the fingerprint named is gone
    changed = ingest(source, tmp_path / "cache")
    assert changed.fingerprint != remote.fingerprint
    assert preprocess(changed, cfg, str(tmp_path / "store")).fingerprint != prepared.fingerprint


def test_an_s3_prefix_of_split_archives_is_downloaded_to_be_unpacked(s3_server, image_folder, tmp_path):
    local = image_folder("splits", classes=2, per_class=6)
    for split in ("train", "val"):
        archive = make_tar(local, tmp_path / f"{split}.tar.gz", arcname=split)
        s3_server.client().upload_file(str(archive), s3_server.bucket, f"archived/{split}.tar.gz")
    raw = ingest(f"folder:s3://{s3_server.bucket}/archived", tmp_path / "cache")
    assert raw.origin is None and raw.counts == {"train": 12, "test": 12}  # val/ is the test split
    assert all(Path(d).is_relative_to(tmp_path / "cache") for d in raw.splits.values())


def test_ingest_from_an_empty_prefix_says_so(s3_server, tmp_path):
    with pytest.raises(UserError, match="no objects under that prefix"):
        ingest(f"folder:s3://{s3_server.bucket}/nothing-here", tmp_path / "cache")


def test_credentials_come_only_from_the_environment(s3_server, monkeypatch, tmp_path):
    """The store finds the server and its keys through the standard AWS chain alone; parameters have no place for them."""
    uri = f"s3://{s3_server.bucket}/from-env"
    open_store(uri).put_bytes("probe", b"found")  # nothing but AWS_ENDPOINT_URL names this server
    assert s3_server.client().get_object(Bucket=s3_server.bucket, Key="from-env/probe")["Body"].read() == b"found"

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to wait for either
    with pytest.raises(UserError, match="no AWS credentials found"):
        open_store(uri).check()

    from flows.params import PipelineParams

    fields = str(PipelineParams.model_json_schema()).lower()
    assert "secret" not in fields and "access_key" not in fields and "endpoint" not in fields


def test_concurrent_publishers_on_s3_never_both_become_champion(s3_server, ray_local, tmp_path):
    """Two publishers race on one S3 registry: distinct versions, manifests complete, the better one wins."""
    import threading

    from tasks.evaluate import evaluate
    from tasks.publish import publish
    from tasks.registry import published_versions, read_champion
    from tests.tasks._helpers import train_small_model

    trained = train_small_model(tmp_path / "train")
    evaluation = evaluate(trained.model, trained.prepared, trained.store.uri)
    s3 = open_store(f"s3://{s3_server.bucket}/race-{tmp_path.name[-12:]}")
    for key in trained.store.list("evaluations"):
        s3.put_bytes(key, trained.store.get_bytes(key))
    models = {}
    for accuracy in (0.6, 0.9):  # two training runs: one model published twice would be one version
        run_id = f"{trained.model.run_id}-retrain-{accuracy:.1f}"
        key = trained.checkpoint_key.replace(trained.model.run_id, run_id)
        for file_name in ("state.json", "model.pt"):
            s3.put_bytes(f"{key}/{file_name}", trained.store.get_bytes(f"{trained.checkpoint_key}/{file_name}"))
        models[accuracy] = trained.model.model_copy(update={"run_id": run_id, "checkpoint_uri": s3.child_uri(key)})
    png = s3.child_uri(trained.store.key_of(evaluation.confusion_png_uri))
    for round_, accuracies in enumerate(([0.6, 0.9], [0.9, 0.6])):
        name = f"race{round_}"
        releases, errors = {}, []
        barrier = threading.Barrier(2)

        def run(accuracy: float) -> None:
            try:
                barrier.wait()
                result = evaluation.model_copy(update={"accuracy": accuracy, "confusion_png_uri": png})
                releases[accuracy] = publish(models[accuracy], result, trained.prepared, {}, s3.uri, name)
            except BaseException as exc:  # reported below
                errors.append(exc)

        run_threads(run, [(a,) for a in accuracies], timeout=120)
        assert not errors, errors
        assert published_versions(s3, name) == [1, 2]
        assert read_champion(s3, name)[1]["version"] == releases[0.9].version
        manifest = json.loads(s3.get_bytes(f"models/{name}/versions/{releases[0.6].version}/manifest.json"))
        for entry in manifest["files"]:
            data = s3.get_bytes(f"models/{name}/versions/{releases[0.6].version}/{entry['name']}")
            assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["size"]
