"""Idempotent launching of runs through submitit: Slurm job arrays, or this machine (local / debug).

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
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union


from maps.errors import ConfigError, MapsError
from maps.io import atomic_write_json, make_dir, unmake_dir
from maps.launch.runstore import (
    ACTIVE_STATES,
    FAILED_STATES,
    RUN_KIND,
    STATUS_FILE,
    RunStore,
    now_iso,
)

logger = logging.getLogger(__name__)
from maps.launch.specs import EXECUTORS, LaunchError, PrereqSpec, RunSpec, _PREREQ_JOB, _PREREQ_LOCK, config_value, resolve_task
from maps.launch.profiles import ClusterProfile, load_profile
from maps.launch.scheduler import SLURM_ALIVE_STATES, reconcile, slurm_available, slurm_job_states
from maps.launch.executors import make_executor
from maps.launch.tasks import PrereqTask, RunTask

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
        return (True, f"retrying {state} run") if retry_failed else (False, f"{state}; relaunch with --retry-failed")
    return False, f"unknown state {state!r}"


@contextlib.contextmanager
def _new_run_dirs(store: RunStore, runs: Sequence[RunSpec]) -> Iterator[None]:
    """Create the run directories this launch is the first to make, marked as made by maps;
    if the launch then fails, remove those no job was submitted for (no status.json), with
    the parents created for them: a failed launch leaves the store as it was."""
    made: Dict[Path, Path] = {}
    for spec in runs:
        top = store.make_run_dir(spec.experiment, spec.seed)
        if top is not None:
            made[store.run_dir(spec.experiment, spec.seed)] = top
    try:
        yield
    except BaseException:
        for run_dir, top in reversed(list(made.items())):  # the last made holds no earlier one's top
            if not (run_dir / STATUS_FILE).exists():
                try:
                    unmake_dir(run_dir, RUN_KIND, top)
                except (OSError, MapsError) as e:  # never hide the launch's own error
                    logger.warning("could not remove %s after the failed launch: %s", run_dir, e)
        raise


@contextlib.contextmanager
def _claim_all(store: RunStore, run_dirs: Sequence[Path]) -> Iterator[None]:
    """Claim several runs; a fixed (sorted) order so two launchers can't deadlock."""
    with contextlib.ExitStack() as stack:
        for run_dir in sorted(set(run_dirs)):
            stack.enter_context(store.claim(run_dir))
        yield


def build_prerequisites(specs: Sequence[PrereqSpec], executor: str, profile: ClusterProfile,
                        folder: Path, dry_run: bool = False) -> Tuple[Dict[str, Optional[str]], List[Dict[str, Any]]]:
    """Build each distinct prerequisite once; return its Slurm job id (None when complete).

    On Slurm each is a job of its own (the caller makes its jobs depend on it, ``afterok``);
    with the local and debug executors it is built to the end here. Also what a sweep uses
    for its memory."""
    job_of: Dict[str, Optional[str]] = {}
    report: List[Dict[str, Any]] = []
    one_task = profile.replace(nodes=1, tasks_per_node=None, gpus_per_node=min(profile.gpus_per_node, 1))
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
            made = make_dir(out, spec.kind)  # marked: a failed launch removes what it made
            try:
                with RunStore.claim(out, lock_name=_PREREQ_LOCK):
                    job_of[key], entry["action"] = _submit_prereq(spec, executor, one_task, folder)
            except BaseException:
                if made is not None and not spec.is_complete() and not (out / _PREREQ_JOB).exists():
                    try:
                        unmake_dir(out, spec.kind, made)
                    except (OSError, MapsError) as e:
                        logger.warning("could not remove %s after the failed launch: %s", out, e)
                raise
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
        _check_batch(spec, prof)
    if not dry_run and executor == "slurm" and not slurm_available():
        # checked before anything is created: a launch that cannot submit leaves no trace
        raise LaunchError("executor 'slurm': sbatch/squeue not found on PATH (use --executor local)")
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
        _, pre_report = build_prerequisites(pre, executor, prof, folder, dry_run=True)
        return LaunchReport(executor, prof.resources(), outcomes, pre_report)

    outcomes: Dict[Tuple[str, int], LaunchOutcome] = {}
    jobs: List[Any] = []
    pre_report: List[Dict[str, Any]] = []
    with _new_run_dirs(store, runs), _claim_all(store, list(dirs.values())):
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
            job_of, pre_report = build_prerequisites(pre, executor, prof, folder, dry_run=False)
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


def _check_batch(spec: RunSpec, profile: ClusterProfile) -> None:
    """SOLVER.IMS_PER_BATCH is the total batch (Mask2Former's recipe: 16 on 8 GPUs, 2 each):
    it must split evenly over the profile's nodes x tasks, or the run would train with
    another batch, and so another learning-rate schedule, than the paper's."""
    total = _total_batch(spec.config)
    world = profile.world_size
    if total is not None and world > 1 and total % world:
        raise LaunchError(f"{spec.experiment}: SOLVER.IMS_PER_BATCH {total} does not divide over "
                          f"{world} processes ({profile.nodes} nodes x {profile.ntasks_per_node} tasks, "
                          f"{profile.source}); choose a profile whose processes divide it")


def _total_batch(config: Any) -> Optional[int]:
    value = config_value(config, "SOLVER.IMS_PER_BATCH")
    return int(value) if value is not None else None


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
                             resume=int(prior.get("attempt", 0)) > 0, threads=profile.cpus_per_task))
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
            dependency=dependency, ended_at=None, overrides=dict(spec.overrides) or None,
            random_weights=list(spec.random_weights) or None,
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
