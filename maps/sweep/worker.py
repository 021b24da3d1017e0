"""One worker of a study: ask a trial, train it as a run of the store, tell the result."""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple



if TYPE_CHECKING:  # optuna and detectron2 are heavy: keep them out of `maps --help`
    import optuna

logger = logging.getLogger(__name__)

from maps.sweep.spec import SweepSpec, parse_sweep, trial_config, trials_base
from maps.sweep.study import _Heartbeat, _file_lock, _heartbeat_path, _mark_run, _started, fail_stale_trials, open_study, study_dir, trial_experiment, worker_storage_url


# ---------------------------------------------------------------------------------------------
# the worker
# ---------------------------------------------------------------------------------------------
class TrialReporter:
    """What a trial's training calls after each evaluation: ``report(value, step)``.

    Hands the value to Optuna and raises :class:`optuna.TrialPruned` when the pruner says the
    trial is hopeless. A multi-objective study cannot prune, so values are only recorded.
    """

    def __init__(self, trial: "optuna.Trial", prune: bool) -> None:
        self.trial, self.prune = trial, prune
        self.history: List[Tuple[int, float]] = []

    @property
    def number(self) -> int:
        return self.trial.number

    def report(self, value: float, step: int) -> None:
        import optuna

        value, step = float(value), int(step)
        self.history.append((step, value))
        if not self.prune or not math.isfinite(value):
            return
        self.trial.report(value, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"trial {self.trial.number} pruned at iteration {step} "
                                     f"(PQ {value:.3f})")


