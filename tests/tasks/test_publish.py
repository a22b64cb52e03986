"""Publish: the promotion gate, version layout and manifest, lineage, the champion pointer, concurrency, and
publishing an already published model (nothing written)."""

from __future__ import annotations

import hashlib
import io
import json
import threading

import numpy as np
import pytest

from tests.tasks._helpers import EPOCHS, Trained, train_small_model
from cluster.errors import UserError
from tasks.evaluate import evaluate
from tasks.publish import gate, publish, publish_task
from tasks.registry import claim_version, published_versions, read_champion
from tasks.refs import Evaluation, Release, TrainedModel
from tasks.store import FileStore
from tests.conftest import run_threads

VERSION_FILES = {"model.pt", "state.json", "metrics.json", "lineage.json", "card.md", "confusion.png", "model.onnx",
                 "preprocessing.json"}
PARAMS = {"data": {"kind": "folder", "path": "/somewhere", "image_size": 16}, "train": {"epochs": 3, "lr": 0.01}}


# --- the gate -------------------------------------------------------------------------------------------------


def champion(acc: float, version: int = 1) -> dict:
    return {"version": version, "test_accuracy": acc}


@pytest.mark.parametrize("accuracy, current, min_improvement, promoted", [
    (0.10, None, 0.0, True),     # no champion: promote, however bad
    (0.10, None, 0.5, True),
    (0.90, champion(0.80), 0.0, True),    # better, no margin asked
    (0.90, champion(0.80), 0.05, True),   # better by more than the margin
    (0.75, champion(0.50), 0.25, True),   # exactly the margin (exact in binary floating point)
    (0.80, champion(0.80), 0.0, False),   # equal is not better
    (0.82, champion(0.80), 0.05, False),  # better but below the margin
    (0.70, champion(0.80), 0.0, False),   # worse
    (0.70, champion(0.80), -0.5, False),  # a negative margin never promotes a worse model
])
def test_gate_truth_table(accuracy, current, min_improvement, promoted):
    verdict, reason = gate(accuracy, current, min_improvement)
    assert verdict is promoted
    assert isinstance(reason, str) and reason
    if current is not None:
        assert f"v{current['version']}" in reason


# --- publishing -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return train_small_model(tmp_path_factory.mktemp("publish"))


@pytest.fixture(scope="module")
def evaluation(ray_local, trained: Trained) -> Evaluation:
    return evaluate(trained.model, trained.prepared, trained.store.uri)


def with_accuracy(evaluation: Evaluation, accuracy: float) -> Evaluation:
    return evaluation.model_copy(update={"accuracy": accuracy})


def another_run(trained: Trained, tag: str, *, same_run: bool = False) -> TrainedModel:
    """The trained weights stored again as another final checkpoint.

    By default as the checkpoint of another run (``--force`` trains a new run beside the finished one);
    ``same_run``: as another checkpoint of the same run, whose ``state.json`` records another history
    (the run trained again after its checkpoints were lost).
    """
    store = trained.store
    run_id = trained.model.run_id if same_run else f"{trained.model.run_id}-retrain-{tag}"
    key = f"checkpoints/{run_id}/checkpoint_{EPOCHS:06d}" + (f"-{tag}" if same_run else "")
    state = json.loads(store.get_bytes(f"{trained.checkpoint_key}/state.json"))
    if same_run:
        state["history"][-1]["epoch_seconds"] += 0.125
    store.put_bytes(f"{key}/state.json", json.dumps(state, indent=2).encode())
    store.put_bytes(f"{key}/model.pt", store.get_bytes(f"{trained.checkpoint_key}/model.pt"))
    return trained.model.model_copy(update={"run_id": run_id, "checkpoint_uri": store.child_uri(key)})


def snapshot(store: FileStore, name: str) -> dict[str, bytes]:
    """Every file under a model's registry folder, claims and promotion records included."""
    return {str(p.relative_to(store.root)): p.read_bytes()
            for p in sorted((store.root / "models" / name).rglob("*")) if p.is_file()}


