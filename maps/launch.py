"""Launching runs through submitit: Slurm job arrays, or this machine (local / debug).

``launch(runs, executor, profile)`` is idempotent: each run is claimed with an exclusive lock
on its directory across check-and-submit, and a run that is done, queued or running (checked
against Slurm's own view) is not submitted again. Failed and cancelled runs are relaunched
only with ``retry_failed``.

What runs inside a job is :class:`RunTask`, a ``submitit.helpers.Checkpointable``: on
preemption or timeout (SIGUSR2) submitit calls its ``checkpoint``, which requeues it; the
restarted job calls the task again with ``resume=True`` in the same run directory. One process
per GPU (``tasks_per_node = gpus_per_node``) sets up ``torch.distributed`` from submitit's
``JobEnvironment``; only rank 0 writes records.

Runs may need other work first: ``RunSpec.prerequisites`` (a memory build, built once per
output directory, its runs submitted with ``afterok`` on its job) and ``RunSpec.after`` (other
runs, e.g. the training run an evaluation-only run evaluates: ``afterok`` on that run's job
on Slurm; with local/debug executors the waited-for runs are launched to the end first).

The training task has the signature ``task(run_dir, config_yaml, seed, resume) -> dict`` and
is named by import path (``"maps.engine.train:run_training"``), so a job pickles a string,
not the function.
"""
from __future__ import annotations

import contextlib
import dataclasses
import getpass
import hashlib
import importlib
import logging
import os
import socket
import subprocess
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import submitit
import yaml

from maps.errors import ConfigError, MapsError
from maps.io import atomic_write_json
from maps.runstore import (
    ACTIVE_STATES,
    FAILED_STATES,
    RunStore,
    now_iso,
    traceback_tail,
)

logger = logging.getLogger(__name__)

EXECUTORS = ("slurm", "local", "debug")
DEFAULT_TASK = "maps.engine.train:run_training"
PREREQ_MARKER = "_COMPLETE"
_PREREQ_JOB = ".prereq_job.json"
_PREREQ_LOCK = ".prereq.lock"

#: Slurm states in which a job may still run (squeue's and sacct's spellings).
SLURM_ALIVE_STATES = frozenset(
    "PENDING RUNNING REQUEUED REQUEUE_FED REQUEUE_HOLD RESIZING SUSPENDED CONFIGURING "
    "COMPLETING STAGE_OUT SIGNALING RESV_DEL_HOLD".split()
)


class LaunchError(MapsError):
    """A launch could not be done as asked (bad run list, submission refused, prerequisite failed)."""


# ---------------------------------------------------------------------------------------------
# What to run
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrereqSpec:
    """A job that must finish before some runs start (a memory bank, a neighbour cache).

    ``task(output_dir, **kwargs)`` builds into ``output_dir``; the launcher writes the marker
    ``output_dir/_COMPLETE`` once it returns, so a half-built output is never taken as done.
    Specs with the same ``output_dir`` are the same prerequisite and are built once.
    """

    task: str
    output_dir: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def marker(self) -> Path:
        return Path(self.output_dir) / PREREQ_MARKER

    def is_complete(self) -> bool:
        return self.marker.is_file()


@dataclass
class RunSpec:
    """One run: an experiment at one seed, with its resolved config and the task to run."""

    experiment: str
    seed: int
    config: Any  # detectron2 CfgNode or YAML text
    task: str = DEFAULT_TASK
    prerequisites: Sequence[PrereqSpec] = ()
    #: runs (experiment, seed) that must end ``done`` before this one starts: an evaluation
    #: run's training run. On Slurm an ``afterok`` dependency; locally, a run launched later.
    after: Sequence[Tuple[str, int]] = ()

    def config_yaml(self) -> str:
        if isinstance(self.config, str):
            return self.config
        dump = getattr(self.config, "dump", None)
        if dump is None:
            raise LaunchError(f"{self.experiment} seed {self.seed}: config must be a CfgNode or YAML text")
        return dump()


