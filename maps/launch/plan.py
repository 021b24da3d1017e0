"""From a registry selection to the runs to launch, and from the run store to what ``maps
status`` shows.

A run whose experiment has a memory gets the memory's build as a prerequisite (one per
distinct memory, shared by every run that reads it) and the memory's paths in its config. An
evaluation-only run (``eval_of``, Table 7) gets the evaluation task, the final checkpoint of
its training run as MODEL.WEIGHTS, and that run as a dependency; the training run is planned
too when the selection does not name it.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Dict, List, Optional

from maps.launch.memory_jobs import memory_prereq
from maps.launch.runstore import RunStore
from maps.launch.scheduler import reconcile, slurm_available, slurm_job_states
from maps.launch.specs import DEFAULT_TASK, RunSpec

__all__ = ["plan_runs", "select_runs", "status_rows"]


def plan_runs(registry: Any, selector: str, seeds: Optional[int], store: RunStore,
              train_task: str = DEFAULT_TASK) -> List[RunSpec]:
    """The RunSpecs of the experiments ``selector`` names, with what each needs first."""
    from maps.engine.evaluate import EVAL_TASK
    from maps.memory.prepare import apply_memory

    select = getattr(registry, "runs", None) or registry.select  # distinct runnable setups
    selected = list(select(selector))
    names = {e.canonical_name for e in selected}
    for exp in list(selected):  # the training runs that evaluation-only runs evaluate
        if exp.eval_of and exp.eval_of not in names:
            selected.insert(selected.index(exp), registry.get(exp.eval_of))
            names.add(exp.eval_of)
    memory: Dict[str, Any] = {}  # one memory spec -> one prerequisite
    specs = []
    for exp in selected:
        mem = exp.memory_spec()
        prereq = None
        if mem is not None:
            prereq = memory.setdefault(repr(sorted(mem.items())), memory_prereq(mem, store.root))
        for seed in (range(seeds) if seeds is not None else exp.seeds):
            experiment, _, _ = exp.run_name(seed).rpartition("/")
            cfg = exp.build_config(seed)
            if prereq is not None:
                apply_memory(cfg, prereq.output_dir)
            task, after = train_task, ()
            if exp.eval_of:
                trained, _, _ = exp.train_run_name(seed).rpartition("/")
                cfg.MODEL.WEIGHTS = str((store.run_dir(trained, seed) / "model_final.pth").resolve())
                task, after = EVAL_TASK, ((trained, seed),)
            specs.append(RunSpec(experiment=experiment, seed=seed, config=cfg, task=task,
                                 prerequisites=(prereq,) if prereq is not None else (), after=after))
    return specs


def select_runs(store: RunStore, selector: str) -> List[Any]:
    """Runs of the store whose experiment matches the glob, or a prefix, or a registry selection."""
    prefix = selector.rstrip("/") + "/"
    runs = list(store.iter_runs("*"))
    hits = [r for r in runs if fnmatch.fnmatchcase(r.experiment, selector) or r.experiment.startswith(prefix)]
    if hits or selector == "*":
        return hits
    try:  # a table or registry selection ("table6"): the store knows only experiment names
        from maps.registry import load_registry

        names = {e.canonical_name for e in load_registry().select(selector)}
    except Exception:
        return []
    return [r for r in runs if r.experiment in names]


def status_rows(store: RunStore, selector: str) -> List[Dict[str, Any]]:
    """One row per selected run: its state checked against Slurm (or the process table)."""
    runs = select_runs(store, selector)
    slurm_ids = [r.status.get("job_id") for r in runs
                 if r.status.get("executor") == "slurm" and r.state in ("queued", "running")]
    states = slurm_job_states(slurm_ids) if slurm_ids and slurm_available() else {}
    rows = []
    for r in runs:
        status = r.status
        if status.get("executor") != "slurm" or states:
            status = reconcile(store, r.run_dir, status, states) or status
        final = store.read_final(r.run_dir) or {}
        rows.append({"experiment": r.experiment, "seed": r.seed, "state": status.get("state"),
                     "slurm": states.get(status.get("job_id") or "", None), "attempt": status.get("attempt", 0),
                     "job_id": status.get("job_id"), "started_at": status.get("started_at"),
                     "ended_at": status.get("ended_at"), "PQ": final.get("PQ"), "error": status.get("error"),
                     "run_dir": str(r.run_dir)})
    return rows
