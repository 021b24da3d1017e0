"""Optuna studies over the MAPS knobs: declared in ``sweeps/*.yaml``, run by parallel workers.

A sweep file names the registry experiment a study starts from, a search space of detectron2
config keys, the objective metric(s) with their direction, a sampler and a pruner::

    experiment: synthetic/main/maps
    objective: PQ                  # or [PQ, params] with direction: [maximize, minimize]
    direction: maximize
    sampler: {name: tpe, seed: 0}  # tpe | random | grid | cmaes | nsga2
    pruner: {name: median, n_startup_trials: 2}   # median | percentile | hyperband | none
    iterations: 4                  # optional: a shorter schedule than the experiment's
    overrides: {TEST.EVAL_PERIOD: 2}
    space:
      MODEL.MAPS.NUM_RETRIEVED: {type: int, low: 1, high: 10}
      MODEL.MAPS.INPUT_MASKING_PROB: {type: float, low: 0.0, high: 1.0}
      MODEL.MAPS.SCENE_LAYERS: {type: categorical, choices: [[0, 1, 2], [0, 1], [1, 2, 3]]}

Every worker is the same loop (:class:`SweepWorker`): ask the shared study for a trial, build
the experiment's config with the trial's values, train it as the run
``sweep/<study>/trial<N>/seed<s>`` of the run store (so ``maps status`` sees it) with a W&B
run tagged ``study:<name>`` and ``trial:<N>``, report intermediate PQ so the pruner can stop
hopeless trials, and tell the study the final metrics.

The study lives in Optuna's JournalStorage on a file beside the runs (safe on NFS, unlike
SQLite) unless ``--storage`` names an RDB URL. JournalStorage has no heartbeat, so workers keep
their own: each running trial's heartbeat file is touched every few seconds, and a RUNNING
trial whose heartbeat is older than the grace period belongs to a dead worker; it is marked
FAIL (and its run ``failed``) before any new trial starts, and the study goes on.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import re
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import yaml

from maps.errors import ConfigError, MapsError

if TYPE_CHECKING:  # optuna and detectron2 are heavy: keep them out of `maps --help`
    import optuna

logger = logging.getLogger(__name__)

__all__ = [
    "ParamSpec", "SweepSpec", "SweepError", "load_sweep", "parse_sweep", "sweep_root",
    "validate_space", "trial_config", "open_study", "make_storage", "fail_stale_trials",
    "TrialReporter", "SweepWorker", "SweepResult", "run_sweep", "study_dir", "trial_experiment",
]

PARAM_TYPES = ("int", "float", "categorical")
DIRECTIONS = ("maximize", "minimize")
#: metrics a trial's final.json holds (see maps.engine.train.train)
OBJECTIVE_METRICS = ("PQ", "PQ_th", "PQ_st", "AP", "mIoU", "params")
SAMPLERS = ("tpe", "random", "grid", "cmaes", "nsga2")
PRUNERS = ("median", "percentile", "hyperband", "successive_halving", "none")
EXECUTORS = ("slurm", "local", "debug")
DEFAULT_TASK = "maps.sweep_train:train_trial"
#: the intermediate value reported for pruning: detectron2's flattened PQ of an evaluation
INTERMEDIATE_KEY = "panoptic_seg/PQ"
#: keys a sweep may not search: they break the run's identity or the schedule
_FORBIDDEN_KEYS = ("SEED", "OUTPUT_DIR", "SOLVER.MAX_ITER")
#: config keys that only exist in a model with memory (``MODEL.MAPS.ENABLED``)
_MEMORY_KEYS = ("MODEL.MAPS.", "SOLVER.MEMORY_MULTIPLIER")
_MEMORY_FREE = ("MODEL.MAPS.ENABLED", "MODEL.MAPS.EXTRA_SELF_ATTN_LAYERS")
_FILE_KEYS = {"name", "experiment", "description", "objective", "direction", "sampler", "pruner",
              "iterations", "overrides", "space", "seed", "task", "heartbeat"}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


class SweepError(MapsError):
    """A sweep file, study or storage is invalid; the message names the file, key or value."""


# ---------------------------------------------------------------------------------------------
# declaration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    """One searched detectron2 key and its range (what ``trial.suggest_*`` is called with)."""

    key: str
    type: str
    low: Optional[float] = None
    high: Optional[float] = None
    step: Optional[float] = None
    log: bool = False
    choices: Tuple[Any, ...] = ()

    def suggest(self, trial: "optuna.Trial") -> Any:
        """The trial's value of this key (lists of categorical choices come back as lists)."""
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high),
                                     step=int(self.step or 1), log=self.log)
        if self.type == "float":
            return trial.suggest_float(self.key, float(self.low), float(self.high),
                                       step=self.step, log=self.log)
        # optuna stores categorical values as given; lists are not hashable choices, so a
        # list choice is offered by its index and mapped back
        if any(isinstance(c, (list, tuple)) for c in self.choices):
            index = trial.suggest_categorical(self.key, list(range(len(self.choices))))
            return list(self.choices[index])
        return trial.suggest_categorical(self.key, list(self.choices))

    def decode(self, stored: Any) -> Any:
        """A value as Optuna stores it (see :meth:`suggest`) back to the config value."""
        if self.type == "categorical" and any(isinstance(c, (list, tuple)) for c in self.choices):
            return list(self.choices[int(stored)])
        return stored

    def extremes(self) -> List[Any]:
        """The values that bound the range: checked against the model before anything runs."""
        if self.type == "categorical":
            return [list(c) if isinstance(c, tuple) else c for c in self.choices]
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]


