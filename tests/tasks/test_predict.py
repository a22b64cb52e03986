"""Predictions from a published model (``tasks.predict`` and ``trainflow predict``): which images, which version,
the pixels preprocess made, the checkpoint's classes, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cluster.data import load_split
from cluster.errors import UserError
from cluster.pytorch.model import predict as checkpoint_predict
from flows.cli import main
from tasks import predict
from tasks.evaluate import compute_metrics, confusion_png
from tasks.preprocess import PreprocessConfig, plan_splits
from tasks.publish import publish
from tasks.refs import Evaluation
from tasks.store import FileStore
from tests.tasks._helpers import Trained, train_small_model

PARAMS = {"data": {"kind": "folder", "image_size": 16}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A small torch model published as ``shapes`` v1 (the champion) in its own store."""
    trained = train_small_model(tmp_path_factory.mktemp("predict"))
    store = trained.store
    x, y = stored_test_split(trained)
    # scored as evaluate scores it, without its Ray task: the checkpoint's predictions of the test split
    metrics = compute_metrics(y, checkpoint_predict(store.root / trained.checkpoint_key, x), trained.prepared.classes)
    store.put_bytes("evaluations/shapes/confusion.png", confusion_png(metrics["confusion"], trained.prepared.classes))
    evaluation = Evaluation(confusion_png_uri=store.child_uri("evaluations/shapes/confusion.png"), test_size=len(y),
                            **metrics)
    assert publish(trained.model, evaluation, trained.prepared, PARAMS, store.uri, "shapes").version == 1
    return trained


def stored_test_split(trained: Trained) -> tuple[np.ndarray, np.ndarray]:
    return load_split(trained.store.root / trained.store.key_of(trained.prepared.uri), "test")


def raw_test_files(trained: Trained) -> list[Path]:
    """The raw image files of the prepared test split, in its order."""
    return [Path(p) for p, _ in plan_splits(trained.raw, PreprocessConfig(image_size=16, seed=0))["test"]]


