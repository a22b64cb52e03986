"""The sweep flow: ingest → preprocess → sweep (trials on Ray Tune) → evaluate → publish the best trial.

Wiring only, as the pipeline's: the data is prepared once, the sweep stage runs
the trials (:mod:`tasks.sweep`), and the best trial's run goes through the same
evaluate and publish stages as any run, its lineage naming the sweep and the trial.
"""

from __future__ import annotations

from prefect import flow

from flows.params import SweepParams, preflight_sweep
from flows.pipeline import RunSummary, StageTime, publish, run_stage, train_and_evaluate
from tasks.refs import Trial
from tasks.store import open_store
from tasks.sweep import sweep_task, track_sweep_task


class SweepSummary(RunSummary):
    """A run's summary of the best trial, with the sweep and every trial."""

    sweep_id: str
    best_trial_id: str
    trials: list[Trial]


def lineage_params(params: SweepParams, sweep_id: str, best: Trial) -> dict:
    """What the published version's lineage records: the form with the best trial's values in its training
    section (a plain run of them trains the same run), and the sweep and trial that chose them."""
    form = params.model_dump(mode="json")
    form["train"].update(best.values)
    form["sweep"].update(id=sweep_id, trial_id=best.trial_id, trial_run_id=best.run_id)
    return form


@flow(name="sweep", flow_run_name="{params.data.label} · sweep of {params.sweep.trials} trials", log_prints=True)
def sweep_pipeline(params: SweepParams = SweepParams()) -> SweepSummary:
    """Prepare the data once, train a Ray Tune search of trials, evaluate and publish the best one."""
    tracking = preflight_sweep(params)
    store = open_store(params.publish.store).uri
    stages: list[StageTime] = []
    swept = []

    def sweep(stages, prepared, cfg, resources, store):
        swept.append(run_stage(stages, "sweep", sweep_task, prepared, cfg, resources, store,
                               params.sweep.to_spec(params.train.seed), tracking))
        return swept[0].model

    raw, prepared, model, evaluation = train_and_evaluate(params, stages, sweep, store)
    result = swept[0]
    release = publish(params, stages, model, evaluation, prepared,
                      lineage_params(params, result.sweep_id, result.best), store)
    tracked = track_sweep_task(tracking, result, prepared, evaluation, release, store) if tracking else None
    summary = RunSummary.build(stages, raw, prepared, model, evaluation, release, tracked)
    return SweepSummary(**summary.model_dump(), sweep_id=result.sweep_id, best_trial_id=result.best_trial_id,
                        trials=list(result.trials))