@dataclass(frozen=True)
class SweepSpec:
    """A declared study (one ``sweeps/<name>.yaml``), validated for its schema."""

    name: str
    experiment: str
    space: Tuple[ParamSpec, ...]
    objectives: Tuple[str, ...] = ("PQ",)
    directions: Tuple[str, ...] = ("maximize",)
    sampler: Mapping[str, Any] = field(default_factory=lambda: {"name": "tpe"})
    pruner: Mapping[str, Any] = field(default_factory=lambda: {"name": "median"})
    iterations: Optional[int] = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    task: str = DEFAULT_TASK
    #: seconds between heartbeats, and the silence after which a trial's worker is dead
    heartbeat_interval: float = 10.0
    grace_period: float = 120.0
    description: str = ""
    source: Optional[Path] = None

    @property
    def where(self) -> str:
        return str(self.source) if self.source else f"sweep '{self.name}'"

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def param(self, key: str) -> ParamSpec:
        for p in self.space:
            if p.key == key:
                return p
        raise SweepError(f"{self.where}: no searched key '{key}'")

    def to_dict(self) -> Dict[str, Any]:
        """The YAML form (what a worker job receives: no file system needed to rebuild it)."""
        space = {}
        for p in self.space:
            d: Dict[str, Any] = {"type": p.type}
            if p.type == "categorical":
                d["choices"] = [list(c) if isinstance(c, tuple) else c for c in p.choices]
            else:
                d.update(low=p.low, high=p.high)
                if p.step is not None:
                    d["step"] = p.step
                if p.log:
                    d["log"] = True
            space[p.key] = d
        return {"name": self.name, "experiment": self.experiment, "description": self.description,
                "objective": list(self.objectives), "direction": list(self.directions),
                "sampler": dict(self.sampler), "pruner": dict(self.pruner),
                "iterations": self.iterations, "overrides": dict(self.overrides),
                "seed": self.seed, "task": self.task, "space": space,
                "heartbeat": {"interval": self.heartbeat_interval, "grace": self.grace_period}}


def sweep_root() -> Path:
    """``$MAPS_SWEEPS`` if set, else ``./sweeps`` if it exists, else the sweeps beside the package."""
    from maps.registry import shipped_dir

    return shipped_dir("MAPS_SWEEPS", "sweeps")


