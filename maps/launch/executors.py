"""submitit executors (slurm / local / debug) with a profile's resources."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

import submitit

from maps.errors import ConfigError

logger = logging.getLogger(__name__)
from maps.launch.specs import LaunchError
from maps.launch.profiles import ClusterProfile
from maps.launch.scheduler import slurm_available

def make_executor(executor: str, folder: Path, profile: ClusterProfile, name: str,
                  dependency: Optional[str] = None) -> submitit.Executor:
    """A submitit executor with the profile's resources; logs go under ``folder``."""
    if executor == "debug":
        return submitit.DebugExecutor(folder=folder)
    if executor == "local":
        # signal_delay_s is Slurm's: the local executor keeps submitit's own (30 s)
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=profile.max_num_timeout)
        ex.update_parameters(timeout_min=profile.timeout_min, tasks_per_node=profile.ntasks_per_node,
                             gpus_per_node=profile.gpus_per_node, setup=list(profile.setup))
        return ex
    if not slurm_available():
        raise LaunchError("executor 'slurm': sbatch/squeue not found on PATH (use --executor local)")
    # a timeout is requeued (from the run's checkpoint) up to max_num_timeout times
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=profile.max_num_timeout)
    params: Dict[str, Any] = dict(
        job_name=name, time=profile.timeout_min, nodes=profile.nodes,
        ntasks_per_node=profile.ntasks_per_node, cpus_per_task=profile.cpus_per_task,
        array_parallelism=profile.array_parallelism, setup=list(profile.setup),
        # USR2 this long before the time limit, so a timeout is a requeue, not a loss
        signal_delay_s=profile.signal_delay_s,
    )
    if profile.gpus_per_node:
        params["gpus_per_node"] = profile.gpus_per_node
    if profile.mem_gb is not None:
        params["mem"] = f"{int(profile.mem_gb * 1024)}M"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(profile, key):
            params[key] = getattr(profile, key)
    if profile.exclusive:
        params["exclusive"] = True
    if profile.srun_args:
        params["srun_args"] = list(profile.srun_args)
    additional = profile.sbatch_parameters()
    if dependency:
        params["dependency"] = dependency
        # a failed prerequisite cancels its runs instead of leaving them pending forever
        additional.setdefault("kill_on_invalid_dep", "yes")
    if additional:
        params["additional_parameters"] = additional
    try:
        ex.update_parameters(**params)
    except (NameError, ValueError) as e:
        raise ConfigError(f"{profile.source}: {e}") from None
    return ex


