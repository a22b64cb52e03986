"""The sweep's parts that need no Ray: search spaces, the checks made before any trial, concurrency, the table."""

from __future__ import annotations

import pytest

from cluster.config import TrainLoopConfig
from cluster.errors import UserError
from cluster.execution.placement import Resources
from cluster.execution.sweep import SweepSpec, check_spaces, concurrency, parse_space
from tasks.refs import Trial
from tasks.sweep import best_trial, sweep_identity, trial_table


@pytest.mark.parametrize("text, kind, corners", [
    ("lr=loguniform:0.001:0.1", "loguniform", (0.001, 0.1)),
    ("momentum=uniform:0.5:0.99", "uniform", (0.5, 0.99)),
    ("batch_size=choice:32,64,128", "choice", (32, 64, 128)),
    ("seed=int:0:3", "int", (0, 3)),
    (" lr = choice:0.01, 0.1 ", "choice", (0.01, 0.1)),
])
def test_each_form_of_space_parses(text, kind, corners):
    space = parse_space(text)
    assert space.kind == kind and space.corners == corners
    assert parse_space(str(space)) == space  # its text form is a space again


def test_the_spaces_become_tunes_own():
    draws = {parse_space("seed=int:0:3").to_tune().sample() for _ in range(200)}
    assert draws == {0, 1, 2, 3}  # both ends in, as the form says (Tune's randint leaves out its upper end)
    assert 0.001 <= parse_space("lr=loguniform:0.001:0.1").to_tune().sample() <= 0.1


@pytest.mark.parametrize("text, says", [
    ("lr", "is not NAME=SPACE"),
    ("epochs=int:1:5", "cannot be searched; choose one of lr, momentum, batch_size, seed"),
    ("lr=loguniform:0:0.1", "is not a space of float values for lr"),
    ("lr=uniform:0.1:0.01", "lo < hi"),
    ("batch_size=choice:32,sixty-four", "is not a space of int values for batch_size"),
    ("lr=int:1:3", "int only for whole-number parameters"),
    ("lr=gaussian:0:1", "choice:a,b,c, uniform:lo:hi, loguniform:lo:hi or int:lo:hi"),
])
def test_a_wrong_space_is_one_sentence_naming_it(text, says):
    with pytest.raises(UserError, match=says.replace("(", r"\(").replace(")", r"\)")):
        parse_space(text)


def test_every_value_a_trial_can_draw_is_checked_before_any_trial():
    base = TrainLoopConfig(data_dir="")
    check_spaces(base, 2, (parse_space("batch_size=choice:32,64"), parse_space("lr=loguniform:0.001:0.1")))
    with pytest.raises(UserError, match="a trial could draw batch_size=33.*does not split evenly over 2 workers"):
        check_spaces(base, 2, (parse_space("batch_size=choice:32,33"),))
    with pytest.raises(UserError, match="a trial could draw momentum=1.0.*must be in"):
        check_spaces(base, 1, (parse_space("momentum=uniform:0.5:1"),))
    check_spaces(base, 1, (parse_space("batch_size=choice:32,64"),), train_images=64)
    with pytest.raises(UserError, match="could draw batch_size=128, and then batch_size=128 is larger than the "
                                        r"training set \(100 images\)"):
        check_spaces(base, 1, (parse_space("batch_size=choice:32,128"),), train_images=100)


def test_concurrency_is_what_the_nodes_hold_at_most_what_was_asked():
    two_nodes = [{"CPU": 1.0}, {"CPU": 1.0}]
    assert concurrency(Resources(num_workers=1), None, two_nodes) == 2
    assert concurrency(Resources(num_workers=1), 1, two_nodes) == 1
    assert concurrency(Resources(num_workers=2), None, two_nodes) == 1
    assert concurrency(Resources(num_workers=1, cpus_per_worker=2), None, [{"CPU": 8.0}, {"CPU": 3.0}]) == 5
    assert concurrency(Resources(num_workers=1, use_gpu=True), None, [{"CPU": 8.0, "GPU": 2.0}]) == 2


