"""The driver of ``maps sweep NAME``: validate, create the study once, submit the workers."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple



if TYPE_CHECKING:  # optuna and detectron2 are heavy: keep them out of `maps --help`
    pass

logger = logging.getLogger(__name__)

from maps.sweep.spec import EXECUTORS, SweepError, SweepSpec, _sweep_memory, base_config, validate_space
from maps.sweep.study import _file_lock, _started, default_storage_url, fail_stale_trials, open_study, study_dir
from maps.sweep.worker import SweepWorker, _job_error


# ---------------------------------------------------------------------------------------------
# the driver: `maps sweep NAME`
# ---------------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    """What one ``maps sweep`` invocation did."""

    study: str
    storage: str
    target: int
    trials_by_worker: List[Optional[List[int]]]
    worker_errors: List[str]
    stale_failed: List[int]
    counts: Dict[str, int]
    job_ids: List[str] = field(default_factory=list)


def _collect(jobs: Sequence[Any]) -> Tuple[List[Optional[List[int]]], List[str]]:
    """Each worker's trial numbers (None for a worker that died) and the workers' errors."""
    by_worker: List[Optional[List[int]]] = []
    errors: List[str] = []
    for i, job in enumerate(jobs):
        try:
            by_worker.append(list(job.result()))
        except Exception as e:  # a dead worker: its trial is failed by the heartbeat check
            by_worker.append(None)
            errors.append(f"worker {i} (job {getattr(job, 'job_id', '?')}): {_job_error(e)}")
    return by_worker, errors


def run_sweep(spec: SweepSpec, trials: int, parallel: int = 1, executor: str = "local",
              storage: Optional[str] = None, runs_root: Optional[os.PathLike] = None,
              profile: Any = None, experiments_root: Optional[os.PathLike] = None,
              validate: bool = True, wait: bool = True) -> SweepResult:
    """Run ``trials`` more trials of ``spec``'s study on ``parallel`` workers.

    The space is validated and the study created here, once, before any worker starts (two
    workers creating one study at once is a race in every Optuna storage). Trials of workers
    that died since the last invocation are marked failed first; then the study continues:
    the count of new trials is shared by the workers through the storage. A worker that dies
    is reported in ``worker_errors`` and does not stop the others. ``wait=False`` returns once
    the workers are submitted (a long Slurm study need not hold a login-node shell).
    """

    from maps.launch import load_profile, make_executor
    from maps.registry import load_registry
    from maps.launch.runstore import default_runs_root

    if executor not in EXECUTORS:
        raise SweepError(f"--executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
    if trials < 1 or parallel < 1:
        raise SweepError(f"--trials and --parallel must be >= 1 (got {trials}, {parallel})")
    runs_root = Path(runs_root) if runs_root is not None else default_runs_root()
    runs_root = runs_root.absolute()
    registry = load_registry(experiments_root, validate=False)
    if validate:
        validate_space(spec, registry)
    storage = storage or default_storage_url(runs_root, spec.name)
    study = open_study(spec, storage, create=True)
    sdir = study_dir(runs_root, spec.name)
    with _file_lock(sdir / "ask.lock"):
        stale = fail_stale_trials(study, sdir, spec.grace_period, runs_root)
        started = _started(study)
        target = started + trials
    leftovers = sorted(p.name for p in sdir.glob("trial*"))
    if started == 0 and leftovers:
        raise SweepError(f"{sdir}: runs {', '.join(leftovers[:3])} belong to an earlier study named "
                         f"'{spec.name}' that is not in {storage}; move them away or rename the sweep")
    memory = _sweep_memory(spec, registry, base_config(spec, registry))
    if memory is not None:
        # one bank and neighbour caches (k = 20, enough for every k and pool in a space)
        # shared by all trials, built here once, as `maps launch` builds it for its runs
        from maps.memory.prepare import memory_dir, normalize_spec, prepare_memory

        prepare_memory(memory_dir(memory, runs_root), **normalize_spec(memory))
    if profile is None or isinstance(profile, (str, os.PathLike)):
        profile = load_profile(profile)
    ex = make_executor(executor, sdir / "workers", profile, name=f"sweep-{spec.name}")
    workers = [SweepWorker(spec.to_dict(), storage, str(runs_root), target, worker=i,
                           experiments_root=str(experiments_root) if experiments_root else None)
               for i in range(min(parallel, trials))]
    if executor == "slurm":
        with ex.batch():
            jobs = [ex.submit(w) for w in workers]
    else:
        jobs = [ex.submit(w) for w in workers]
    logger.info("study %s: %d workers submitted (%s), target %d trials", spec.name, len(jobs),
                executor, target)
    job_ids = [str(getattr(j, "job_id", "")) for j in jobs]
    by_worker: List[Optional[List[int]]] = []
    errors: List[str] = []
    if wait:
        by_worker, errors = _collect(jobs)
        # submitit's local jobs sit in reference cycles: collected at interpreter exit, their
        # __del__ fails noisily, so drop and collect them now
        del jobs
        import gc

        gc.collect()
    counts: Dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return SweepResult(spec.name, storage, target, by_worker, errors, stale, counts, job_ids)