def load_sweep(name: str, root: Optional[os.PathLike] = None) -> SweepSpec:
    """Read ``<root>/<name>.yaml`` (or a path to a YAML file) and check its schema."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        root = Path(root) if root is not None else sweep_root()
        path = root / f"{name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in root.glob("*.yaml")) if root.is_dir() else []
            raise SweepError(f"no sweep named '{name}' in {root} (known: {', '.join(known) or 'none'})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: expected a mapping with 'experiment' and 'space'")
    data.setdefault("name", path.stem)
    return parse_sweep(data, source=path)


def parse_sweep(data: Mapping[str, Any], source: Optional[Path] = None) -> SweepSpec:
    """A :class:`SweepSpec` from its YAML mapping; every mistake names the file and key."""
    where = str(source) if source else f"sweep {data.get('name')!r}"
    unknown = sorted(set(data) - _FILE_KEYS)
    if unknown:
        raise SweepError(f"{where}: unknown key '{unknown[0]}' (allowed: {', '.join(sorted(_FILE_KEYS))})")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SweepError(f"{where}: key 'name': {name!r} is not a valid study name "
                         "(lower-case letters, digits, '_', '-', '.')")
    experiment = data.get("experiment")
    if not isinstance(experiment, str) or not experiment:
        raise SweepError(f"{where}: missing key 'experiment' (the registry experiment the study starts from)")
    objectives = _as_list(data.get("objective", "PQ"))
    directions = _as_list(data.get("direction", "maximize"))
    if not objectives:
        raise SweepError(f"{where}: key 'objective': at least one metric is needed")
    for m in objectives:
        if m not in OBJECTIVE_METRICS:
            raise SweepError(f"{where}: key 'objective': unknown metric {m!r} (known: {', '.join(OBJECTIVE_METRICS)})")
    if len(directions) == 1 and len(objectives) > 1:
        directions = directions * len(objectives)
    if len(directions) != len(objectives) or any(d not in DIRECTIONS for d in directions):
        raise SweepError(f"{where}: key 'direction': expected one of {DIRECTIONS} per objective "
                         f"({len(objectives)}), got {data.get('direction')!r}")
    sampler = _component(data.get("sampler", "tpe"), SAMPLERS, where, "sampler")
    pruner = _component(data.get("pruner", "median"), PRUNERS, where, "pruner")
    if len(objectives) > 1 and pruner["name"] != "none":
        raise SweepError(f"{where}: key 'pruner': Optuna cannot prune a multi-objective study; "
                         "use pruner: none")
    space = data.get("space")
    if not isinstance(space, dict) or not space:
        raise SweepError(f"{where}: key 'space': expected a non-empty mapping of config key -> range")
    params = tuple(_param(key, raw, where) for key, raw in space.items())
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise SweepError(f"{where}: key 'overrides': expected a mapping of config key -> value")
    clash = sorted(set(overrides) & set(space))
    if clash:
        raise SweepError(f"{where}: key 'overrides': '{clash[0]}' is also searched in 'space'")
    iterations = data.get("iterations")
    if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, int)
                                   or iterations < 1):
        raise SweepError(f"{where}: key 'iterations': expected an integer >= 1, got {iterations!r}")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SweepError(f"{where}: key 'seed': expected an integer >= 0, got {seed!r}")
    heartbeat = data.get("heartbeat") or {}
    if not isinstance(heartbeat, dict) or set(heartbeat) - {"interval", "grace"}:
        raise SweepError(f"{where}: key 'heartbeat': expected {{interval: s, grace: s}}")
    interval = float(heartbeat.get("interval", 10.0))
    grace = float(heartbeat.get("grace", max(120.0, 6 * interval)))
    if interval <= 0 or grace <= 2 * interval:
        raise SweepError(f"{where}: key 'heartbeat': need interval > 0 and grace > 2 * interval "
                         f"(got interval {interval:g}, grace {grace:g})")
    task = data.get("task", DEFAULT_TASK)
    if not isinstance(task, str) or ":" not in task:
        raise SweepError(f"{where}: key 'task': expected 'package.module:function', got {task!r}")
    return SweepSpec(name=name, experiment=experiment, space=params, objectives=tuple(objectives),
                     directions=tuple(directions), sampler=sampler, pruner=pruner,
                     iterations=iterations, overrides=dict(overrides), seed=seed, task=task,
                     heartbeat_interval=interval, grace_period=grace,
                     description=str(data.get("description") or ""), source=source)


def _as_list(value: Any) -> List[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _component(raw: Any, known: Sequence[str], where: str, key: str) -> Dict[str, Any]:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or raw.get("name") not in known:
        name = raw.get("name") if isinstance(raw, dict) else raw
        raise SweepError(f"{where}: key '{key}': unknown {key} {name!r} (known: {', '.join(known)})")
    return dict(raw)


def _param(key: Any, raw: Any, where: str) -> ParamSpec:
    at = f"{where}: key 'space.{key}'"
    if not isinstance(key, str) or not re.match(r"^[A-Z0-9_]+(\.[A-Z0-9_]+)*$", key):
        raise SweepError(f"{at}: not a detectron2 config key (e.g. MODEL.MAPS.NUM_RETRIEVED)")
    if key in _FORBIDDEN_KEYS:
        raise SweepError(f"{at}: {key} cannot be searched (use the sweep's 'iterations' or its seed)")
    if not isinstance(raw, dict):
        raise SweepError(f"{at}: expected {{type: int|float|categorical, ...}}, got {raw!r}")
    kind = raw.get("type")
    if kind not in PARAM_TYPES:
        raise SweepError(f"{at}: unknown type {kind!r} (known: {', '.join(PARAM_TYPES)})")
    allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "step", "log"}
    extra = sorted(set(raw) - allowed)
    if extra:
        raise SweepError(f"{at}: unknown field '{extra[0]}' for type {kind} (allowed: {', '.join(sorted(allowed))})")
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SweepError(f"{at}: empty range: 'choices' must be a non-empty list")
        frozen = tuple(tuple(c) if isinstance(c, list) else c for c in choices)
        if len(set(map(repr, frozen))) != len(frozen):
            raise SweepError(f"{at}: repeated value in 'choices' {choices}")
        return ParamSpec(key, kind, choices=frozen)
    low, high, step, log = raw.get("low"), raw.get("high"), raw.get("step"), bool(raw.get("log", False))
    for name, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SweepError(f"{at}: '{name}' must be a number, got {v!r}")
        if kind == "int" and int(v) != v:
            raise SweepError(f"{at}: '{name}' must be an integer for type int, got {v!r}")
    if not low < high:
        raise SweepError(f"{at}: empty range: low {low!r} must be < high {high!r}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0
                             or step > high - low):
        raise SweepError(f"{at}: 'step' must be a number in (0, high - low], got {step!r}")
    if log and (low <= 0 or step not in (None, 1)):
        raise SweepError(f"{at}: 'log' needs low > 0 and no step")
    return ParamSpec(key, kind, low=low, high=high, step=step, log=log)


# ---------------------------------------------------------------------------------------------
# validation against the experiment and the model
# ---------------------------------------------------------------------------------------------
def _experiment(spec: SweepSpec, registry: Any = None) -> Any:
    from maps.registry import load_registry

    registry = registry if registry is not None else load_registry(validate=False)
    try:
        exp = registry.get(spec.experiment)
    except ConfigError as e:
        raise SweepError(f"{spec.where}: key 'experiment': {e}") from None
    if not exp.runnable:
        raise SweepError(f"{spec.where}: key 'experiment': '{spec.experiment}' is a reference "
                         "row of the paper (runnable: false)")
    return exp


def _sweep_memory(spec: SweepSpec, registry: Any, base: Any) -> Optional[Dict[str, Any]]:
    """The memory spec the trials train with, or None (memory off, or a task that does not
    train the model, such as the toy objectives of the tests)."""
    if spec.task != DEFAULT_TASK or not base.MODEL.MAPS.ENABLED:
        return None
    return _experiment(spec, registry).memory_spec()


def base_config(spec: SweepSpec, registry: Any = None, seed: Optional[int] = None) -> Any:
    """The experiment's resolved config with the sweep's iterations and fixed overrides."""
    from maps.registry import _set_iterations, apply_overrides

    exp = _experiment(spec, registry)
    cfg = exp.build_config(spec.seed if seed is None else seed)
    if spec.iterations is not None:
        _set_iterations(cfg, spec.iterations, "SOLVER.STEPS" in exp.overrides or
                        "SOLVER.STEPS" in spec.overrides)
        # a very short schedule rounds its drops onto the last iteration, which detectron2's
        # scheduler refuses: a drop at or after the end never happens, so leave it out
        cfg.SOLVER.STEPS = tuple(s for s in cfg.SOLVER.STEPS if s < cfg.SOLVER.MAX_ITER)
    try:
        apply_overrides(cfg, dict(spec.overrides), f"{spec.where}: key 'overrides'")
    except ConfigError as e:
        raise SweepError(str(e)) from None
    return cfg


def trial_config(spec: SweepSpec, params: Mapping[str, Any], registry: Any = None,
                 seed: Optional[int] = None, base: Any = None) -> Any:
    """The config one trial trains: :func:`base_config` plus the trial's values."""
    from maps.registry import apply_overrides

    cfg = (base.clone() if base is not None else base_config(spec, registry, seed))
    try:
        apply_overrides(cfg, dict(params), f"{spec.where}: trial values")
    except ConfigError as e:
        raise SweepError(str(e)) from None
    return cfg