def test_the_identity_follows_the_search_not_its_concurrency():
    base, spaces = TrainLoopConfig(data_dir=""), (parse_space("lr=loguniform:0.001:0.1"),)
    one = sweep_identity("f" * 64, base, SweepSpec(spaces=spaces, trials=4, max_concurrent=1))
    assert one == sweep_identity("f" * 64, base, SweepSpec(spaces=spaces, trials=4, max_concurrent=3))
    assert one != sweep_identity("f" * 64, base, SweepSpec(spaces=spaces, trials=5))
    assert one != sweep_identity("e" * 64, base, SweepSpec(spaces=spaces, trials=4))
    assert one.startswith("sweep-")


def trial(trial_id: str, epochs: int, last: float | None, error: str | None = None) -> Trial:
    return Trial(trial_id=trial_id, run_id=f"run-{trial_id}", values={"lr": 0.01}, epochs=epochs,
                 best_val_accuracy=last, last_val_accuracy=last, stopped_early=error is None and epochs < 4,
                 error=error)


def test_the_best_trial_ran_every_epoch():
    trials = [trial("a", 4, 0.8), trial("b", 2, 0.9), trial("c", 4, 0.85), trial("d", 0, None, "boom")]
    assert best_trial(trials, 4).trial_id == "c"  # b stopped early: out of the race
    with pytest.raises(RuntimeError, match="no trial of the sweep ran all 4 epochs; d: boom"):
        best_trial([trial("b", 2, 0.9), trial("d", 0, None, "boom")], 4)


def test_the_table_says_what_each_trial_did():
    rows = [{"trial_id": "x_00001", "values": {"lr": 0.1, "batch_size": 32}, "status": "TERMINATED", "epochs": 1,
             "best_val_accuracy": 0.31234, "run_id": "r1"},
            {"trial_id": "x_00000", "values": {"lr": 0.01, "batch_size": 64}, "status": "TERMINATED", "epochs": 4,
             "best_val_accuracy": 0.9, "run_id": "r0"},
            {"trial_id": "x_00002", "values": {"lr": 0.05, "batch_size": 64}, "status": "PENDING", "epochs": 0,
             "best_val_accuracy": None, "run_id": None}]
    table = trial_table(rows, 4)
    assert [r["trial"] for r in table] == ["x_00000", "x_00001", "x_00002"]
    assert table[1] == {"trial": "x_00001", "batch_size": 32, "lr": 0.1, "status": "finished",
                        "best val accuracy": 0.3123, "epochs run": 1, "stopped early": True}
    assert table[0]["stopped early"] is False and table[2]["status"] == "waiting"


def test_a_resumed_asha_judges_new_trials_against_the_finished_ones():
    """Tune restores a sweep's scheduler as it was when the sweep started; the finished trials' rungs come back
    from their runs' reports (Tune's own ASHA would let the trailing trial below run on)."""
    from ray.tune.experiment import Trial as TuneTrial
    from ray.tune.schedulers import TrialScheduler

    from cluster.execution.sweep_watch import ResumingASHA, listening

    def fresh():
        return ResumingASHA(time_attr="epoch", metric="val_accuracy", mode="max", max_t=4, grace_period=1,
                            reduction_factor=2)

    done = TuneTrial("sweep", config={"lr": 0.05}, trial_id="t_00000", stub=True)
    done.set_status(TuneTrial.TERMINATED)
    ran = {"t_00000": [{"epoch": e, "val_accuracy": a} for e, a in [(1, 0.6), (2, 0.7), (3, 0.75), (4, 0.8)]]}
    asked = []

    def reports(trial_id, values):
        asked.append((trial_id, values))
        return ran.get(trial_id, [])

    trailing = TuneTrial("sweep", config={"lr": 0.001}, trial_id="t_00001", stub=True)
    with listening(lambda *_: None, lambda rows: None, reports):
        resumed = fresh()
        resumed.on_trial_add(None, done)
        resumed.on_trial_add(None, trailing)
        assert resumed.on_trial_result(None, trailing, {"epoch": 1, "val_accuracy": 0.3}) == TrialScheduler.STOP
    assert asked == [("t_00000", {"lr": 0.05})]  # only the finished trial's runs are read

    forgetful = fresh()  # outside `listening` (and so Tune's own ASHA on a resumed sweep): nothing to learn from
    forgetful.on_trial_add(None, done)
    forgetful.on_trial_add(None, trailing)
    assert forgetful.on_trial_result(None, trailing, {"epoch": 1, "val_accuracy": 0.3}) == TrialScheduler.CONTINUE