def error_line(capsys, *argv: str) -> str:
    """Run ``trainflow`` here; assert exit code 2 and one stderr line; return that line."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("trainflow: error: "), err
    return err.strip()


def test_image_files_finds_images_recursively_and_ignores_other_files(tmp_path: Path, trained: Trained):
    source = raw_test_files(trained)
    (tmp_path / "a" / "deeper").mkdir(parents=True)
    shutil.copy(source[0], tmp_path / "a" / "one.PNG")
    shutil.copy(source[1], tmp_path / "a" / "deeper" / "two.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "deeper" / "labels.csv").write_text("x,y")
    single = tmp_path / "single.png"
    shutil.copy(source[2], single)
    files, ignored = predict.image_files([str(tmp_path / "a"), str(single), str(tmp_path / "a" / "one.PNG")])
    assert files == [tmp_path / "a" / "deeper" / "two.png", tmp_path / "a" / "one.PNG", single]  # named twice: once
    assert ignored == 2

    with pytest.raises(UserError, match=r"notes.txt is not an image: expected one of .bmp, "):
        predict.image_files([str(tmp_path / "a" / "notes.txt")])
    with pytest.raises(UserError, match=r"missing.png: no such file or folder"):
        predict.image_files([str(tmp_path / "missing.png")])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.md").write_text("#")
    with pytest.raises(UserError, match=r"empty: the folder holds no images"):
        predict.image_files([str(tmp_path / "empty")])


def test_images_are_decoded_to_the_pixels_the_model_was_trained_on(trained: Trained):
    chosen = predict.choose_version(trained.store, "shapes", None)
    x_test, _ = stored_test_split(trained)
    images = predict.load_images(raw_test_files(trained), chosen)
    assert images.dtype == np.uint8 and np.array_equal(images, x_test)


def test_predictions_are_the_checkpoints_on_the_stored_test_split(trained: Trained):
    store = trained.store
    chosen = predict.choose_version(store, "shapes", None)
    assert (chosen.name, chosen.version, chosen.champion, chosen.framework) == ("shapes", 1, True, "torch")
    assert chosen.classes == trained.prepared.classes
    files = raw_test_files(trained)
    x_test, y_test = stored_test_split(trained)
    results = predict.predict(store, chosen, files, predict.load_images(files, chosen))
    expected = checkpoint_predict(store.root / trained.checkpoint_key, x_test)
    assert [r.index for r in results] == expected.tolist()
    assert [r.label for r in results] == [trained.prepared.classes[i] for i in expected]
    assert [r.path for r in results] == [str(f) for f in files]
    assert all(1 / 3 < r.probability <= 1.0 for r in results)  # the largest of three softmax outputs
    assert np.mean(expected == y_test) > 0.9  # an easy set: the model works, so agreement is not by accident


def test_the_cli_prints_class_and_probability_per_image(tmp_path: Path, capsys, trained: Trained):
    files = raw_test_files(trained)[:4]
    for i, f in enumerate(files):
        shutil.copy(f, tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    store = str(trained.store.root)
    assert main(["predict", str(tmp_path), "--store", store, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = checkpoint_predict(trained.store.root / trained.checkpoint_key, stored_test_split(trained)[0][:4])
    assert (out["model"], out["version"], out["champion"], out["framework"]) == ("shapes", 1, True, "torch")
    assert out["ignored_files"] == 1
    assert [p["index"] for p in out["predictions"]] == expected.tolist()
    assert [p["path"] for p in out["predictions"]] == [str(tmp_path / f"{i}.png") for i in range(4)]

    assert main(["predict", str(tmp_path / "0.png"), "--store", store, "--model", "shapes", "--version", "1"]) == 0
    captured = capsys.readouterr()
    path, label, probability = captured.out.strip().split("\t")
    assert (path, label) == (str(tmp_path / "0.png"), out["predictions"][0]["class"])
    assert float(probability) == pytest.approx(out["predictions"][0]["probability"], abs=5e-5)
    assert "shapes v1 (the champion, torch)" in captured.err


def test_which_model_and_version(tmp_path: Path, trained: Trained):
    empty = FileStore(tmp_path / "empty")
    with pytest.raises(UserError, match=r"holds no published model; publish one with `trainflow run`"):
        predict.choose_model(empty, None, "seed-cnn")
    store = trained.store
    assert predict.choose_model(store, None, "seed-cnn") == "shapes"  # the only model, whatever the default
    with pytest.raises(UserError, match=r"model 'nope' is not in the store .*; it holds shapes\."):
        predict.choose_model(store, "nope", "seed-cnn")
    with pytest.raises(UserError, match=r"model 'shapes' has no published version 7 .*published: \[1\]"):
        predict.choose_version(store, "shapes", 7)

    several = FileStore(tmp_path / "several")
    shutil.copytree(store.root / "models" / "shapes", several.root / "models" / "shapes")
    shutil.copytree(store.root / "models" / "shapes", several.root / "models" / "other")
    with pytest.raises(UserError, match=r"holds several models \(other, shapes\); choose one with --model"):
        predict.choose_model(several, None, "seed-cnn")
    assert predict.choose_model(several, None, "other") == "other"  # publish's default name, when it is there


def test_a_damaged_version_is_refused_before_loading(tmp_path: Path, trained: Trained):
    store = FileStore(tmp_path / "copy")
    shutil.copytree(trained.store.root / "models", store.root / "models")
    weights = store.root / "models" / "shapes" / "versions" / "1" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:-16] + bytes(16))
    chosen = predict.choose_version(store, "shapes", None)
    files = raw_test_files(trained)[:2]
    with pytest.raises(UserError, match=r"versions/1/model.pt does not match the version's manifest"):
        predict.predict(store, chosen, files, predict.load_images(files, chosen))


def test_bad_input_is_one_line_and_exit_code_2(tmp_path: Path, capsys, trained: Trained):
    store = str(trained.store.root)
    image = str(raw_test_files(trained)[0])
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert "notes.txt is not an image" in error_line(capsys, "predict", str(tmp_path / "notes.txt"), "--store", store)
    assert "no such file or folder" in error_line(capsys, "predict", str(tmp_path / "none.png"), "--store", store)
    assert "broken.png" in error_line(capsys, "predict", str(tmp_path / "broken.png"), "--store", store)
    assert "holds no published model" in error_line(capsys, "predict", image, "--store", str(tmp_path / "empty"))
    assert "model 'nope' is not in the store" in error_line(capsys, "predict", image, "--store", store,
                                                           "--model", "nope")
    assert "has no published version 9" in error_line(capsys, "predict", image, "--store", store, "--version", "9")
