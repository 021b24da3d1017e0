"""A study on the real single-node Slurm of ``slurm/start.sh``: 2 workers as a job array.

    bash slurm/start.sh && .venv/bin/pytest -m slurm tests/slurm/test_sweep_slurm.py

The objective is the toy of maps_toy_objectives (workers import it in the job's interpreter);
knobs travel in the environment, which sbatch exports to the jobs.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from maps.launch import slurm_job_states
from maps.launch.runstore import RunStore
from maps.sweep import open_study, parse_sweep, run_sweep

pytestmark = pytest.mark.slurm

PROFILE = Path(__file__).resolve().parents[2] / "slurm" / "profiles" / "local-ci.yaml"


def _spec():
    return parse_sweep({
        "name": "slurm-toy", "experiment": "synthetic/main/maps",
        "task": "maps_toy_objectives:toy_objective", "iterations": 4,
        "overrides": {"TEST.EVAL_PERIOD": 1},
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2}, "pruner": "none",
        "heartbeat": {"interval": 0.5, "grace": 3.0},
        "space": {"MODEL.MAPS.NUM_RETRIEVED": {"type": "int", "low": 1, "high": 8},
                  "MODEL.MAPS.INPUT_MASKING_PROB": {"type": "float", "low": 0.0, "high": 1.0}},
    })


def test_two_slurm_workers_share_a_study_and_survive_a_killed_worker(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("MAPS_SWEEP_TOY_SLEEP", "0.5")
    monkeypatch.setenv("MAPS_SWEEP_TOY_KILL", "2")  # the job running trial 2 SIGKILLs itself
    runs = tmp_path / "runs"
    spec = _spec()
    first = run_sweep(spec, trials=5, parallel=2, executor="slurm", profile=PROFILE, runs_root=runs)
    assert len(first.worker_errors) == 1, first.worker_errors
    study = open_study(spec, first.storage)
    numbers = sorted(t.number for t in study.trials)
    assert numbers == list(range(5))  # each trial once
    store = RunStore(runs)
    job_ids = {store.read_status(store.run_dir(f"sweep/slurm-toy/trial{n}", 0))["job_id"] for n in numbers}
    assert len(job_ids) == 2 and all("_" in j for j in job_ids)  # two array tasks did the work
    states = slurm_job_states(sorted(job_ids))
    assert sorted(s.split()[0] for s in states.values()) in (["COMPLETED", "FAILED"], ["COMPLETED", "OUT_OF_MEMORY"]), states

    monkeypatch.delenv("MAPS_SWEEP_TOY_KILL")
    time.sleep(3.5)
    second = run_sweep(spec, trials=2, parallel=2, executor="slurm", profile=PROFILE, runs_root=runs)
    assert second.worker_errors == []
    trials = open_study(spec, second.storage).trials
    assert sorted(t.number for t in trials) == list(range(7))
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [2]
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 6
    dead = store.read_status(store.run_dir("sweep/slurm-toy/trial2", 0))
    assert dead["state"] == "failed" and "no heartbeat" in dead["error"]


def test_two_slurm_workers_run_a_real_maps_study_on_the_synthetic_dataset(tmp_path, monkeypatch):
    """The shipped synthetic study, real training of the tiny MAPS model in 2 Slurm jobs, with
    the memory (bank + neighbour caches) built once by the driver before the workers start."""
    import math

    from maps.data import generate_synthetic_dataset, register_synthetic
    from maps.sweep import load_sweep

    root = tmp_path / "datasets"
    generate_synthetic_dataset(root / "synthetic", num_train=8, num_val=2, size=128, seed=0,
                               progress=False)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))  # exported to the jobs by sbatch
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    register_synthetic("synthetic", str(root / "synthetic"))
    shipped = load_sweep("synthetic_retrieval", root=PROFILE.parents[2] / "sweeps")
    # 8 memory images, self excluded: at most 7 neighbours per training image
    spec = parse_sweep({**shipped.to_dict(), "iterations": 4, "pruner": "none",
                        "overrides": {**shipped.overrides, "TEST.EVAL_PERIOD": 2,
                                      "SOLVER.CHECKPOINT_PERIOD": 1000},
                        "space": {**shipped.to_dict()["space"],
                                  "MODEL.MAPS.NUM_RETRIEVED": {"type": "int", "low": 1, "high": 5}}})
    runs = tmp_path / "runs"
    result = run_sweep(spec, trials=2, parallel=2, executor="slurm", profile=PROFILE, runs_root=runs)
    assert result.worker_errors == [], result.worker_errors
    study = open_study(spec, result.storage)
    assert sorted(t.number for t in study.trials) == [0, 1]
    store = RunStore(runs)
    for t in study.trials:
        assert t.state == TrialState.COMPLETE
        run_dir = store.run_dir(f"sweep/{spec.name}/trial{t.number}", 0)
        final = store.read_final(run_dir)
        assert final["iteration"] == 4 and t.values == [final["PQ"]] and math.isfinite(final["PQ"])
        assert (run_dir / "memory.json").is_file()  # trained with the driver-built memory
        assert "_" in store.read_status(run_dir)["job_id"]  # a task of the workers' array
    assert len(list((runs / "_memory").iterdir())) == 1  # one bank for the whole study
