"""Prefect artifacts a pipeline run leaves behind: formatting only, no IO of their own."""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.refs import Evaluation, Release, TrainedModel


def _key(*parts: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    raw = "-".join(parts).lower()
    return "".join(c if c.isalnum() else "-" for c in raw).strip("-")


def evaluation_artifacts(name: str, model: TrainedModel, evaluation: Evaluation) -> None:
    create_table_artifact(
        key=_key(name, "per-class-metrics"),
        table=[{"class": c.name, "precision": round(c.precision, 4), "recall": round(c.recall, 4),
                "f1": round(c.f1, 4), "support": c.support} for c in evaluation.per_class],
        description=f"Per-class test metrics of run {model.run_id}",
    )
    history = "\n".join(
        f"| {m.epoch} | {m.train_loss:.4f} | {'' if m.val_loss is None else f'{m.val_loss:.4f}'} | "
        f"{'' if m.val_accuracy is None else f'{m.val_accuracy:.4f}'} | {m.train_images_per_s:.0f} |"
        for m in model.history)
    create_markdown_artifact(
        key=_key(name, "evaluation"),
        markdown=f"""# Evaluation of `{model.run_id}`

{evaluation.metrics_markdown()}

Confusion matrix: [{evaluation.confusion_png_uri}]({evaluation.confusion_png_uri})

| epoch | train loss | val loss | val accuracy | images/s |
|---|---|---|---|---|
{history}
""",
        description="Test metrics and training history",
    )


def release_artifact(release: Release) -> None:
    verdict = ("already published: nothing written" if release.reused else "promoted to champion" if release.promoted
               else f"not promoted (champion stays v{release.champion_version})")
    create_markdown_artifact(
        key=_key(release.name, "release"),
        markdown=f"# {release.name} v{release.version}: {verdict}\n\n{release.reason}\n\nStored at `{release.uri}`\n",
        description="Published version and promotion decision",
    )