def validate_space(spec: SweepSpec, registry: Any = None) -> Any:
    """Refuse, before any worker starts, a space the experiment's model cannot take.

    Checked: the experiment exists and runs; every key exists in its resolved config (with a
    close-name hint) and takes the range's type; a memory key is refused for a model without
    memory (``MODEL.MAPS.ENABLED`` false); each bound and each choice passes the registry's own
    value checks (:func:`maps.registry.check_maps_values`: layer indices inside the decoder,
    probabilities in [0, 1], k >= 1, ...). Returns the base config.
    """
    from maps.registry import check_maps_values

    cfg = base_config(spec, registry)
    has_memory = bool(cfg.MODEL.MAPS.ENABLED)
    for p in spec.space:
        at = f"{spec.where}: key 'space.{p.key}'"
        if (not has_memory and p.key.startswith(_MEMORY_KEYS) and p.key not in _MEMORY_FREE):
            raise SweepError(f"{at}: experiment '{spec.experiment}' has no memory "
                             "(MODEL.MAPS.ENABLED is false): its model does not have this parameter")
        try:
            current = _lookup(cfg, p.key)
        except (KeyError, TypeError):
            current = None  # unknown key: the probe below says so, with a close-name hint
        else:
            if p.type in ("int", "float") and (isinstance(current, bool) or
                                               not isinstance(current, (int, float))):
                raise SweepError(f"{at}: type {p.type} but the config value is {current!r}")
            if p.type == "float" and isinstance(current, int):
                raise SweepError(f"{at}: type float but {p.key} is an integer key ({current!r}); "
                                 "use type int")
        for value in p.extremes():
            try:
                probe = trial_config(spec, {p.key: value}, base=cfg)
            except SweepError as e:
                raise SweepError(f"{at}: value {value!r}: {str(e).split(': ', 2)[-1]}") from None
            problems = [(k, why) for k, why in check_maps_values(probe)
                        if k == p.key or k not in dict(check_maps_values(cfg))]
            if problems:
                key, why = problems[0]
                raise SweepError(f"{at}: value {value!r} is invalid for the model: {key}: {why}")
    problems = check_maps_values(cfg)
    if problems:
        raise SweepError(f"{spec.where}: the study's base config is invalid: {problems[0][0]}: {problems[0][1]}")
    return cfg


