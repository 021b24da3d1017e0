"""A real study: the shipped synthetic sweep, real detectron2 training of the tiny model.

Slow (each trial trains and evaluates the tiny Mask2Former on CPU), so marked ``slow``.
The memory wiring of MAPS (retrieved tokens in the data loader) needs a memory bank and a
neighbour cache; the space is validated against the MAPS experiment as shipped, and the
trials then train with ``MODEL.MAPS.ENABLED False`` on a 10-image dataset.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
from optuna.trial import TrialState

from maps.launch.runstore import RunStore
from maps.sweep import load_sweep, open_study, run_sweep, validate_space

from .conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture
def synthetic_datasets(tmp_path, monkeypatch):
    from maps.data import generate_synthetic_dataset, register_synthetic

    root = tmp_path / "datasets"
    generate_synthetic_dataset(root / "synthetic", num_train=8, num_val=2, size=128, seed=0,
                               progress=False)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))  # the workers register it from here
    register_synthetic("synthetic", str(root / "synthetic"))
    return root


def test_synthetic_study_two_local_workers_real_training(synthetic_datasets, runs_root):
    shipped = load_sweep("synthetic_retrieval", root=REPO / "sweeps")
    validate_space(shipped)  # the space as shipped, against the MAPS experiment
    spec = dataclasses.replace(
        shipped, iterations=4,
        overrides={**shipped.overrides, "TEST.EVAL_PERIOD": 2, "MODEL.MAPS.ENABLED": False,
                   "SOLVER.CHECKPOINT_PERIOD": 1000},
        pruner={"name": "none"})
    result = run_sweep(spec, trials=2, parallel=2, executor="local", runs_root=runs_root,
                       validate=False)
    assert result.worker_errors == [], result.worker_errors
    assert result.counts == {"COMPLETE": 2}
    study = open_study(spec, result.storage)
    store = RunStore(runs_root)
    for t in study.trials:
        assert t.state == TrialState.COMPLETE
        run_dir = store.run_dir(f"sweep/synthetic_retrieval/trial{t.number}", 0)
        final = store.read_final(run_dir)
        assert final["iteration"] == 4 and t.values == [final["PQ"]] and math.isfinite(final["PQ"])
        # the evaluation after iteration 2 was reported to the pruner
        assert list(t.intermediate_values) == [2]
        assert store.read_status(run_dir)["state"] == "done"
        metrics = [m for m in store.read_metrics(run_dir) if "panoptic_seg/PQ" in m]
        assert [m["iteration"] for m in metrics][:1] == [1]
