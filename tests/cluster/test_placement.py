"""Placement checked per node: requests no set of live nodes can hold are refused, naming the nodes."""

from __future__ import annotations

import pytest

from cluster.errors import UserError
from cluster.execution.placement import Resources, placement_problem

TWO_SMALL = [{"CPU": 1.0}, {"CPU": 1.0}]


def test_a_worker_wider_than_every_node_is_refused_though_the_total_would_fit():
    problem = placement_problem(TWO_SMALL, Resources(num_workers=1, cpus_per_worker=2))
    assert problem is not None
    assert "no node can hold one worker of 2 CPU" in problem and "1 CPU + 0 GPU, 1 CPU + 0 GPU" in problem


def test_gpus_are_counted_per_node():
    nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0}]
    assert placement_problem(nodes, Resources(num_workers=1, use_gpu=True)) is None
    problem = placement_problem(nodes, Resources(num_workers=2, use_gpu=True))
    assert problem is not None and "at most 1 such workers" in problem


@pytest.mark.parametrize("strategy", ["PACK", "SPREAD"])
def test_pack_and_spread_may_share_nodes(strategy):
    nodes = [{"CPU": 4.0}, {"CPU": 1.0}]
    assert placement_problem(nodes, Resources(num_workers=5, placement_strategy=strategy)) is None
    assert placement_problem(nodes, Resources(num_workers=6, placement_strategy=strategy)) is not None


def test_strict_spread_needs_a_node_per_worker():
    assert placement_problem(TWO_SMALL, Resources(num_workers=2, placement_strategy="STRICT_SPREAD")) is None
    problem = placement_problem([{"CPU": 8.0}], Resources(num_workers=2, placement_strategy="STRICT_SPREAD"))
    assert problem is not None and "only 1 node(s) can hold one" in problem and "use SPREAD" in problem


def test_bad_resources_are_one_sentence():
    with pytest.raises(UserError, match="placement_strategy='RANDOM' is unknown"):
        Resources(placement_strategy="RANDOM")
    with pytest.raises(UserError, match="wait_for_resources=0"):
        Resources(wait_for_resources=0)