def _lookup(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


# ---------------------------------------------------------------------------------------------
# storage and study
# ---------------------------------------------------------------------------------------------
def study_dir(runs_root: os.PathLike, name: str) -> Path:
    """``<runs root>/sweep/<study>``: the journal, the heartbeats and the worker logs, beside
    the study's trial runs ``trial<N>/seed<s>``."""
    return Path(runs_root) / "sweep" / name


def trial_experiment(study: str, number: int) -> str:
    """The run-store experiment of a trial: ``sweep/<study>/trial<N>``."""
    return f"sweep/{study}/trial{number}"


def default_storage_url(runs_root: os.PathLike, name: str) -> str:
    return f"journal:{(study_dir(runs_root, name) / 'journal.log').absolute()}"


def make_storage(url: str) -> "optuna.storages.BaseStorage":
    """``journal:PATH`` (or a plain path) -> JournalStorage on a file; an RDB URL -> RDBStorage.

    SQLite is accepted only for a local file and with a warning: on a network filesystem its
    locking corrupts or hangs (optuna's own advice; see the shared notes).
    """
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if "://" not in url:
        path = Path(url[len("journal:"):] if url.startswith("journal:") else url)
        if path.is_dir():
            raise SweepError(f"--storage {url}: is a directory, expected a journal file path")
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    if url.startswith("sqlite:"):
        logger.warning("SQLite storage %s: safe only on a local disk with one machine; use the "
                       "journal file (the default) on a shared filesystem", url)
    try:
        return RDBStorage(url)
    except (ImportError, ModuleNotFoundError) as e:
        raise SweepError(f"--storage {url}: the database driver is not installed ({e})") from None
    except Exception as e:  # sqlalchemy's errors: bad URL, unreachable server
        raise SweepError(f"--storage {url}: cannot open ({type(e).__name__}: {e})") from None


def _sampler(spec: SweepSpec, stream: int = 0) -> "optuna.samplers.BaseSampler":
    """The sampler of ``spec``. A declared seed is mixed with ``stream`` (one per worker and
    invocation): workers seeded alike would propose the same random start-up points."""
    import optuna

    kw = {k: v for k, v in spec.sampler.items() if k != "name"}
    if kw.get("seed") is not None and stream:
        kw["seed"] = (int(kw["seed"]) + 7919 * stream) % (2 ** 31)
    name = spec.sampler["name"]
    try:
        if name == "tpe":
            kw.setdefault("multivariate", True)
            return optuna.samplers.TPESampler(**kw)
        if name == "random":
            return optuna.samplers.RandomSampler(**kw)
        if name == "cmaes":
            return optuna.samplers.CmaEsSampler(**kw)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(**kw)
        space = {p.key: list(range(len(p.choices))) if any(isinstance(c, tuple) for c in p.choices)
                 else list(p.choices) for p in spec.space if p.type == "categorical"}
        if len(space) != len(spec.space):
            raise SweepError(f"{spec.where}: key 'sampler': grid needs categorical parameters only")
        return optuna.samplers.GridSampler(space, **kw)
    except TypeError as e:
        raise SweepError(f"{spec.where}: key 'sampler': {e}") from None


def _pruner(spec: SweepSpec) -> "optuna.pruners.BasePruner":
    import optuna

    kw = {k: v for k, v in spec.pruner.items() if k != "name"}
    cls = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
           "hyperband": optuna.pruners.HyperbandPruner,
           "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
           "none": optuna.pruners.NopPruner}[spec.pruner["name"]]
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise SweepError(f"{spec.where}: key 'pruner': {e}") from None


