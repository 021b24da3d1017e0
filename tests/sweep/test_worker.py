"""Studies of the toy objective: parallel workers, dead workers, pruning, failures, storages."""
from __future__ import annotations

import json
import time

import pytest
import yaml
from click.testing import CliRunner
from optuna.trial import TrialState

from maps.launch.runstore import RunStore
from maps.sweep import open_study, parse_sweep, run_sweep, trial_experiment
from maps_toy_objectives import toy_pq

from .conftest import toy_sweep


def _config(run_dir):
    return yaml.safe_load((run_dir / "config.yaml").read_text())


@pytest.mark.slow
def test_two_local_workers_share_one_study_and_record_each_trial_once(runs_root, monkeypatch):
    monkeypatch.setenv("MAPS_SWEEP_TOY_SLEEP", "0.4")  # keep trials in flight together
    spec = parse_sweep(toy_sweep())
    result = run_sweep(spec, trials=6, parallel=2, executor="local", runs_root=runs_root)
    assert result.worker_errors == []
    assert result.counts == {"COMPLETE": 6}
    numbers = [n for w in result.trials_by_worker for n in w]
    assert sorted(numbers) == list(range(6))  # each trial once, none lost, none extra
    assert all(result.trials_by_worker), f"a worker took no trial: {result.trials_by_worker}"

    study = open_study(spec, result.storage)
    store = RunStore(runs_root)
    for t in study.trials:
        run_dir = store.run_dir(trial_experiment("toy", t.number), 0)
        status = store.read_status(run_dir)
        assert status["state"] == "done" and status["trial"] == t.number
        assert {"study:toy", f"trial:{t.number}", f"exp:sweep/toy/trial{t.number}"} <= set(status["tags"])
        # the objective is the toy's PQ of the config the trial actually trained
        pq = toy_pq(_config(run_dir))
        assert t.values == [pq] and store.read_final(run_dir)["PQ"] == pq
        assert _config(run_dir)["MODEL"]["MAPS"]["NUM_RETRIEVED"] == t.params["MODEL.MAPS.NUM_RETRIEVED"]
        assert sorted(t.intermediate_values) == [1, 2, 3, 4]
        assert t.intermediate_values[2] == pytest.approx(pq / 2)

    # running again continues the same study: two more trials, numbered after the others
    again = run_sweep(spec, trials=2, executor="debug", runs_root=runs_root)
    assert again.counts == {"COMPLETE": 8} and again.target == 8
    assert again.trials_by_worker == [[6, 7]]


def test_killed_worker_leaves_its_trial_failed_and_the_study_goes_on(runs_root, monkeypatch):
    """Two local worker processes; the one that draws trial 2 is SIGKILLed mid-trial."""
    monkeypatch.setenv("MAPS_SWEEP_TOY_KILL", "2")
    monkeypatch.setenv("MAPS_SWEEP_TOY_SLEEP", "0.3")
    spec = parse_sweep(toy_sweep())  # heartbeat every 0.2 s, dead after 1 s of silence
    first = run_sweep(spec, trials=5, parallel=2, executor="local", runs_root=runs_root)
    assert len(first.worker_errors) == 1 and first.trials_by_worker.count(None) == 1
    survivor = next(w for w in first.trials_by_worker if w is not None)
    assert 2 not in survivor and survivor == sorted(survivor)

    monkeypatch.delenv("MAPS_SWEEP_TOY_KILL")
    time.sleep(1.2)  # past the grace period, whatever the survivor saw
    second = run_sweep(spec, trials=2, executor="debug", runs_root=runs_root)
    study = open_study(spec, second.storage)
    states = {t.number: t.state for t in study.trials}
    assert sorted(states) == list(range(7))  # each trial once, none lost, none extra
    assert [n for n, s in states.items() if s != TrialState.COMPLETE] == [2]
    assert states[2] == TrialState.FAIL
    assert "no heartbeat" in study.trials[2].user_attrs["fail_reason"]
    assert second.trials_by_worker == [[5, 6]]
    store = RunStore(runs_root)
    dead = store.read_status(store.run_dir("sweep/toy/trial2", 0))
    assert dead["state"] == "failed" and "sweep worker died" in dead["error"]
    for t in study.trials:
        if t.number == 2:
            continue
        run_dir = store.run_dir(trial_experiment("toy", t.number), 0)
        status = store.read_status(run_dir)
        assert status["state"] == "done" and status["trial"] == t.number
        assert t.values == [toy_pq(_config(run_dir))] == [store.read_final(run_dir)["PQ"]]


def test_stale_trial_is_failed_when_the_study_continues(runs_root):
    """A RUNNING trial whose heartbeat stopped longer than the grace period ago is failed by
    the next invocation before it asks for anything; a beating one is left alone."""
    import os

    from maps.sweep import default_storage_url, fail_stale_trials, study_dir

    spec = parse_sweep(toy_sweep(heartbeat={"interval": 1.0, "grace": 30.0}))
    storage = default_storage_url(runs_root, "toy")
    study = open_study(spec, storage, create=True)
    dead, alive = study.ask(), study.ask()
    beats = study_dir(runs_root, "toy") / "heartbeats"
    beats.mkdir(parents=True)
    (beats / "trial0").touch()
    os.utime(beats / "trial0", (time.time() - 60, time.time() - 60))  # silent 60 s > 30 s grace
    (beats / "trial1").touch()
    assert fail_stale_trials(study, study_dir(runs_root, "toy"), grace_period=100.0) == []
    result = run_sweep(spec, trials=1, executor="debug", runs_root=runs_root)
    assert result.stale_failed == [0]
    states = [t.state for t in open_study(spec, storage).trials]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.COMPLETE]
    assert result.trials_by_worker == [[2]]


