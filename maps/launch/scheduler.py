"""What the scheduler says about jobs (squeue, sacct, the process table), and reconciling
records whose job is gone."""
from __future__ import annotations

import contextlib
import getpass
import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from maps.launch.runstore import ACTIVE_STATES, RunStore
from maps.launch.specs import LaunchError

logger = logging.getLogger(__name__)

#: Slurm states in which a job may still run (squeue's and sacct's spellings).
SLURM_ALIVE_STATES = frozenset(
    "PENDING RUNNING REQUEUED REQUEUE_FED REQUEUE_HOLD RESIZING SUSPENDED CONFIGURING "
    "COMPLETING STAGE_OUT SIGNALING RESV_DEL_HOLD".split()
)


# ---------------------------------------------------------------------------------------------
# Slurm's view
# ---------------------------------------------------------------------------------------------
def slurm_available() -> bool:
    import shutil

    return shutil.which("sbatch") is not None and shutil.which("squeue") is not None


def slurm_job_states(job_ids: Sequence[str]) -> Dict[str, str]:
    """State of each job id (``123`` or ``123_4``) as Slurm sees it; ``GONE`` if it knows nothing.

    squeue first (live jobs, array tasks expanded with ``-r``), then sacct for the ended ones.
    Commands run with argument lists, never through a shell.
    """
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    states: Dict[str, str] = {}
    q = subprocess.run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T"],
                       capture_output=True, text=True, timeout=60)
    if q.returncode == 0:
        for line in q.stdout.splitlines():
            jid, _, state = line.strip().partition("|")
            states[jid] = state.strip()
    missing = [j for j in ids if j not in states]
    if missing:
        a = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(missing), "-o", "JobID,State"],
                           capture_output=True, text=True, timeout=60)
        if a.returncode == 0:
            for line in a.stdout.splitlines():
                jid, _, state = line.strip().partition("|")
                if jid in missing:
                    states[jid] = state.split()[0] if state.strip() else "UNKNOWN"
        elif q.returncode != 0:
            raise LaunchError(f"cannot ask Slurm for job states: {(a.stderr or q.stderr).strip()}")
    return {j: states.get(j, "GONE") for j in ids}


def _local_job_alive(status: Mapping[str, Any]) -> bool:
    host = status.get("hostname") or status.get("submit_host")
    if host and host != socket.gethostname():
        return True  # another machine's job: cannot tell, assume it lives
    try:
        os.kill(int(status.get("job_id") or 0), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return int(status.get("job_id") or 0) > 0


def reconcile(store: RunStore, run_dir: Path, status: Optional[Dict[str, Any]],
              slurm_states: Optional[Mapping[str, str]] = None, claimed: bool = False) -> Optional[Dict[str, Any]]:
    """A queued/running record whose job is gone is not alive: record it as failed/cancelled.

    The verdict is written under the run's claim, after reading the record again: a job that
    finished between the first read and Slurm's answer has written ``done`` by then (it takes
    the same claim), and that record must win. Pass ``claimed=True`` when the caller holds it.
    """
    if not status or status.get("state") not in ACTIVE_STATES:
        return status
    verdict = _verdict(status, slurm_states)
    if verdict is None:
        return status
    state, error = verdict
    with contextlib.ExitStack() as stack:
        if not claimed:
            stack.enter_context(store.claim(run_dir, timeout_s=30, required=False))
        now = store.read_status(run_dir) or {}
        if now.get("state") != status.get("state") or now.get("job_id") != status.get("job_id"):
            return now
        return store.transition(run_dir, state, error=error)


def _verdict(status: Mapping[str, Any], slurm_states: Optional[Mapping[str, str]]) -> Optional[Tuple[str, str]]:
    """(new state, error) if the job of an active record is gone, else None."""
    executor = status.get("executor")
    job_id = status.get("job_id")
    if executor == "slurm" and job_id:
        if slurm_states is not None and job_id in slurm_states:
            states = slurm_states
        elif slurm_available():
            states = slurm_job_states([job_id])
        else:  # not on the cluster that runs it: cannot tell, so it may be alive
            return None
        state = states.get(job_id, "GONE")
        if state in SLURM_ALIVE_STATES:
            return None
        return ("cancelled" if state.startswith("CANCELLED") else "failed",
                f"Slurm job {job_id} is {state} but the run never finished")
    if executor == "local" and job_id and not _local_job_alive(status):
        return "failed", f"local job {job_id} is gone but the run never finished"
    if executor == "debug" and not _local_job_alive({**status, "job_id": status.get("submit_pid")}):
        # runs inside its launcher: nothing outlives it
        return "failed", "debug run interrupted before it finished"
    return None