def open_study(spec: SweepSpec, storage: Any, create: bool = False,
               stream: int = 0) -> "optuna.Study":
    """The shared study of ``spec`` (created once by the driver, then only loaded).

    A study that exists with other objectives is refused: its trials would not compare.
    """
    import optuna

    if isinstance(storage, str):
        storage = make_storage(storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = list(spec.directions)
    if create:
        study = optuna.create_study(study_name=spec.name, storage=storage, directions=directions,
                                    sampler=_sampler(spec), pruner=_pruner(spec), load_if_exists=True)
        got = [d.name.lower() for d in study.directions]
        if got != directions:
            raise SweepError(f"{spec.where}: study '{spec.name}' already exists with directions "
                             f"{got}, not {directions}; give the sweep another name")
        prev = study.user_attrs.get("objectives")
        if prev is not None and list(prev) != list(spec.objectives):
            raise SweepError(f"{spec.where}: study '{spec.name}' already exists with objectives "
                             f"{prev}, not {list(spec.objectives)}; give the sweep another name")
        if prev is None:
            study.set_user_attr("objectives", list(spec.objectives))
            study.set_user_attr("experiment", spec.experiment)
        return study
    try:
        return optuna.load_study(study_name=spec.name, storage=storage, sampler=_sampler(spec, stream),
                                 pruner=_pruner(spec))
    except KeyError:
        raise SweepError(f"study '{spec.name}' not found in the storage") from None


# ---------------------------------------------------------------------------------------------
# liveness of trials
# ---------------------------------------------------------------------------------------------
def _heartbeat_path(sdir: Path, number: int) -> Path:
    return sdir / "heartbeats" / f"trial{number}"


class _Heartbeat:
    """Touches a trial's heartbeat file every ``interval`` seconds from a daemon thread.

    The kernel gives a SIGKILLed worker no chance to say it died: the file simply stops
    being touched, which is what :func:`fail_stale_trials` looks for.
    """

    def __init__(self, path: Path, interval: float) -> None:
        self.path, self.interval = path, interval
        self._stop = threading.Event()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{path.name}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 1)


