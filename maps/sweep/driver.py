"""The driver of ``maps sweep NAME``: validate, create the study once, submit the workers."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple



if TYPE_CHECKING:  # optuna and detectron2 are heavy: keep them out of `maps --help`
    pass

logger = logging.getLogger(__name__)

from maps.sweep.spec import EXECUTORS, SweepError, SweepSpec, trials_base, validate_space
from maps.sweep.study import STORAGE_ENV, _file_lock, _started, default_storage_url, fail_stale_trials, mask_url, open_study, study_dir
from maps.sweep.worker import SweepWorker, _job_error


# ---------------------------------------------------------------------------------------------
# the driver: `maps sweep NAME`
# ---------------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    """What one ``maps sweep`` invocation did (``storage``: the URL, its password masked)."""

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
              validate: bool = True, wait: bool = True, allow_random_weights: bool = False) -> SweepResult:
    """Run ``trials`` more trials of ``spec``'s study on ``parallel`` workers.

    The space is validated and the study created here, once, before any worker starts (two
    workers creating one study at once is a race in every Optuna storage). Trials of workers
    that died since the last invocation are marked failed first; then the study continues:
    the count of new trials is shared by the workers through the storage. A worker that dies
    is reported in ``worker_errors`` and does not stop the others. ``wait=False`` returns once
    the workers are submitted (a long Slurm study need not hold a login-node shell).

    A storage password is never shown nor pickled into a job: the workers carry the URL
    masked (:func:`~maps.sweep.study.mask_url`) and read the real one from
    ``$MAPS_OPTUNA_STORAGE``, which this function sets while it submits and waits (local jobs
    copy the environment; sbatch exports it by default). Setting ``MAPS_OPTUNA_STORAGE``
    yourself, instead of ``--storage``, also keeps it out of ``ps`` and the shell history.
    """

    from maps.launch import load_profile, make_executor, memory_prereq
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
    # refused here, before the study or any file exists, when a pretrained file is missing
    _, memory = trials_base(spec, registry, allow_random_weights)
    storage = storage or default_storage_url(runs_root, spec.name)
    shown = mask_url(storage)
    study = open_study(spec, storage, create=True)
    sdir = study_dir(runs_root, spec.name)
    with _file_lock(sdir / "ask.lock"):
        stale = fail_stale_trials(study, sdir, spec.grace_period, runs_root)
        started = _started(study)
        target = started + trials
    leftovers = sorted(p.name for p in sdir.glob("trial*"))
    if started == 0 and leftovers:
        raise SweepError(f"{sdir}: runs {', '.join(leftovers[:3])} belong to an earlier study named "
                         f"'{spec.name}' that is not in {shown}; move them away or rename the sweep")
    if profile is None or isinstance(profile, (str, os.PathLike)):
        profile = load_profile(profile)
    dependency = None
    if memory is not None:
        # one bank and neighbour caches (k = 20, enough for every k and pool in a space)
        # shared by all trials, built once by a job of its own, as `maps launch` builds it
        # for its runs: on Slurm the workers wait for it (afterok), so nothing heavy runs on
        # the login node; locally it is built before the workers start
        from maps.launch.launcher import build_prerequisites

        job_of, _ = build_prerequisites([memory_prereq(memory, runs_root)], executor, profile,
                                        runs_root / ".submitit" / "%j")
        deps = sorted(j for j in job_of.values() if j)
        dependency = "afterok:" + ":".join(deps) if deps else None
    ex = make_executor(executor, sdir / "workers", profile, name=f"sweep-{spec.name}", dependency=dependency)
    workers = [SweepWorker(spec.to_dict(), shown, str(runs_root), target, worker=i,
                           experiments_root=str(experiments_root) if experiments_root else None,
                           allow_random_weights=allow_random_weights)
               for i in range(min(parallel, trials))]
    with _storage_in_environment(storage, shown):
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
        if wait:  # (the debug executor runs its jobs here, in this process)
            by_worker, errors = _collect(jobs)
            # submitit's local jobs sit in reference cycles: collected at interpreter exit,
            # their __del__ fails noisily, so drop and collect them now
            del jobs
            import gc

            gc.collect()
    counts: Dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return SweepResult(spec.name, shown, target, by_worker, errors, stale, counts, job_ids)


@contextlib.contextmanager
def _storage_in_environment(storage: str, shown: str) -> Iterator[None]:
    """``$MAPS_OPTUNA_STORAGE`` = the real URL while workers are submitted and run, when the URL
    carries a password (the workers only carry ``shown``); restored afterwards."""
    if shown == storage:
        yield
        return
    before = os.environ.get(STORAGE_ENV)
    os.environ[STORAGE_ENV] = storage
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(STORAGE_ENV, None)
        else:
            os.environ[STORAGE_ENV] = before
