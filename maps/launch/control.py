"""Acting on launched runs: cancel them (Slurm's scancel, or the local process), and find
their logs (per attempt: a requeued job writes on after its restart)."""
from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from maps.launch.progress import LOG_FILE
from maps.launch.runstore import ACTIVE_STATES, RunStore
from maps.launch.scheduler import slurm_available
from maps.launch.specs import LaunchError

__all__ = ["CancelOutcome", "cancel_run", "log_files"]


@dataclass
class CancelOutcome:
    experiment: str
    seed: int
    action: str   # cancelled | skipped
    reason: str = ""


def _signal_local(job_id: Any) -> str:
    # SIGINT, as submitit's own LocalJob.cancel: its job processes bypass SIGTERM (on Slurm a
    # SIGTERM precedes preemption and must not stop the job before it checkpoints)
    try:
        pid = int(job_id)
        os.kill(pid, signal.SIGINT)
    except (TypeError, ValueError):
        return f"no process id in the record ({job_id!r})"
    except ProcessLookupError:
        return "its process was already gone"
    return ""


def cancel_run(store: RunStore, run: Any) -> CancelOutcome:
    """Cancel one run of the store if it is queued or running, and record it ``cancelled``.

    Slurm jobs are cancelled with ``scancel <job id>`` (an array task ``123_4`` alone); a
    local job's process gets SIGINT. The record is written under the run's claim, after
    reading it again, so a run that finished meanwhile stays ``done``.
    """
    status = run.status
    if status.get("state") not in ACTIVE_STATES:
        return CancelOutcome(run.experiment, run.seed, "skipped", f"{status.get('state')}: nothing to cancel")
    executor, job_id = status.get("executor"), status.get("job_id")
    note = ""
    if executor == "slurm":
        if not slurm_available():
            raise LaunchError(f"{run.run_dir}: Slurm job {job_id}: scancel not found on this machine "
                              "(cancel from a login node of the cluster that runs it)")
        done = subprocess.run(["scancel", str(job_id)], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise LaunchError(f"{run.run_dir}: scancel {job_id} failed: {done.stderr.strip()}")
    elif executor == "local":
        note = _signal_local(job_id)
    with store.claim(run.run_dir, timeout_s=30, required=False):
        now = store.read_status(run.run_dir) or {}
        if now.get("state") not in ACTIVE_STATES:
            return CancelOutcome(run.experiment, run.seed, "skipped", f"{now.get('state')} meanwhile")
        store.transition(run.run_dir, "cancelled", error=f"cancelled by maps cancel (job {job_id})")
    return CancelOutcome(run.experiment, run.seed, "cancelled", note or f"{executor} job {job_id}")


def log_files(run_dir: Path, status: Dict[str, Any], attempt: Optional[int] = None) -> List[Path]:
    """The logs of a run, those of ``attempt`` (1-based; default: the last) first:
    the job's stdout and stderr (submitit's files), then the run's own ``log.txt``."""
    attempts = list(status.get("attempts") or [])
    if attempt is not None:
        chosen = [a for a in attempts if a.get("attempt") == attempt]
        if not chosen:
            have = ", ".join(str(a.get("attempt")) for a in attempts) or "none recorded"
            raise LaunchError(f"{run_dir}: no attempt {attempt} (attempts: {have})")
        entry = chosen[0]
    else:
        entry = attempts[-1] if attempts else {"stdout": status.get("log_stdout"),
                                               "stderr": status.get("log_stderr")}
    paths = [Path(p) for p in (entry.get("stdout"), entry.get("stderr")) if p]
    paths.append(Path(run_dir) / LOG_FILE)
    return [p for p in dict.fromkeys(paths) if p.is_file()]