def fail_stale_trials(study: "optuna.Study", sdir: Path, grace_period: float,
                      runs_root: Optional[os.PathLike] = None) -> List[int]:
    """Mark FAIL every RUNNING trial whose worker stopped beating; return their numbers.

    A trial with no heartbeat file at all is judged by its start time. Its run in the store
    (if any) is recorded ``failed`` with the reason, so ``maps status`` agrees with the study.
    """
    import optuna
    from optuna.trial import TrialState

    now = time.time()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        hb = _heartbeat_path(sdir, t.number)
        try:
            last = hb.stat().st_mtime
        except FileNotFoundError:
            last = t.datetime_start.timestamp() if t.datetime_start else now
        if now - last <= grace_period:
            continue
        try:  # the reason first: a finished trial takes no more attributes
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason",
                                               f"worker died: no heartbeat for {now - last:.1f}s")
            if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process settled it first
        failed.append(t.number)
        run_dir = t.user_attrs.get("run_dir")
        if run_dir and runs_root is not None:
            _mark_run(Path(runs_root), Path(run_dir), "failed",
                      error=f"sweep worker died (no heartbeat for {now - last:.0f}s); trial marked FAIL")
    if failed:
        logger.warning("study %s: trials %s of dead workers marked failed", study.study_name, failed)
    return failed


def _mark_run(runs_root: Path, run_dir: Path, state: str, **fields: Any) -> None:
    from maps.runstore import RunStore

    store = RunStore(runs_root)
    with store.claim(run_dir, timeout_s=30, required=False):
        status = store.read_status(run_dir) or {}
        if status.get("state") in ("queued", "running") or not status:
            store.transition(run_dir, state, **fields)


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


