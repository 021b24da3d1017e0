"""Runs that wait for other runs (an evaluation-only run after its training run).

Locally the waited-for runs are launched to the end first; on Slurm (tests/slurm) the
waiting run gets an ``afterok`` dependency on the other run's job.
"""
import json

import pytest

from maps.launch import LaunchError, RunSpec, launch
from maps.launch.runstore import RunStore
from maps_toy_tasks import final_metrics


@pytest.fixture
def store(tmp_path):
    return RunStore(tmp_path / "runs")


def train_spec(seed, fail=False):
    return RunSpec("toy/train", seed, json.dumps({"TOY": {"STEPS": 2, "FAIL": fail}}),
                   "maps_toy_tasks:toy_train")


def eval_spec(store, seed):
    cfg = {"TOY": {"AFTER": str(store.run_dir("toy/train", seed))}}
    return RunSpec("toy/eval", seed, json.dumps(cfg), "maps_toy_tasks:toy_after",
                   after=(("toy/train", seed),))


@pytest.mark.parametrize("executor", ["debug", "local"])
def test_waiting_run_starts_after_the_run_it_waits_for(store, executor):
    # listed first on purpose: the launcher orders by dependency, not by list order
    runs = [eval_spec(store, 0), train_spec(0), train_spec(1)]
    report = launch(runs, executor, store=store)
    assert [(o.experiment, o.seed, o.action) for o in report.outcomes] == [
        ("toy/eval", 0, "submitted"), ("toy/train", 0, "submitted"), ("toy/train", 1, "submitted")]
    final = store.read_final(store.run_dir("toy/eval", 0))
    assert final["after_PQ"] == final_metrics(0, 1)["PQ"] == 40.0
    assert store.read_status(store.run_dir("toy/eval", 0))["state"] == "done"


def test_waiting_run_is_skipped_when_its_run_failed(store):
    report = launch([train_spec(0, fail=True), eval_spec(store, 0)], "debug", store=store)
    by = {o.experiment: o for o in report.outcomes}
    assert by["toy/train"].action == "submitted"
    assert store.read_status(store.run_dir("toy/train", 0))["state"] == "failed"
    assert by["toy/eval"].action == "skipped"
    assert "waits for run toy/train seed 0, which is failed" in by["toy/eval"].reason
    assert not store.run_dir("toy/eval", 0).exists() or store.read_status(store.run_dir("toy/eval", 0)) is None


def test_waiting_run_alone_uses_a_done_run_and_refuses_a_missing_one(store):
    report = launch([eval_spec(store, 3)], "debug", store=store)
    assert report.outcomes[0].action == "skipped"
    assert "toy/train seed 3, which is not launched" in report.outcomes[0].reason
    launch([train_spec(3)], "debug", store=store)
    report = launch([eval_spec(store, 3)], "debug", store=store)
    assert report.outcomes[0].action == "submitted"
    assert store.read_final(store.run_dir("toy/eval", 3))["after_PQ"] == 43.0


def test_runs_waiting_for_each_other_are_refused(store):
    a = RunSpec("toy/a", 0, "{}", "maps_toy_tasks:toy_train", after=(("toy/b", 0),))
    b = RunSpec("toy/b", 0, "{}", "maps_toy_tasks:toy_train", after=(("toy/a", 0),))
    with pytest.raises(LaunchError, match="cycle"):
        launch([a, b], "debug", store=store)