def version_dir(store: FileStore, name: str, version: int):
    return store.root / "models" / name / "versions" / str(version)


def champion_of(store: FileStore, name: str) -> dict | None:
    return read_champion(store, name)[1]


def test_an_onnx_export_that_disagrees_with_the_framework_publishes_nothing(trained: Trained,
                                                                           evaluation: Evaluation):
    """onnxruntime's classes (made where the model trained) must be the framework's on 99.9 % of the test split."""
    store, name = trained.store, "onnx-disagrees"
    model = another_run(trained, "onnx")
    key = store.key_of(model.checkpoint_uri)
    for copied in ("model.onnx", "preprocessing.json"):
        store.put_bytes(f"{key}/{copied}", store.get_bytes(f"{trained.checkpoint_key}/{copied}"))
    with np.load(io.BytesIO(store.get_bytes(f"{trained.checkpoint_key}/predictions.npz"))) as stored:
        arrays = {k: stored[k] for k in stored.files}
    arrays["y_onnx"] = arrays["y_onnx"].copy()
    reference = arrays.get("y_exact", arrays["y_pred"])  # the framework in fp32 where it predicted in bf16
    arrays["y_onnx"][0] = (reference[0] + 1) % 3  # one test image classed otherwise
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    store.put_bytes(f"{key}/predictions.npz", buffer.getvalue())
    with pytest.raises(UserError, match=r"agrees with torch on \d+ of \d+ test images .* nothing is published"):
        publish(model, evaluation, trained.prepared, PARAMS, store.uri, name)
    assert not (store.root / "models" / name).exists()


def test_first_publish_writes_a_complete_version(trained: Trained, evaluation: Evaluation):
    store, name = trained.store, "first"
    release = publish(trained.model, evaluation, trained.prepared, PARAMS, store.uri, name)
    assert isinstance(release, Release)
    assert (release.name, release.version, release.promoted, release.champion_version) == (name, 1, True, 1)
    assert release.uri == store.child_uri(f"models/{name}/versions/1")

    directory = version_dir(store, name, 1)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["name"] == name and manifest["version"] == 1
    listed = {entry["name"]: entry for entry in manifest["files"]}
    on_disk = {p.name for p in directory.iterdir() if p.is_file()} - {"manifest.json", ".claim"}
    assert set(listed) == on_disk == VERSION_FILES
    for file_name, entry in listed.items():
        data = (directory / file_name).read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    # manifest last: every listed file is at least as old as the manifest
    manifest_mtime = (directory / "manifest.json").stat().st_mtime_ns
    assert all((directory / n).stat().st_mtime_ns <= manifest_mtime for n in listed)

    # the files are the checkpoint's and the evaluation's
    for copied in ("model.pt", "model.onnx", "preprocessing.json"):
        assert (directory / copied).read_bytes() == store.get_bytes(f"{trained.checkpoint_key}/{copied}")
    assert (directory / "state.json").read_bytes() == store.get_bytes(f"{trained.checkpoint_key}/state.json")
    assert Evaluation.model_validate_json((directory / "metrics.json").read_text()) == evaluation
    assert (directory / "confusion.png").read_bytes() == store.get_bytes(store.key_of(evaluation.confusion_png_uri))
    card = (directory / "card.md").read_text()
    assert f"# {name} v1" in card and trained.prepared.fingerprint in card and "/somewhere" in card

    lineage = json.loads((directory / "lineage.json").read_text())
    assert lineage["data_fingerprint"] == trained.prepared.fingerprint
    assert lineage["parameters"] == PARAMS
    assert lineage["run_id"] == trained.model.run_id
    assert lineage["checkpoint_uri"] == trained.model.checkpoint_uri
    assert lineage["version"] == 1
    assert "torch" in lineage["packages"] and lineage["packages"]["torch"]
    assert lineage["framework"] == "torch"
    assert lineage["packages"]["numpy"]

    assert champion_of(store, name)["version"] == 1
    assert champion_of(store, name)["test_accuracy"] == evaluation.accuracy
    assert published_versions(store, name) == [1]


