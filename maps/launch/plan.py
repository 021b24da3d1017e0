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
import hashlib
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence

from maps.errors import ConfigError
from maps.launch.memory_jobs import memory_prereq
from maps.launch.progress import run_progress
from maps.launch.runstore import RunStore, RunStoreError
from maps.launch.scheduler import reconcile, slurm_available, slurm_job_states
from maps.launch.specs import DEFAULT_TASK, RunSpec

__all__ = ["parse_overrides", "override_tag", "plan_runs", "select_runs", "status_rows"]

#: keys that define what a run reads or is: overriding them at launch would make the run
#: disagree with its memory bank and its table row; such a change is a new registry entry
IDENTITY_KEYS = ("MODEL.MAPS.MEMORY.", "MODEL.MAPS.ENABLED", "DATASETS.", "SEED", "OUTPUT_DIR")


def parse_overrides(opts: Sequence[str]) -> Dict[str, Any]:
    """detectron2's ``KEY VALUE ...`` command-line convention -> {KEY: decoded value}."""
    from yacs.config import CfgNode

    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"config overrides must be KEY VALUE pairs, got an odd list: {' '.join(opts)}")
    out: Dict[str, Any] = {}
    for key, value in zip(opts[0::2], opts[1::2]):
        if key.startswith(IDENTITY_KEYS):
            raise ConfigError(f"override {key}: defines the run's memory, data or identity; "
                              "add a registry entry (experiments/*.yaml) for that variant instead")
        out[key] = CfgNode._decode_cfg_value(value)
    return out


def override_tag(overrides: Mapping[str, Any]) -> str:
    """The run-name suffix of a set of overrides: ``+`` and 8 hex digits of their content, so a
    changed override is a new run and never the silent reuse of a finished one."""
    text = json.dumps({k: overrides[k] for k in sorted(overrides)}, sort_keys=True, default=str)
    return "+" + hashlib.sha256(text.encode()).hexdigest()[:8]


def plan_runs(registry: Any, selector: str, seeds: Optional[int], store: RunStore,
              train_task: str = DEFAULT_TASK, overrides: Optional[Mapping[str, Any]] = None,
              suite: Optional[str] = None, allow_random_weights: bool = False) -> List[RunSpec]:
    """The RunSpecs of the experiments ``selector`` names, with what each needs first.

    ``overrides`` ({KEY: value}, see :func:`parse_overrides`) apply to every selected run (and
    the training runs its evaluation runs need); the runs are then named
    ``<experiment>/<tag>`` (:func:`override_tag`) and their records keep the overrides.

    Every pretrained file a run needs must be in the weights cache and verified
    (:func:`maps.weights.runs.check_weights`), else :class:`MissingWeights` lists them all;
    ``allow_random_weights`` lets the runs start from random weights instead, and their
    records say which keys did.
    """
    from maps.engine.evaluate import EVAL_TASK
    from maps.memory.prepare import apply_memory
    from maps.registry import apply_overrides, check_maps_values
    from maps.weights.runs import MissingWeights, check_weights, random_weight_keys, resolve_config_weights

    overrides = dict(overrides or {})
    tag = "/" + override_tag(overrides) if overrides else ""
    select = getattr(registry, "runs", None) or registry.select  # distinct runnable setups
    selected = list(select(selector, suite=suite) if suite else select(selector))
    names = {e.canonical_name for e in selected}
    for exp in list(selected):  # the training runs that evaluation-only runs evaluate
        if exp.eval_of and exp.eval_of not in names:
            selected.insert(selected.index(exp), registry.get(exp.eval_of))
            names.add(exp.eval_of)
    memory: Dict[str, Any] = {}  # one memory spec -> one prerequisite
    specs = []
    missing: List[str] = []
    for exp in selected:
        prereq = None
        for seed in (range(seeds) if seeds is not None else exp.seeds):
            experiment, _, _ = exp.run_name(seed).rpartition("/")
            experiment += tag
            cfg = exp.build_config(seed)
            if overrides:
                apply_overrides(cfg, overrides, f"experiment '{exp.name}' (command-line overrides)")
                problems = check_maps_values(cfg)
                if problems:
                    raise ConfigError(f"override {problems[0][0]}: {problems[0][1]}")
            random_keys: List[str] = []
            if hasattr(cfg, "MODEL"):  # a model config (tests launch toy tasks with plain YAML)
                problems = check_weights(cfg, allow_random=allow_random_weights)
                missing += [p for p in problems if p not in missing]
                if problems:
                    continue
                cfg = resolve_config_weights(cfg, allow_random=allow_random_weights)
                random_keys = random_weight_keys(cfg)
            mem = exp.memory_spec(cfg)
            if mem is not None:
                prereq = memory.setdefault(repr(sorted(mem.items())), memory_prereq(mem, store.root))
            if prereq is not None:
                apply_memory(cfg, prereq.output_dir)
            task, after = train_task, ()
            if exp.eval_of:
                trained, _, _ = exp.train_run_name(seed).rpartition("/")
                trained += tag
                cfg.MODEL.WEIGHTS = str((store.run_dir(trained, seed) / "model_final.pth").resolve())
                task, after = EVAL_TASK, ((trained, seed),)
            specs.append(RunSpec(experiment=experiment, seed=seed, config=cfg, task=task,
                                 prerequisites=(prereq,) if prereq is not None else (), after=after,
                                 overrides=overrides, random_weights=random_keys))
    if missing:
        raise MissingWeights(missing)
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
    """One row per selected run: its state checked against Slurm (or the process table), and
    its progress (:func:`maps.launch.progress.run_progress`). A run whose record cannot be
    read is a row in state ``corrupt`` naming the file and why, never the end of the list."""
    runs = select_runs(store, selector)
    slurm_ids = [r.status.get("job_id") for r in runs
                 if r.status.get("executor") == "slurm" and r.state in ("queued", "running")]
    states = slurm_job_states(slurm_ids) if slurm_ids and slurm_available() else {}
    rows = []
    for r in runs:
        if r.error is not None:
            rows.append({"experiment": r.experiment, "seed": r.seed, "state": "corrupt", "error": r.error,
                         "run_dir": str(r.run_dir)})
            continue
        status = r.status
        if status.get("executor") != "slurm" or states:
            status = reconcile(store, r.run_dir, status, states) or status
        try:
            final = store.read_final(r.run_dir) or {}
            store.read_wandb(r.run_dir)  # every record is checked: a damaged one is named
            store.read_metrics(r.run_dir)
        except RunStoreError as e:
            rows.append({"experiment": r.experiment, "seed": r.seed, "state": "corrupt", "error": str(e),
                         "run_dir": str(r.run_dir)})
            continue
        rows.append({"experiment": r.experiment, "seed": r.seed, "state": status.get("state"),
                     "slurm": states.get(status.get("job_id") or "", None), "attempt": status.get("attempt", 0),
                     "job_id": status.get("job_id"), "started_at": status.get("started_at"),
                     "ended_at": status.get("ended_at"), "PQ": final.get("PQ"), "error": status.get("error"),
                     "run_dir": str(r.run_dir), **run_progress(store, r.run_dir, status)})
    return rows
