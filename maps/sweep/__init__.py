"""Optuna studies over the MAPS knobs (``sweeps/*.yaml``), run by parallel workers.

Owns: ``spec`` (a sweep file: search space, objective, sampler, pruner, validated against the
experiment's model), ``study`` (the shared study in a journal file or RDB, and the heartbeats
that find dead workers), ``worker`` (ask, train, tell), ``trial`` (what one trial trains:
detectron2 training with a pruning hook), ``driver`` (``maps sweep NAME``) and ``report``
(best trials, importances, plots, registering the best trial as an experiment).
May import: ``maps.launch`` (executors, run store), ``maps.registry``, ``maps.engine``.
"""
from maps.sweep.driver import SweepResult, run_sweep
from maps.sweep.spec import (
    DEFAULT_TASK,
    EXECUTORS,
    INTERMEDIATE_KEY,
    ParamSpec,
    SweepError,
    SweepSpec,
    base_config,
    load_sweep,
    parse_sweep,
    sweep_root,
    trial_config,
    validate_space,
)
from maps.sweep.study import (
    default_storage_url,
    fail_stale_trials,
    make_storage,
    open_study,
    study_dir,
    trial_experiment,
)
from maps.sweep.worker import SweepWorker, TrialReporter

__all__ = [
    "DEFAULT_TASK", "EXECUTORS", "INTERMEDIATE_KEY", "ParamSpec", "SweepError", "SweepSpec",
    "base_config", "load_sweep", "parse_sweep", "sweep_root", "trial_config", "validate_space",
    "default_storage_url", "fail_stale_trials", "make_storage", "open_study", "study_dir",
    "trial_experiment", "SweepWorker", "TrialReporter", "SweepResult", "run_sweep",
]