def resolve_task(path: str) -> Callable[..., Any]:
    """Import ``"package.module:function"``; a clear error names a bad path."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise LaunchError(f"task {path!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise LaunchError(f"task {path!r}: cannot import {module_name} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise LaunchError(f"task {path!r}: {module_name} has no function {attr!r}")
    return fn


# ---------------------------------------------------------------------------------------------
# Cluster profiles
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClusterProfile:
    """Resources of one job, from a cluster profile YAML (slurm/profiles/*.yaml).

    ``gpus_per_node`` GPUs per node become as many processes (``tasks_per_node``), one per
    GPU; without GPUs ``tasks_per_node`` may still ask for several CPU processes (gloo).
    """

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: Optional[int] = None
    cpus_per_task: int = 1
    mem_gb: Optional[float] = None
    timeout_min: int = 60
    array_parallelism: int = 256
    setup: Tuple[str, ...] = ()
    additional_parameters: Mapping[str, Any] = field(default_factory=dict)
    source: str = "<defaults>"

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    def resources(self) -> Dict[str, Any]:
        """The resources as plain data (dry runs, status records)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "source" and v not in (None, (), {})}
        out["tasks_per_node"] = self.ntasks_per_node
        out["setup"] = list(self.setup)
        return out


_PROFILE_TYPES: Dict[str, Tuple[type, ...]] = {
    "partition": (str,), "account": (str,), "qos": (str,), "constraint": (str,),
    "nodes": (int,), "gpus_per_node": (int,), "tasks_per_node": (int,), "cpus_per_task": (int,),
    "mem_gb": (int, float), "timeout_min": (int,), "array_parallelism": (int,),
    "setup": (list,), "additional_parameters": (dict,),
}
_PROFILE_MIN = {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1,
                "mem_gb": 0, "timeout_min": 1, "array_parallelism": 1}
# keys submitit sets itself from the typed fields: overriding them through
# additional_parameters would silently disagree with what the launcher believes it asked for
_RESERVED_ADDITIONAL = {"ntasks_per_node", "nodes", "gpus_per_node", "gres", "time", "dependency", "array"}


def load_profile(path: Optional[Union[str, os.PathLike]]) -> ClusterProfile:
    """Read and validate a profile; every mistake is a ConfigError naming the file and key."""
    if path is None:
        return ClusterProfile()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: cluster profile not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a cluster profile is a mapping of keys, got {type(data).__name__}")
    values: Dict[str, Any] = {}
    for key, value in data.items():
        if key not in _PROFILE_TYPES:
            raise ConfigError(f"{path}: unknown key {key!r} (allowed: {', '.join(sorted(_PROFILE_TYPES))})")
        if value is None:
            continue
        types = _PROFILE_TYPES[key]
        if isinstance(value, bool) or not isinstance(value, types):
            want = " or ".join(t.__name__ for t in types)
            raise ConfigError(f"{path}: key {key!r} must be {want}, got {value!r}")
        if key in _PROFILE_MIN and value < _PROFILE_MIN[key]:
            raise ConfigError(f"{path}: key {key!r} must be >= {_PROFILE_MIN[key]}, got {value!r}")
        if key == "setup":
            if not all(isinstance(line, str) for line in value):
                raise ConfigError(f"{path}: key 'setup' must be a list of shell lines (strings)")
            value = tuple(value)
        if key == "additional_parameters":
            clash = sorted(_RESERVED_ADDITIONAL & set(value))
            if clash:
                raise ConfigError(f"{path}: key 'additional_parameters' may not set {clash}: use the profile's own keys")
        values[key] = value
    gpus, tasks = values.get("gpus_per_node", 0), values.get("tasks_per_node")
    if gpus and tasks is not None and tasks != gpus:
        raise ConfigError(
            f"{path}: key 'tasks_per_node' is {tasks} but gpus_per_node is {gpus}: "
            f"one process per GPU (leave tasks_per_node out)"
        )
    return ClusterProfile(source=str(path), **values)


# ---------------------------------------------------------------------------------------------
# Distributed setup inside a job
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits in a job: what torch.distributed's env:// method needs."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    job_id: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _port_for(job_id: str) -> int:
    """A port per job, the same on every task of it, so that jobs sharing a node don't clash."""
    digest = hashlib.sha1(job_id.encode()).digest()
    return 20000 + int.from_bytes(digest[:4], "big") % 30000


def distributed_env() -> DistributedEnv:
    """Read ranks from submitit's JobEnvironment inside a job, else from torchrun-style env vars.

    ``MASTER_PORT`` in the environment wins over the port derived from the job id.
    """
    try:
        job = submitit.JobEnvironment()
        job_id = str(job.job_id)
        world = int(job.num_tasks)
        nodes = max(int(job.num_nodes), 1)
        hostnames = list(job.hostnames) if nodes > 1 else []
        return DistributedEnv(
            rank=int(job.global_rank),
            local_rank=int(job.local_rank),
            world_size=world,
            local_world_size=max(world // nodes, 1),
            node_rank=int(job.node),
            master_addr=os.environ.get("MASTER_ADDR") or (hostnames[0] if hostnames else "127.0.0.1"),
            master_port=int(os.environ.get("MASTER_PORT") or _port_for(job_id)),
            job_id=job_id,
        )
    except RuntimeError:  # not inside a submitit job
        env = os.environ
        world = int(env.get("WORLD_SIZE", 1))
        return DistributedEnv(
            rank=int(env.get("RANK", 0)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=world,
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            node_rank=int(env.get("GROUP_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )


def init_distributed(env: Optional[DistributedEnv] = None, backend: Optional[str] = None,
                     timeout_s: float = 300.0) -> DistributedEnv:
    """Start torch.distributed for detectron2's ``comm`` (no-op for a single process).

    Exports MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK so libraries reading them agree,
    uses nccl on GPU and gloo on CPU, and creates detectron2's local process group (its
    ``get_local_rank`` needs it).
    """
    env = env or distributed_env()
    if env.world_size <= 1:
        return env
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return env
    os.environ.update(
        MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port), RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
    )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(
        backend=backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank, world_size=env.world_size, timeout=datetime.timedelta(seconds=timeout_s),
    )
    from detectron2.utils import comm

    if comm._LOCAL_PROCESS_GROUP is None:
        comm.create_local_process_group(env.local_world_size)
    return env


def teardown_distributed() -> None:
    import sys

    if "torch" not in sys.modules:  # never started: don't pay torch's import for nothing
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from detectron2.utils import comm

        dist.destroy_process_group()
        comm._LOCAL_PROCESS_GROUP = None


# ---------------------------------------------------------------------------------------------
# What runs inside a job
# ---------------------------------------------------------------------------------------------
def _per_worker_batch(config_yaml: str, world_size: int) -> Optional[int]:
    try:
        cfg = yaml.safe_load(config_yaml) or {}
        total = int(cfg["SOLVER"]["IMS_PER_BATCH"])
    except Exception:  # a toy config without SOLVER: nothing to report
        return None
    return total // max(world_size, 1)


class RunTask(submitit.helpers.Checkpointable):
    """The submitted callable of one run: records its life in the run store, resumes on requeue.

    ``checkpoint`` (called by submitit on SIGUSR2: preemption or timeout) hands back a copy with
    ``resume=True``; submitit requeues that copy, and the task then resumes from detectron2's
    last checkpoint in the same run directory.
    """

    def __init__(self, run_dir: str, store_root: str, task: str, config_yaml: str, seed: int,
                 resume: bool = False) -> None:
        self.run_dir = str(run_dir)
        self.store_root = str(store_root)
        self.task = task
        self.config_yaml = config_yaml
        self.seed = int(seed)
        self.resume = bool(resume)

    def __call__(self) -> Dict[str, Any]:
        store = RunStore(self.store_root)
        env = distributed_env()
        resume = self.resume or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
        per_worker = _per_worker_batch(self.config_yaml, env.world_size)
        if env.is_main:
            with store.claim(self.run_dir, timeout_s=120, required=False):
                old = store.read_status(self.run_dir) or {}
                store.transition(
                    self.run_dir, "running", attempt=int(old.get("attempt", 0)) + 1, resumed=resume,
                    job_id=env.job_id or old.get("job_id"), world_size=env.world_size,
                    ims_per_worker=per_worker,
                )
        if per_worker is not None:
            logger.info("IMS_PER_BATCH is the total over %d workers: %d images per worker",
                        env.world_size, per_worker)
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
        resumed = RunTask(self.run_dir, self.store_root, self.task, self.config_yaml, self.seed, resume=True)
        return submitit.helpers.DelayedSubmission(resumed, *args, **kwargs)


class PrereqTask:
    """Builds one prerequisite, then writes its completion marker (atomically)."""

    def __init__(self, spec: PrereqSpec) -> None:
        self.spec = spec

    def __call__(self) -> Any:
        fn = resolve_task(self.spec.task)
        Path(self.spec.output_dir).mkdir(parents=True, exist_ok=True)
        result = fn(self.spec.output_dir, **dict(self.spec.kwargs))
        atomic_write_json(self.spec.marker, {"task": self.spec.task, "finished_at": now_iso()})
        return result


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


# ---------------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------------
@dataclass
class LaunchOutcome:
    """What the launcher did (or, in a dry run, would do) with one run."""

    experiment: str
    seed: int
    run_dir: Path
    action: str                      # submitted | skipped | would-submit
    previous_state: Optional[str] = None
    job_id: Optional[str] = None
    reason: str = ""


@dataclass
class LaunchReport:
    executor: str
    resources: Dict[str, Any]
    outcomes: List[LaunchOutcome]
    prerequisites: List[Dict[str, Any]] = field(default_factory=list)
    jobs: List[Any] = field(default_factory=list)  # submitit jobs of the submitted runs

    @property
    def submitted(self) -> List[LaunchOutcome]:
        return [o for o in self.outcomes if o.action == "submitted"]


def _decide(status: Optional[Mapping[str, Any]], retry_failed: bool) -> Tuple[bool, str]:
    state = status.get("state") if status else None
    if state is None:
        return True, "new"
    if state == "done":
        return False, "done"
    if state in ACTIVE_STATES:
        return False, f"{state} (job {status.get('job_id')})"
    if state in FAILED_STATES:
        return (True, f"retrying {state} run") if retry_failed else (False, f"{state}; use retry_failed")
    return False, f"unknown state {state!r}"


def make_executor(executor: str, folder: Path, profile: ClusterProfile, name: str,
                  dependency: Optional[str] = None) -> submitit.Executor:
    """A submitit executor with the profile's resources; logs go under ``folder``."""
    if executor == "debug":
        return submitit.DebugExecutor(folder=folder)
    if executor == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=profile.timeout_min, tasks_per_node=profile.ntasks_per_node,
                             gpus_per_node=profile.gpus_per_node, setup=list(profile.setup))
        return ex
    if not slurm_available():
        raise LaunchError("executor 'slurm': sbatch/squeue not found on PATH (use --executor local)")
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=3)
    params: Dict[str, Any] = dict(
        job_name=name, time=profile.timeout_min, nodes=profile.nodes,
        ntasks_per_node=profile.ntasks_per_node, cpus_per_task=profile.cpus_per_task,
        array_parallelism=profile.array_parallelism, setup=list(profile.setup),
        # signal 120 s before the time limit so a timeout is a requeue, not a loss
        signal_delay_s=120,
    )
    if profile.gpus_per_node:
        params["gpus_per_node"] = profile.gpus_per_node
    if profile.mem_gb is not None:
        params["mem"] = f"{int(profile.mem_gb * 1024)}M"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(profile, key):
            params[key] = getattr(profile, key)
    additional = dict(profile.additional_parameters)
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


@contextlib.contextmanager
def _claim_all(store: RunStore, run_dirs: Sequence[Path]) -> Iterator[None]:
    """Claim several runs; a fixed (sorted) order so two launchers can't deadlock."""
    with contextlib.ExitStack() as stack:
        for run_dir in sorted(set(run_dirs)):
            stack.enter_context(store.claim(run_dir))
        yield


def _build_prerequisites(specs: Sequence[PrereqSpec], executor: str, profile: ClusterProfile,
                         folder: Path, dry_run: bool) -> Tuple[Dict[str, Optional[str]], List[Dict[str, Any]]]:
    """Build each distinct prerequisite once; return its Slurm job id (None when complete)."""
    job_of: Dict[str, Optional[str]] = {}
    report: List[Dict[str, Any]] = []
    one_task = dataclasses.replace(profile, nodes=1, tasks_per_node=None, gpus_per_node=min(profile.gpus_per_node, 1))
    for spec in specs:
        key = str(Path(spec.output_dir).resolve())
        if key in job_of:
            continue
        entry: Dict[str, Any] = {"task": spec.task, "output_dir": spec.output_dir}
        if spec.is_complete():
            job_of[key] = None
            entry["action"] = "complete"
        elif dry_run:
            job_of[key] = None
            entry["action"] = "would-build"
        else:
            out = Path(spec.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            with RunStore.claim(out, lock_name=_PREREQ_LOCK):
                job_of[key], entry["action"] = _submit_prereq(spec, executor, one_task, folder)
        entry["job_id"] = job_of[key]
        report.append(entry)
    return job_of, report


def _submit_prereq(spec: PrereqSpec, executor: str, profile: ClusterProfile,
                   folder: Path) -> Tuple[Optional[str], str]:
    if spec.is_complete():  # built by a concurrent launcher while we waited for the lock
        return None, "complete"
    pending = Path(spec.output_dir) / _PREREQ_JOB
    if executor == "slurm" and pending.is_file():
        import json

        jid = json.loads(pending.read_text()).get("job_id")
        if jid and slurm_job_states([jid]).get(jid) in SLURM_ALIVE_STATES:
            return jid, "pending"
    ex = make_executor(executor, folder, profile, name="maps-prereq")
    job = ex.submit(PrereqTask(spec))
    if executor == "slurm":
        atomic_write_json(pending, {"job_id": job.job_id, "task": spec.task, "submitted_at": now_iso()})
        return job.job_id, "submitted"
    try:  # local / debug: build it now, the runs start after
        job.result()
    except Exception as e:
        raise LaunchError(f"prerequisite {spec.task} -> {spec.output_dir} failed: {e}") from None
    return None, "built"


def launch(runs: Sequence[RunSpec], executor: str = "local",
           profile: Optional[Union[str, os.PathLike, ClusterProfile]] = None,
           retry_failed: bool = False, dry_run: bool = False, store: Optional[RunStore] = None,
           wait: Optional[bool] = None) -> LaunchReport:
    """Submit the runs that need it; one job array per launch (per set of prerequisites).

    ``wait`` (default: True for local/debug, False for slurm) blocks until the submitted jobs
    end; local jobs are children of this process, debug ones run in it.
    """
    if executor not in EXECUTORS:
        raise LaunchError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    store = store or RunStore()
    prof = profile if isinstance(profile, ClusterProfile) else load_profile(profile)
    if executor == "local" and prof.nodes > 1:
        raise ConfigError(f"{prof.source}: key 'nodes' is {prof.nodes}, the local executor has one node")
    seen = set()
    for spec in runs:
        key = (spec.experiment, spec.seed)
        if key in seen:
            raise LaunchError(f"run {spec.experiment} seed {spec.seed} is listed twice")
        seen.add(key)
    if not dry_run and executor != "slurm":
        split = _launch_in_order(runs, executor, prof, retry_failed, store, wait)
        if split is not None:
            return split
    folder = store.root / ".submitit" / "%j"
    dirs = {(s.experiment, s.seed): store.run_dir(s.experiment, s.seed) for s in runs}

    if dry_run:
        outcomes = []
        for spec in runs:
            run_dir = dirs[(spec.experiment, spec.seed)]
            status = store.read_status(run_dir) if run_dir.exists() else None
            go, why = _decide(status, retry_failed)
            outcomes.append(LaunchOutcome(spec.experiment, spec.seed, run_dir,
                                          "would-submit" if go else "skipped",
                                          status.get("state") if status else None, reason=why))
        pre = [p for s in runs for p in s.prerequisites]
        _, pre_report = _build_prerequisites(pre, executor, prof, folder, dry_run=True)
        return LaunchReport(executor, prof.resources(), outcomes, pre_report)

    outcomes: Dict[Tuple[str, int], LaunchOutcome] = {}
    jobs: List[Any] = []
    pre_report: List[Dict[str, Any]] = []
    with _claim_all(store, list(dirs.values())):
        todo: List[RunSpec] = []
        statuses = {}
        found = {key: store.read_status(run_dir) for key, run_dir in dirs.items()}
        live_ids = [s.get("job_id") for s in found.values()
                    if s and s.get("executor") == "slurm" and s.get("state") in ACTIVE_STATES]
        slurm_states = slurm_job_states(live_ids) if live_ids and slurm_available() else None
        for spec in runs:
            run_dir = dirs[(spec.experiment, spec.seed)]
            status = reconcile(store, run_dir, found[(spec.experiment, spec.seed)], slurm_states, claimed=True)
            go, why = _decide(status, retry_failed)
            statuses[(spec.experiment, spec.seed)] = status
            outcomes[(spec.experiment, spec.seed)] = LaunchOutcome(
                spec.experiment, spec.seed, run_dir, "submitted" if go else "skipped",
                status.get("state") if status else None, reason=why)
            if go:
                todo.append(spec)
        run_deps: Dict[Tuple[str, int], List[str]] = {}
        for spec in list(todo):
            key = (spec.experiment, spec.seed)
            deps, blocked = _run_dependencies(spec, store, outcomes, statuses, executor, slurm_states)
            if blocked:
                todo.remove(spec)
                outcomes[key].action, outcomes[key].reason = "skipped", blocked
            else:
                run_deps[key] = deps
        if todo:
            pre = [p for s in todo for p in s.prerequisites]
            job_of, pre_report = _build_prerequisites(pre, executor, prof, folder, dry_run=False)
            # runs that wait for a run of this launch go second, once its job id is known
            for stage in (False, True):
                groups: Dict[Tuple[str, ...], List[RunSpec]] = {}
                for spec in todo:
                    key = (spec.experiment, spec.seed)
                    waits = [tuple(a) for a in spec.after if outcomes.get(tuple(a)) is not None
                             and outcomes[tuple(a)].action == "submitted"]
                    if bool(waits) != stage:
                        continue
                    deps = {job_of[str(Path(p.output_dir).resolve())] for p in spec.prerequisites}
                    deps |= set(run_deps[key]) | {outcomes[a].job_id for a in waits}
                    groups.setdefault(tuple(sorted(deps - {None})), []).append(spec)
                for deps, group in groups.items():
                    jobs += _submit_group(store, group, dirs, statuses, executor, prof, folder, deps, outcomes)
    report = LaunchReport(executor, prof.resources(), [outcomes[(s.experiment, s.seed)] for s in runs],
                          pre_report, jobs)
    if wait if wait is not None else executor != "slurm":
        wait_for_jobs(jobs)
    return report


def _launch_in_order(runs: Sequence[RunSpec], executor: str, profile: ClusterProfile,
                     retry_failed: bool, store: RunStore, wait: Optional[bool]) -> Optional[LaunchReport]:
    """Local / debug: launch the runs others wait for first, to the end, then the others.

    None when no run of ``runs`` waits for another one of them (one launch does).
    """
    keys = {(s.experiment, s.seed) for s in runs}
    later = [s for s in runs if any(tuple(a) in keys for a in s.after)]
    if not later:
        return None
    first = [s for s in runs if s not in later]
    if not first:
        raise LaunchError("runs wait for each other in a cycle: "
                          + ", ".join(f"{s.experiment} seed {s.seed}" for s in later))
    r1 = launch(first, executor, profile, retry_failed, store=store, wait=True)
    r2 = launch(later, executor, profile, retry_failed, store=store, wait=wait)
    by_key = {(o.experiment, o.seed): o for o in r1.outcomes + r2.outcomes}
    prerequisites = {}  # one entry per prerequisite: what the first launch did with it
    for entry in r1.prerequisites + r2.prerequisites:
        prerequisites.setdefault(str(Path(entry["output_dir"]).resolve()), entry)
    return LaunchReport(executor, profile.resources(), [by_key[(s.experiment, s.seed)] for s in runs],
                        list(prerequisites.values()), r1.jobs + r2.jobs)


def _run_dependencies(spec: RunSpec, store: RunStore, outcomes: Mapping[Tuple[str, int], LaunchOutcome],
                      statuses: Mapping[Tuple[str, int], Optional[Dict[str, Any]]], executor: str,
                      slurm_states: Optional[Mapping[str, str]]) -> Tuple[List[str], str]:
    """Slurm job ids ``spec`` must wait for (its ``after`` runs still queued or running), and
    why it cannot be launched now ("" when it can).

    A run submitted by this launch is waited for by the caller (its job id comes later); a
    ``done`` one needs no waiting; a failed, cancelled or never launched one blocks ``spec``.
    """
    deps: List[str] = []
    for dep in spec.after:
        dep = tuple(dep)
        outcome = outcomes.get(dep)
        if outcome is not None and outcome.action == "submitted":
            continue
        if dep in statuses:
            status = statuses[dep]
        else:
            run_dir = store.run_dir(*dep)
            status = reconcile(store, run_dir, store.read_status(run_dir) if run_dir.exists() else None,
                               slurm_states)
        state = status.get("state") if status else None
        if state == "done":
            continue
        if state in ACTIVE_STATES and executor == "slurm" and status.get("executor") == "slurm":
            deps.append(str(status.get("job_id")))
            continue
        return [], (f"waits for run {dep[0]} seed {dep[1]}, which is "
                    f"{state or 'not launched'}: launch it first")
    return deps, ""


def _submit_group(store: RunStore, group: Sequence[RunSpec], dirs: Mapping[Tuple[str, int], Path],
                  statuses: Mapping[Tuple[str, int], Optional[Dict[str, Any]]], executor: str,
                  profile: ClusterProfile, folder: Path, deps: Sequence[str],
                  outcomes: Dict[Tuple[str, int], LaunchOutcome]) -> List[Any]:
    """Submit one array (under the claims already held) and write each run's queued record."""
    names = sorted({s.experiment for s in group})
    name = f"maps-{names[0]}" if len(names) == 1 else "maps-runs"
    dependency = "afterok:" + ":".join(deps) if deps else None
    ex = make_executor(executor, folder, profile, name, dependency=dependency)
    tasks = []
    for spec in group:
        run_dir = dirs[(spec.experiment, spec.seed)]
        config_yaml = spec.config_yaml()
        store.write_config(run_dir, config_yaml)
        resolve_task(spec.task)  # fail here, not in a job an hour from now
        prior = statuses[(spec.experiment, spec.seed)] or {}
        # a retried run resumes from its last checkpoint if it has one
        # absolute paths: a job may start in another working directory than its launcher
        tasks.append(RunTask(str(run_dir.resolve()), str(store.root.resolve()), spec.task, config_yaml, spec.seed,
                             resume=int(prior.get("attempt", 0)) > 0))
    try:
        if executor == "slurm":
            with ex.batch():
                jobs = [ex.submit(t) for t in tasks]
        else:
            jobs = [ex.submit(t) for t in tasks]
    except Exception as e:  # sbatch refused (bad partition, gres, ...): nothing was queued
        raise LaunchError(f"{executor} submission refused ({profile.source}): {e}") from None
    for spec, job in zip(group, jobs):
        run_dir = dirs[(spec.experiment, spec.seed)]
        job_id = str(job.job_id)
        array_id = job_id.split("_")[0] if executor == "slurm" and "_" in job_id else None
        store.transition(
            run_dir, "queued", executor=executor, job_id=job_id, array_job_id=array_id,
            submit_host=socket.gethostname(), submit_pid=os.getpid(), task=spec.task, resources=profile.resources(),
            log_stdout=str(job.paths.stdout).replace("%t", "0"),
            log_stderr=str(job.paths.stderr).replace("%t", "0"),
            dependency=dependency, ended_at=None,
        )
        outcomes[(spec.experiment, spec.seed)].job_id = job_id
    return jobs


def wait_for_jobs(jobs: Sequence[Any]) -> None:
    """Wait for jobs with a progress bar; a job's failure is in its run record, not raised here."""
    if not jobs:
        return
    from tqdm import tqdm

    for job in tqdm(jobs, desc="runs", unit="run", disable=len(jobs) < 2):
        try:
            job.result()
        except Exception as e:  # recorded as failed by the job itself
            logger.warning("job %s failed: %s", job.job_id, str(e).strip().splitlines()[-1:] or e)