def _started(study: "optuna.Study") -> int:
    """Trials asked for so far (every state but WAITING: enqueued trials are yet to come)."""
    from optuna.trial import TrialState

    return sum(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """flock on a shared file: ask-and-count must be one step across workers, or a study of
    N trials gets N + (workers - 1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class SweepWorker:
    """One worker of a study: ask, train, tell, until the study has ``target`` trials.

    A plain picklable callable (a Slurm or local job imports it in a fresh interpreter): it
    carries the sweep as a mapping, the storage URL and the run store's root.
    """

    def __init__(self, spec: Mapping[str, Any], storage_url: str, runs_root: str, target: int,
                 worker: int = 0, experiments_root: Optional[str] = None) -> None:
        self.spec = dict(spec)
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
        base = base_config(spec, registry)
        memory = _sweep_memory(spec, registry, base)
        if memory is not None:
            # built by the driver before any worker started (run_sweep)
            from maps.memory.prepare import apply_memory, memory_dir

            apply_memory(base, memory_dir(memory, self.runs_root))
        # its own random stream: per worker, and per invocation (the target differs)
        study = open_study(spec, self.storage_url, stream=1 + self.worker + 1009 * self.target)
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
        from maps.runstore import RunStore, traceback_tail

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


# ---------------------------------------------------------------------------------------------
# the driver: `maps sweep NAME`
# ---------------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    """What one ``maps sweep`` invocation did."""

    study: str
    storage: str
    target: int
    trials_by_worker: List[Optional[List[int]]]
    worker_errors: List[str]
    stale_failed: List[int]
    counts: Dict[str, int]
    job_ids: List[str] = field(default_factory=list)


def _collect(jobs: Sequence[Any]) -> Tuple[List[Optional[List[int]]], List[str]]:
    """Each worker's trial numbers (None for a worker that died) and the workers' errors."""
    by_worker: List[Optional[List[int]]] = []
    errors: List[str] = []
    for i, job in enumerate(jobs):
        try:
            by_worker.append(list(job.result()))
        except Exception as e:  # a dead worker: its trial is failed by the heartbeat check
            by_worker.append(None)
            errors.append(f"worker {i} (job {getattr(job, 'job_id', '?')}): {_job_error(e)}")
    return by_worker, errors


def run_sweep(spec: SweepSpec, trials: int, parallel: int = 1, executor: str = "local",
              storage: Optional[str] = None, runs_root: Optional[os.PathLike] = None,
              profile: Any = None, experiments_root: Optional[os.PathLike] = None,
              validate: bool = True, wait: bool = True) -> SweepResult:
    """Run ``trials`` more trials of ``spec``'s study on ``parallel`` workers.

    The space is validated and the study created here, once, before any worker starts (two
    workers creating one study at once is a race in every Optuna storage). Trials of workers
    that died since the last invocation are marked failed first; then the study continues:
    the count of new trials is shared by the workers through the storage. A worker that dies
    is reported in ``worker_errors`` and does not stop the others. ``wait=False`` returns once
    the workers are submitted (a long Slurm study need not hold a login-node shell).
    """
    from optuna.trial import TrialState

    from maps.launch import load_profile, make_executor
    from maps.registry import load_registry
    from maps.runstore import default_runs_root

    if executor not in EXECUTORS:
        raise SweepError(f"--executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
    if trials < 1 or parallel < 1:
        raise SweepError(f"--trials and --parallel must be >= 1 (got {trials}, {parallel})")
    runs_root = Path(runs_root) if runs_root is not None else default_runs_root()
    runs_root = runs_root.absolute()
    registry = load_registry(experiments_root, validate=False)
    if validate:
        validate_space(spec, registry)
    storage = storage or default_storage_url(runs_root, spec.name)
    study = open_study(spec, storage, create=True)
    sdir = study_dir(runs_root, spec.name)
    with _file_lock(sdir / "ask.lock"):
        stale = fail_stale_trials(study, sdir, spec.grace_period, runs_root)
        started = _started(study)
        target = started + trials
    leftovers = sorted(p.name for p in sdir.glob("trial*"))
    if started == 0 and leftovers:
        raise SweepError(f"{sdir}: runs {', '.join(leftovers[:3])} belong to an earlier study named "
                         f"'{spec.name}' that is not in {storage}; move them away or rename the sweep")
    memory = _sweep_memory(spec, registry, base_config(spec, registry))
    if memory is not None:
        # one bank and neighbour caches (k = 20, enough for every k and pool in a space)
        # shared by all trials, built here once, as `maps launch` builds it for its runs
        from maps.memory.prepare import memory_dir, normalize_spec, prepare_memory

        prepare_memory(memory_dir(memory, runs_root), **normalize_spec(memory))
    if profile is None or isinstance(profile, (str, os.PathLike)):
        profile = load_profile(profile)
    ex = make_executor(executor, sdir / "workers", profile, name=f"sweep-{spec.name}")
    workers = [SweepWorker(spec.to_dict(), storage, str(runs_root), target, worker=i,
                           experiments_root=str(experiments_root) if experiments_root else None)
               for i in range(min(parallel, trials))]
    if executor == "slurm":
        with ex.batch():
            jobs = [ex.submit(w) for w in workers]
    else:
        jobs = [ex.submit(w) for w in workers]
    logger.info("study %s: %d workers submitted (%s), target %d trials", spec.name, len(jobs),
                executor, target)
    job_ids = [str(getattr(j, "job_id", "")) for j in jobs]
    by_worker: List[Optional[List[int]]] = []
    errors: List[str] = []
    if wait:
        by_worker, errors = _collect(jobs)
        # submitit's local jobs sit in reference cycles: collected at interpreter exit, their
        # __del__ fails noisily, so drop and collect them now
        del jobs
        import gc

        gc.collect()
    counts: Dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return SweepResult(spec.name, storage, target, by_worker, errors, stale, counts, job_ids)