class SweepWorker:
    """One worker of a study: ask, train, tell, until the study has ``target`` trials.

    A plain picklable callable (a Slurm or local job imports it in a fresh interpreter): it
    carries the sweep as a mapping, the storage URL and the run store's root. The URL is
    pickled as shown to users, its password masked; the worker takes the real one from
    ``$MAPS_OPTUNA_STORAGE`` (:func:`~maps.sweep.study.worker_storage_url`).
    """

    def __init__(self, spec: Mapping[str, Any], storage_url: str, runs_root: str, target: int,
                 worker: int = 0, experiments_root: Optional[str] = None,
                 allow_random_weights: bool = False) -> None:
        self.spec = dict(spec)
        self.allow_random_weights = bool(allow_random_weights)
        self.storage_url = storage_url
        self.runs_root = str(runs_root)
        self.target = int(target)
        self.worker = int(worker)
        self.experiments_root = experiments_root

    def __call__(self) -> List[int]:
        import optuna
        from optuna.trial import TrialState

        from maps.launch import resolve_task
        from maps.registry import load_registry

        spec = parse_sweep(self.spec)
        registry = load_registry(self.experiments_root, validate=False)
        base, memory = trials_base(spec, registry, getattr(self, "allow_random_weights", False))
        if memory is not None:
            # built before any worker started (run_sweep: a job the workers depend on)
            from maps.memory.prepare import apply_memory, memory_dir

            apply_memory(base, memory_dir(memory, self.runs_root))
        # its own random stream: per worker, and per invocation (the target differs)
        study = open_study(spec, worker_storage_url(self.storage_url),
                           stream=1 + self.worker + 1009 * self.target)
        sdir = study_dir(self.runs_root, spec.name)
        task = resolve_task(spec.task)
        done: List[int] = []
        while True:
            with _file_lock(sdir / "ask.lock"):
                fail_stale_trials(study, sdir, spec.grace_period, self.runs_root)
                if _started(study) >= self.target:
                    break
                trial = study.ask()
                _heartbeat_path(sdir, trial.number).parent.mkdir(parents=True, exist_ok=True)
                _heartbeat_path(sdir, trial.number).touch()
            with _Heartbeat(_heartbeat_path(sdir, trial.number), spec.heartbeat_interval):
                state, values = self._run_trial(spec, base, study, trial, task)
            try:
                if state == TrialState.COMPLETE:
                    study.tell(trial, values)
                else:
                    study.tell(trial, state=state)
            except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as e:
                # judged dead by another worker (a heartbeat starved for the grace period):
                # its verdict stands, the run's record says what happened
                logger.warning("trial %d was settled by another worker: %s", trial.number, e)
            done.append(trial.number)
        return done

    def _run_trial(self, spec: SweepSpec, base: Any, study: "optuna.Study", trial: "optuna.Trial",
                   task: Callable[..., Dict[str, Any]]) -> Tuple[Any, Optional[List[float]]]:
        """Train one trial as a run of the store; its final state and objective values."""
        import optuna
        from optuna.trial import TrialState

        from maps.engine.wandb_writer import WandbWriter, run_tags
        from maps.launch.runstore import RunStore, traceback_tail

        params = {p.key: p.suggest(trial) for p in spec.space}
        cfg = trial_config(spec, params, base=base)
        store = RunStore(self.runs_root)
        experiment = trial_experiment(spec.name, trial.number)
        run_dir = store.run_dir(experiment, spec.seed)
        tags = run_tags(experiment, spec.seed, extra=[f"study:{spec.name}", f"trial:{trial.number}"])
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid(),
                                       "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                                       "index": self.worker})
        with store.claim(run_dir, timeout_s=60, required=False):
            store.transition(run_dir, "running", attempt=1, **_job_identity(),
                             study=spec.name, trial=trial.number, params=params, tags=tags,
                             sweep_experiment=spec.experiment)
        config_yaml = cfg.dump()  # once: detectron2's dump re-parses its own YAML to check it
        store.write_config(run_dir, config_yaml)
        writer = WandbWriter(run_dir, config_yaml, tags=tags, group=f"sweep/{spec.name}",
                             name=f"{spec.name}/trial{trial.number}")
        reporter = TrialReporter(trial, prune=not spec.multi_objective)
        try:
            final = dict(task(str(run_dir), config_yaml, spec.seed, reporter, writer) or {})
        except optuna.TrialPruned as e:
            _mark_run(Path(self.runs_root), run_dir, "cancelled", note="pruned", error=str(e))
            return TrialState.PRUNED, None
        except Exception as e:
            logger.exception("trial %d of %s failed", trial.number, spec.name)
            trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}")
            _mark_run(Path(self.runs_root), run_dir, "failed", error=f"{type(e).__name__}: {e}",
                      traceback=traceback_tail(traceback.format_exc()))
            return TrialState.FAIL, None
        finally:
            writer.close()
        store.write_final(run_dir, final)
        trial.set_user_attr("metrics", {k: v for k, v in final.items()
                                        if isinstance(v, (int, float)) and math.isfinite(v)})
        values = [final.get(m) for m in spec.objectives]
        if any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
            msg = f"objective {list(spec.objectives)} missing or not finite in final metrics {final}"
            trial.set_user_attr("fail_reason", msg)
            _mark_run(Path(self.runs_root), run_dir, "failed", error=msg)
            return TrialState.FAIL, None
        with store.claim(run_dir, timeout_s=60, required=False):
            store.transition(run_dir, "done")
        return TrialState.COMPLETE, [float(v) for v in values]


def _job_error(e: BaseException) -> str:
    """One line for a worker job's error: submitit's first line and the raised exception."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Pruned)\b", line)]
    head = lines[0] if lines else ""
    tail = raised[-1] if raised and raised[-1] != head else ""
    return f"{type(e).__name__}: {head[:200]}" + (f" ... {tail[:200]}" if tail else "")


def _job_identity() -> Dict[str, str]:
    """executor and job id of this worker, as the launcher records them, so that ``maps
    status`` reconciles a dead worker's run with Slurm (array task ``<job>_<task>``) or with
    the process table (a local worker's pid)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return {"executor": "slurm", "job_id": f"{array}_{task}"}
    if os.environ.get("SLURM_JOB_ID"):
        return {"executor": "slurm", "job_id": os.environ["SLURM_JOB_ID"]}
    return {"executor": "local", "job_id": str(os.getpid())}


