"""What runs inside a job: a run that records its life in the run store and requeues itself
on preemption, and a prerequisite build."""

from __future__ import annotations

import logging
import os
import traceback
from typing import Any, Dict, Optional

import submitit

from maps.io import atomic_write_json, make_dir
from maps.launch.runstore import (
    RunStore,
    now_iso,
    traceback_tail,
)

logger = logging.getLogger(__name__)
from maps.launch.specs import PrereqSpec, config_value, resolve_task
from maps.launch.distributed import distributed_env, init_distributed, teardown_distributed

# ---------------------------------------------------------------------------------------------
# What runs inside a job
# ---------------------------------------------------------------------------------------------
def _per_worker_batch(config_yaml: str, world_size: int) -> Optional[int]:
    total = config_value(config_yaml, "SOLVER.IMS_PER_BATCH")
    return None if total is None else int(total) // max(world_size, 1)


def _set_threads(threads: Any) -> None:
    """One task's CPU threads as its allocation says, not the library default (every core of
    the node, which oversubscribes a shared node when several tasks run on it)."""
    if not threads or int(threads) < 1:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(int(threads))  # for libraries and children started from here on
    import torch

    torch.set_num_threads(int(threads))


def _attempt_logs(attempt: int, job_id: Optional[str], old: Dict[str, Any]) -> Dict[str, Any]:
    """Where this attempt's stdout and stderr go (``maps logs --attempt N``): submitit's files
    of this job, else the ones recorded at submission."""
    entry: Dict[str, Any] = {"attempt": attempt, "job_id": job_id,
                             "stdout": old.get("log_stdout"), "stderr": old.get("log_stderr")}
    try:
        paths = submitit.JobEnvironment().paths
        entry.update(stdout=str(paths.stdout).replace("%t", "0"), stderr=str(paths.stderr).replace("%t", "0"))
    except Exception:  # not inside a submitit job (a direct call), or the debug executor
        # (no job folder): the paths recorded at submission stand
        pass
    return entry


class RunTask(submitit.helpers.Checkpointable):
    """The submitted callable of one run: records its life in the run store, resumes on requeue.

    ``checkpoint`` (called by submitit on SIGUSR2: preemption or timeout) hands back a copy with
    ``resume=True``; submitit requeues that copy, and the task then resumes from detectron2's
    last checkpoint in the same run directory.
    """

    def __init__(self, run_dir: str, store_root: str, task: str, config_yaml: str, seed: int,
                 resume: bool = False, threads: Optional[int] = None) -> None:
        self.run_dir = str(run_dir)
        self.store_root = str(store_root)
        self.task = task
        self.config_yaml = config_yaml
        self.seed = int(seed)
        self.resume = bool(resume)
        #: intra-op threads of each task: the profile's cpus_per_task (Slurm's own value wins)
        self.threads = threads

    def __call__(self) -> Dict[str, Any]:
        store = RunStore(self.store_root)
        env = distributed_env()
        resume = self.resume or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
        per_worker = _per_worker_batch(self.config_yaml, env.world_size)
        if env.is_main:
            with store.claim(self.run_dir, timeout_s=120, required=False):
                old = store.read_status(self.run_dir) or {}
                attempt = int(old.get("attempt", 0)) + 1
                store.transition(
                    self.run_dir, "running", attempt=attempt, resumed=resume,
                    job_id=env.job_id or old.get("job_id"), world_size=env.world_size,
                    ims_per_worker=per_worker,
                    attempts=list(old.get("attempts") or []) + [_attempt_logs(attempt, env.job_id, old)],
                )
        if per_worker is not None:
            logger.info("IMS_PER_BATCH is the total over %d workers: %d images per worker",
                        env.world_size, per_worker)
        _set_threads(os.environ.get("SLURM_CPUS_PER_TASK") or getattr(self, "threads", None))
        try:
            init_distributed(env)
            fn = resolve_task(self.task)
            metrics = fn(self.run_dir, self.config_yaml, self.seed, resume)
        except Exception as e:
            if env.is_main:
                with store.claim(self.run_dir, timeout_s=120, required=False):
                    store.transition(self.run_dir, "failed", error=f"{type(e).__name__}: {e}",
                                     traceback=traceback_tail(traceback.format_exc()))
            raise
        finally:
            teardown_distributed()
        metrics = dict(metrics or {})
        if env.is_main:
            store.write_final(self.run_dir, metrics)
            with store.claim(self.run_dir, timeout_s=120, required=False):
                store.transition(self.run_dir, "done")
        return metrics

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Requeue a copy that resumes; record it (runs in a signal handler, on rank 0 only)."""
        try:
            store = RunStore(self.store_root)
            # the main thread may hold the claim: don't wait long for it inside a handler
            with store.claim(self.run_dir, timeout_s=5, required=False):
                old = store.read_status(self.run_dir) or {}
                store.transition(self.run_dir, "queued", requeues=int(old.get("requeues", 0)) + 1,
                                 requeued_at=now_iso(), submitted_at=old.get("submitted_at"))
        except Exception:  # never let bookkeeping prevent the requeue
            logger.exception("could not record the requeue of %s", self.run_dir)
        resumed = RunTask(self.run_dir, self.store_root, self.task, self.config_yaml, self.seed, resume=True,
                          threads=self.threads)
        return submitit.helpers.DelayedSubmission(resumed, *args, **kwargs)


class PrereqTask:
    """Builds one prerequisite, then writes its completion marker (atomically)."""

    def __init__(self, spec: PrereqSpec) -> None:
        self.spec = spec

    def __call__(self) -> Any:
        fn = resolve_task(self.spec.task)
        make_dir(self.spec.output_dir, self.spec.kind)  # marked only if it makes it
        result = fn(self.spec.output_dir, **dict(self.spec.kwargs))
        atomic_write_json(self.spec.marker, {"task": self.spec.task, "finished_at": now_iso()})
        return result