def test_worse_second_version_is_published_but_not_promoted(trained: Trained, evaluation: Evaluation):
    store, name = trained.store, "second"
    first = publish(trained.model, with_accuracy(evaluation, 0.9), trained.prepared, PARAMS, store.uri, name)
    second = publish(another_run(trained, "second-2"), with_accuracy(evaluation, 0.7), trained.prepared, PARAMS,
                     store.uri, name)
    assert first.version == 1 and first.promoted
    assert second.version == 2 and not second.promoted
    assert second.champion_version == 1
    assert "0.7000" in second.reason and "v1" in second.reason
    assert (version_dir(store, name, 2) / "manifest.json").is_file()
    assert published_versions(store, name) == [1, 2]
    assert champion_of(store, name)["version"] == 1
    # an equal one is not promoted either; a better one is
    third = publish(another_run(trained, "second-3"), with_accuracy(evaluation, 0.9), trained.prepared, PARAMS,
                    store.uri, name)
    assert (third.version, third.promoted, champion_of(store, name)["version"]) == (3, False, 1)
    fourth = publish(another_run(trained, "second-4"), with_accuracy(evaluation, 0.95), trained.prepared, PARAMS,
                     store.uri, name)
    assert (fourth.version, fourth.promoted, fourth.champion_version) == (4, True, 4)
    assert champion_of(store, name) == {**champion_of(store, name), "version": 4, "test_accuracy": 0.95}


def test_min_improvement_margin(trained: Trained, evaluation: Evaluation):
    store, name = trained.store, "margin"
    publish(trained.model, with_accuracy(evaluation, 0.80), trained.prepared, PARAMS, store.uri, name)
    below = publish(another_run(trained, "margin-2"), with_accuracy(evaluation, 0.82), trained.prepared, PARAMS,
                    store.uri, name, min_improvement=0.05)
    assert not below.promoted and champion_of(store, name)["version"] == 1
    above = publish(another_run(trained, "margin-3"), with_accuracy(evaluation, 0.90), trained.prepared, PARAMS,
                    store.uri, name, min_improvement=0.05)
    assert above.promoted and champion_of(store, name)["version"] == 3


def test_published_versions_ignores_versions_without_manifest(trained: Trained, evaluation: Evaluation):
    store, name = trained.store, "partial"
    publish(trained.model, evaluation, trained.prepared, PARAMS, store.uri, name)
    store.put_bytes(f"models/{name}/versions/7/model.pt", b"half written")
    store.put_bytes(f"models/{name}/versions/7/state.json", b"{}")
    assert published_versions(store, name) == [1]
    assert published_versions(store, "nobody") == []
    # the half-written folder's number is still taken
    assert claim_version(store, name) == 8


def test_claim_version_is_unique_under_threads(tmp_path):
    store = FileStore(tmp_path / "store")
    claimed: list[int] = []
    barrier = threading.Barrier(8)
    lock = threading.Lock()

    def claim() -> None:
        barrier.wait()
        for _ in range(5):
            n = claim_version(store, "m")
            with lock:
                claimed.append(n)

    run_threads(claim, [()] * 8, timeout=60)
    assert len(claimed) == 40
    assert sorted(claimed) == list(range(1, 41))


def test_concurrent_publishers_both_land_and_the_better_one_wins(trained: Trained, evaluation: Evaluation):
    store = trained.store
    for round_ in range(3):
        name = f"race{round_}"
        accuracies = [0.6, 0.9] if round_ % 2 == 0 else [0.9, 0.6]
        models = {acc: another_run(trained, f"{name}-{acc}") for acc in accuracies}  # two runs, two checkpoints
        releases: dict[float, Release] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(2)

        def run(acc: float) -> None:
            try:
                barrier.wait()
                releases[acc] = publish(models[acc], with_accuracy(evaluation, acc), trained.prepared, PARAMS,
                                        store.uri, name)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        run_threads(run, [(acc,) for acc in accuracies], timeout=120)
        assert not errors
        assert sorted(r.version for r in releases.values()) == [1, 2]
        assert published_versions(store, name) == [1, 2]
        best = releases[0.9]
        assert best.promoted
        pointer = champion_of(store, name)
        assert pointer["version"] == best.version and pointer["test_accuracy"] == 0.9