def test_hopeless_trial_is_pruned_and_its_run_cancelled(runs_root):
    spec = parse_sweep(toy_sweep(pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0}))
    storage = f"journal:{runs_root}/toy.journal"
    study = open_study(spec, storage, create=True)
    best = {"MODEL.MAPS.NUM_RETRIEVED": 4, "MODEL.MAPS.INPUT_MASKING_PROB": 0.3, "MODEL.MAPS.SCENE_LAYERS": 1}
    study.enqueue_trial(best)  # toy PQ 50
    study.enqueue_trial({**best, "MODEL.MAPS.NUM_RETRIEVED": 1})  # toy PQ 50 - 9 = 41
    run_sweep(spec, trials=2, executor="debug", storage=storage, runs_root=runs_root)
    first, second = open_study(spec, storage).trials
    assert first.state == TrialState.COMPLETE and first.values == [50.0]
    # at iteration 1 of 4: 41/4 = 10.25 is below the median 50/4 = 12.5 of the finished trial
    assert second.state == TrialState.PRUNED and second.intermediate_values == {1: 10.25}
    store = RunStore(runs_root)
    status = store.read_status(store.run_dir("sweep/toy/trial1", 0))
    assert status["state"] == "cancelled" and status["note"] == "pruned"
    assert store.read_final(store.run_dir("sweep/toy/trial1", 0)) is None


def test_failing_trial_is_failed_and_the_worker_goes_on(runs_root, monkeypatch):
    monkeypatch.setenv("MAPS_SWEEP_TOY_FAIL", "0")
    spec = parse_sweep(toy_sweep())
    result = run_sweep(spec, trials=2, executor="debug", runs_root=runs_root)
    assert result.trials_by_worker == [[0, 1]] and result.counts == {"FAIL": 1, "COMPLETE": 1}
    trial0 = open_study(spec, result.storage).trials[0]
    assert trial0.user_attrs["fail_reason"] == "RuntimeError: toy failure requested for trial 0"
    status = RunStore(runs_root).read_status(runs_root / "sweep/toy/trial0/seed0")
    assert status["state"] == "failed" and "toy failure" in status["traceback"]


def test_each_trial_is_a_wandb_run_and_visible_to_maps_status(runs_root, monkeypatch):
    from maps.cli import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = parse_sweep(toy_sweep())
    run_sweep(spec, trials=1, executor="debug", runs_root=runs_root)
    run_dir = runs_root / "sweep/toy/trial0/seed0"
    record = json.loads((run_dir / "wandb.json").read_text())
    assert record["mode"] == "offline" and record["id"] and record["last_step"] == 3
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    out = CliRunner().invoke(main, ["status", "sweep/toy", "--runs-root", str(runs_root), "--json"])
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in out.output.splitlines()]
    assert [(r["experiment"], r["state"]) for r in rows] == [("sweep/toy/trial0", "done")]
    assert rows[0]["PQ"] == toy_pq(_config(run_dir))


def test_rdb_storage_url_and_continuation(runs_root):
    spec = parse_sweep(toy_sweep())
    url = f"sqlite:///{runs_root.parent}/toy.db"
    first = run_sweep(spec, trials=2, executor="debug", storage=url, runs_root=runs_root)
    second = run_sweep(spec, trials=1, executor="debug", storage=url, runs_root=runs_root)
    assert first.counts == {"COMPLETE": 2} and second.counts == {"COMPLETE": 3}
    assert second.trials_by_worker == [[2]]


def test_existing_study_with_other_direction_is_refused(runs_root):
    from maps.sweep import SweepError

    run_sweep(parse_sweep(toy_sweep()), trials=1, executor="debug", runs_root=runs_root)
    other = parse_sweep(toy_sweep(direction="minimize"))
    with pytest.raises(SweepError, match="already exists with directions"):
        run_sweep(other, trials=1, executor="debug", runs_root=runs_root)


def test_cli_runs_and_continues_a_study(tmp_path, monkeypatch):
    from maps.cli import main

    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    (sweeps / "toy.yaml").write_text(yaml.safe_dump(toy_sweep()))
    monkeypatch.setenv("MAPS_SWEEPS", str(sweeps))
    args = ["sweep", "toy", "--trials", "2", "--executor", "debug", "--runs-root", str(tmp_path / "runs")]
    out = CliRunner().invoke(main, args + ["--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output.strip().splitlines()[-1])
    assert summary["counts"] == {"COMPLETE": 2} and summary["trials_by_worker"] == [[0, 1]]
    assert summary["storage"] == f"journal:{tmp_path / 'runs' / 'sweep' / 'toy' / 'journal.log'}"
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    assert "worker 0: trials [2, 3]" in out.output and "study toy: 4 complete" in out.output


def test_runs_of_another_study_of_the_same_name_are_not_overwritten(runs_root, tmp_path):
    from maps.sweep import SweepError

    spec = parse_sweep(toy_sweep())
    run_sweep(spec, trials=1, executor="debug", runs_root=runs_root,
              storage=f"journal:{tmp_path}/elsewhere.journal")
    before = (runs_root / "sweep/toy/trial0/seed0/final.json").read_text()
    with pytest.raises(SweepError, match="runs trial0 belong to an earlier study named 'toy'"):
        run_sweep(spec, trials=1, executor="debug", runs_root=runs_root)  # a new, empty journal
    assert (runs_root / "sweep/toy/trial0/seed0/final.json").read_text() == before
