"""Evaluate: metrics by hand, the confusion PNG, and scoring a real (Ray-free) trained checkpoint."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.tasks._helpers import Trained, train_small_model
from cluster.data import load_split
from cluster.pytorch.model import predict
from cluster.worker.checkpoint import PREDICTIONS_FILE
from tasks.evaluate import compute_metrics, confusion_png, evaluate, evaluate_task

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_compute_metrics_by_hand():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2])
    m = compute_metrics(y_true, y_pred, ("a", "b", "c"))
    assert m["confusion"] == ((2, 1, 0), (0, 1, 1), (0, 0, 1))
    assert m["accuracy"] == pytest.approx(4 / 6)
    # precision: a 2/2, b 1/2, c 1/2; recall: a 2/3, b 1/2, c 1/1
    assert m["precision_macro"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["recall_macro"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 * 1 / 1.5]
    assert m["f1_macro"] == pytest.approx(sum(f1) / 3)
    per_class = m["per_class"]
    assert [c.name for c in per_class] == ["a", "b", "c"]
    assert [c.support for c in per_class] == [3, 2, 1]
    assert [c.precision for c in per_class] == pytest.approx([1, 0.5, 0.5])
    assert [c.recall for c in per_class] == pytest.approx([2 / 3, 0.5, 1])
    assert [c.f1 for c in per_class] == pytest.approx(f1)
    assert isinstance(m["accuracy"], float) and all(isinstance(v, int) for row in m["confusion"] for v in row)


def test_compute_metrics_counts_absent_classes():
    m = compute_metrics(np.array([0, 1, 1]), np.array([0, 1, 1]), ("a", "b", "c"))
    assert m["accuracy"] == 1.0
    assert m["confusion"] == ((1, 0, 0), (0, 2, 0), (0, 0, 0))  # one row and column per class, even unseen ones
    assert m["precision_macro"] == pytest.approx(2 / 3)  # the absent class scores 0, not an error
    assert m["per_class"][2].support == 0


def test_compute_metrics_all_wrong():
    m = compute_metrics(np.array([0, 1]), np.array([1, 0]), ("a", "b"))
    assert m["accuracy"] == 0.0 and m["f1_macro"] == 0.0
    assert m["confusion"] == ((0, 1), (1, 0))


@pytest.mark.parametrize("n_classes, side", [(3, 400), (10, 700)])
def test_confusion_png(n_classes: int, side: int):
    rng = np.random.default_rng(0)
    confusion = tuple(tuple(int(v) for v in row) for row in rng.integers(0, 50, (n_classes, n_classes)))
    data = confusion_png(confusion, tuple(f"class {i}" for i in range(n_classes)))
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        assert img.format == "PNG"
        assert img.size == (side, side)
        # a real picture, not a blank canvas
        assert len(np.unique(np.asarray(img.convert("L")))) > 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return train_small_model(tmp_path_factory.mktemp("evaluate"))


def test_evaluate_scores_the_trained_checkpoint(ray_local, trained: Trained):
    result = evaluate(trained.model, trained.prepared, trained.store.uri)
    n_test = trained.prepared.counts["test"]
    assert n_test == 12
    assert result.test_size == n_test
    assert result.accuracy >= 0.9  # chance is 1/3 on this easy data
    assert sum(map(sum, result.confusion)) == n_test
    assert [c.support for c in result.per_class] == [4, 4, 4]
    assert [c.name for c in result.per_class] == list(trained.prepared.classes)
    # the scores are the checkpoint's predictions on the stored test split
    data_dir = trained.store.local_dir(trained.store.key_of(trained.prepared.uri), trained.cache_dir)
    x_test, y_test = load_split(data_dir, "test")
    predictions = predict(trained.store.root / trained.checkpoint_key, x_test)
    assert result.accuracy == pytest.approx(float(np.mean(predictions == y_test)))
    assert result.confusion == compute_metrics(y_test, predictions, trained.prepared.classes)["confusion"]
    # the PNG is in the store, where the URI says
    png_key = trained.store.key_of(result.confusion_png_uri)
    assert png_key == f"evaluations/{trained.model.run_id}/confusion.png"
    assert trained.store.get_bytes(png_key).startswith(PNG_SIGNATURE)


def test_evaluate_task_fn(ray_local, trained: Trained):
    result = evaluate_task.fn(trained.model, trained.prepared, trained.store.uri)
    assert result.test_size == trained.prepared.counts["test"]
    assert result.accuracy >= 0.9


def test_the_stored_predictions_are_the_ones_the_prediction_task_makes(ray_local, trained: Trained):
    key = f"{trained.checkpoint_key}/{PREDICTIONS_FILE}"
    assert trained.store.exists(key)  # the final epoch's checkpoint carries the test split's predictions
    from_training = evaluate(trained.model, trained.prepared, trained.store.uri)
    stored = trained.store.get_bytes(key)
    trained.store.delete(key)
    try:
        from_task = evaluate(trained.model, trained.prepared, trained.store.uri)  # a Ray task predicts them now
    finally:
        trained.store.put_bytes(key, stored)
    assert from_task.confusion == from_training.confusion and from_task.test_size == from_training.test_size
    assert from_task.accuracy == from_training.accuracy