# --- publishing a model that already is a version -------------------------------------------------------------


def test_the_same_model_again_is_already_published_and_nothing_is_written(trained: Trained, evaluation: Evaluation):
    store, name = trained.store, "again"
    first = publish(trained.model, evaluation, trained.prepared, PARAMS, store.uri, name)
    before = snapshot(store, name)
    # a re-run over unchanged data: the reused run, the same checkpoint (a better score changes nothing)
    again = publish(trained.model, with_accuracy(evaluation, 1.0), trained.prepared, PARAMS, store.uri, name)
    assert (first.version, first.promoted, first.reused) == (1, True, False)
    assert (again.version, again.promoted, again.champion_version, again.reused) == (1, False, 1, True)
    assert again.uri == first.uri
    assert again.reason.startswith("already published as v1 ") and trained.model.run_id in again.reason
    assert snapshot(store, name) == before  # no version, no claim, no promotion record, champion unmoved
    assert published_versions(store, name) == [1]
    via_task = publish_task.fn(trained.model, evaluation, trained.prepared, PARAMS, store.uri, name)
    assert (via_task.version, via_task.reused) == (1, True) and snapshot(store, name) == before


def test_another_run_or_checkpoint_is_a_new_version_and_old_ones_are_still_found(trained: Trained,
                                                                                 evaluation: Evaluation):
    store, name = trained.store, "lineage"
    assert publish(trained.model, with_accuracy(evaluation, 0.5), trained.prepared, PARAMS, store.uri, name).version == 1
    forced = publish(another_run(trained, "forced"), with_accuracy(evaluation, 0.9), trained.prepared, PARAMS,
                     store.uri, name)
    assert (forced.version, forced.promoted, forced.reused) == (2, True, False)
    retrained = publish(another_run(trained, "lost", same_run=True), with_accuracy(evaluation, 0.5), trained.prepared,
                        PARAMS, store.uri, name)
    assert (retrained.version, retrained.reused) == (3, False)
    # the first model again, now that v2 is the champion: v1 is found, and the champion stays v2
    before = snapshot(store, name)
    old = publish(trained.model, with_accuracy(evaluation, 1.0), trained.prepared, PARAMS, store.uri, name)
    assert (old.version, old.reused, old.promoted, old.champion_version) == (1, True, False, 2)
    assert old.reason.endswith("the champion stays v2")
    assert snapshot(store, name) == before


def test_a_version_without_its_manifest_does_not_count_as_published(trained: Trained, evaluation: Evaluation):
    store, name = trained.store, "unfinished"
    publish(trained.model, evaluation, trained.prepared, PARAMS, store.uri, name)
    (version_dir(store, name, 1) / "manifest.json").unlink()  # as if the publisher died before its last write
    again = publish(trained.model, evaluation, trained.prepared, PARAMS, store.uri, name)
    assert (again.version, again.reused) == (2, False)
    assert published_versions(store, name) == [2]


@pytest.mark.parametrize("name", ["", "a/b"])
def test_unusable_names_are_refused(trained: Trained, evaluation: Evaluation, name: str):
    with pytest.raises(UserError, match="model_name"):
        publish(trained.model, evaluation, trained.prepared, PARAMS, trained.store.uri, name)


def test_publish_task_fn(trained: Trained, evaluation: Evaluation):
    release = publish_task.fn(trained.model, evaluation, trained.prepared, PARAMS, trained.store.uri, "via-task")
    assert (release.version, release.promoted) == (1, True)
    assert trained.store.exists("models/via-task/versions/1/manifest.json")


def test_gate_promotes_at_exactly_the_margin_for_decimal_accuracies():
    assert gate(0.85, champion(0.80), 0.05)[0] is True
