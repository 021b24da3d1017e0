"""Launching experiments' runs as jobs (Slurm through submitit, or this machine).

Owns: ``specs`` (a run and its prerequisites, tasks named by import path), ``profiles``
(cluster profiles), ``executors`` (submitit executors with a profile's resources),
``scheduler`` (what Slurm or the process table says about jobs; reconciling records),
``tasks`` (what runs inside a job: record, train, requeue on preemption), ``distributed``
(torch.distributed inside a job), ``runstore`` (one directory per run and its records),
``memory_jobs`` (memory builds as prerequisites), ``plan`` (registry selection -> runs; run
store -> status rows) and ``launcher`` (idempotent submission).
May import: ``maps.registry``, ``maps.engine`` (tasks, run records), ``maps.memory``
(preparing a memory). Nothing here imports sweep, report, demo or the commands.
"""
from maps.launch.distributed import DistributedEnv, distributed_env, init_distributed, teardown_distributed
from maps.launch.executors import make_executor
from maps.launch.launcher import LaunchOutcome, LaunchReport, launch, wait_for_jobs
from maps.launch.memory_jobs import memory_prereq
from maps.launch.cost import RunCost, estimate_costs
from maps.launch.plan import override_tag, parse_overrides, plan_runs, select_runs, status_rows
from maps.launch.profiles import ClusterProfile, load_profile
from maps.launch.runstore import RunStore, RunStoreError
from maps.launch.scheduler import SLURM_ALIVE_STATES, reconcile, slurm_available, slurm_job_states
from maps.launch.specs import DEFAULT_TASK, EXECUTORS, LaunchError, PrereqSpec, RunSpec, resolve_task
from maps.launch.tasks import PrereqTask, RunTask

__all__ = [
    "DistributedEnv", "distributed_env", "init_distributed", "teardown_distributed", "make_executor",
    "LaunchOutcome", "LaunchReport", "launch", "wait_for_jobs", "memory_prereq", "plan_runs",
    "select_runs", "status_rows", "override_tag", "parse_overrides", "RunCost", "estimate_costs", "ClusterProfile", "load_profile", "RunStore", "RunStoreError",
    "SLURM_ALIVE_STATES", "reconcile", "slurm_available", "slurm_job_states", "DEFAULT_TASK",
    "EXECUTORS", "LaunchError", "PrereqSpec", "RunSpec", "resolve_task", "PrereqTask", "RunTask",
]
