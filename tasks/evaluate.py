"""Stage 4, evaluate: test-set metrics of a trained model.

The predictions are the ones the training run stored with its final
checkpoint (``predictions.npz``, made from that checkpoint's own files on the
worker that wrote it). A checkpoint without them is predicted by a Ray task in
a process of the model's framework (this process imports no framework), which
fetches the checkpoint and the test split from the store on whichever node it
runs. Accuracy, macro and per-class
precision/recall/F1 and the confusion matrix (scikit-learn) are computed here,
and a confusion-matrix PNG is stored beside the run's other outputs.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact

from cluster.execution.predict import StoredCheckpoint, predict
from cluster.execution.session import ray_session
from cluster.worker.checkpoint import PREDICTIONS_FILE
from tasks.common import in_prefect_run
from tasks.refs import ClassMetrics, Evaluation, PreparedData, TrainedModel
from tasks.store import Store, open_store
from tasks.train import stored_data


def preload() -> None:
    """Import what scoring needs (scikit-learn's metrics, matplotlib): seconds a flow can spend while it trains.

    A warm-up on a thread of its own, so it never fails the flow: an import that meets another thread's import
    half-way (SciPy looks for torch in ``sys.modules`` and can find it half loaded) is left to
    :func:`compute_metrics`, which imports these again where an error is reported.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot
        import sklearn.metrics
    except Exception:
        pass


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: tuple[str, ...]) -> dict:
    """Accuracy, macro and per-class precision/recall/F1 and the confusion matrix."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision_macro": float(mp), "recall_macro": float(mr), "f1_macro": float(mf),
        "per_class": tuple(ClassMetrics(name=c, precision=float(p[i]), recall=float(r[i]), f1=float(f[i]),
                                        support=int(s[i])) for i, c in enumerate(classes)),
        "confusion": tuple(tuple(int(v) for v in row) for row in confusion_matrix(y_true, y_pred, labels=labels)),
    }


def confusion_png(confusion: tuple[tuple[int, ...], ...], classes: tuple[str, ...]) -> bytes:
    """Render the confusion matrix as a PNG (counts in each cell)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in workers and CI
    import matplotlib.pyplot as plt

    matrix = np.array(confusion)
    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title="Confusion matrix (test set)")
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > threshold else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def evaluate(model: TrainedModel, prepared: PreparedData, store_uri: str, ray_address: str | None = None,
             cpus: int = 1) -> Evaluation:
    """Score the final checkpoint's predictions of the test split, made now when it has none stored.

    Those are made by a Ray task on ``cpus`` CPUs, in the Ray this process is connected to, else the one
    at ``ray_address``, else a local one.
    """
    store = open_store(store_uri)
    stored = stored_predictions(store, model, prepared)
    if stored is not None:
        y_test, y_pred = stored
    else:
        checkpoint = StoredCheckpoint(filesystem=store.ray_filesystem(),
                                      path=store.ray_storage_path(store.key_of(model.checkpoint_uri)))
        with ray_session(ray_address):
            y_test, y_pred = predict(model.framework, checkpoint, stored_data(store, prepared), cpus=cpus)
    metrics = compute_metrics(y_test, y_pred, prepared.classes)
    png_key = f"evaluations/{model.run_id}/confusion.png"
    store.put_bytes(png_key, confusion_png(metrics["confusion"], prepared.classes))
    return Evaluation(confusion_png_uri=store.child_uri(png_key), test_size=len(y_test), **metrics)


def stored_predictions(store: Store, model: TrainedModel,
                       prepared: PreparedData) -> tuple[np.ndarray, np.ndarray] | None:
    """(true, predicted) labels stored with the model's checkpoint, or None when it has none for this test split."""
    key = f"{store.key_of(model.checkpoint_uri)}/{PREDICTIONS_FILE}"
    if not store.exists(key):
        return None
    with np.load(io.BytesIO(store.get_bytes(key))) as stored:
        y_true, y_pred = stored["y_true"], stored["y_pred"]
    return (y_true, y_pred) if len(y_true) == prepared.counts.get("test") else None


@task(name="evaluate", task_run_name="evaluate {model.model} on {prepared.counts[test]} test images")
def evaluate_task(model: TrainedModel, prepared: PreparedData, store: str, ray_address: str | None = None,
                  cpus: int = 1) -> Evaluation:
    """Prefect task: score the trained model on the test split; show the confusion matrix as an artifact."""
    evaluation = evaluate(model, prepared, store, ray_address, cpus)
    if not in_prefect_run():
        return evaluation
    opened = open_store(store)
    png = base64.b64encode(opened.get_bytes(opened.key_of(evaluation.confusion_png_uri))).decode()
    create_markdown_artifact(
        markdown=f"# Confusion matrix of `{model.run_id}`\n\n![confusion matrix](data:image/png;base64,{png})\n",
        description=f"Test-set confusion matrix ({evaluation.test_size} images)")
    return evaluation
