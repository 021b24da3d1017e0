"""Sweep files: declaration of a study and its validation against the experiment.

Optuna studies over the MAPS knobs: declared in ``sweeps/*.yaml``, run by parallel workers.

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

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import pydantic.dataclasses
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from maps.errors import ConfigError, MapsError, schema_error_message

if TYPE_CHECKING:  # optuna and detectron2 are heavy: keep them out of `maps --help`
    import optuna

logger = logging.getLogger(__name__)


PARAM_TYPES = ("int", "float", "categorical")
DIRECTIONS = ("maximize", "minimize")
#: metrics a trial's final.json holds (see maps.engine.train.train)
OBJECTIVE_METRICS = ("PQ", "PQ_th", "PQ_st", "AP", "mIoU", "params")
SAMPLERS = ("tpe", "random", "grid", "cmaes", "nsga2")
PRUNERS = ("median", "percentile", "hyperband", "successive_halving", "none")
EXECUTORS = ("slurm", "local", "debug")
DEFAULT_TASK = "maps.sweep.trial:train_trial"
#: the intermediate value reported for pruning: detectron2's flattened PQ of an evaluation
INTERMEDIATE_KEY = "panoptic_seg/PQ"
#: keys a sweep may not search: they break the run's identity or the schedule
_FORBIDDEN_KEYS = ("SEED", "OUTPUT_DIR", "SOLVER.MAX_ITER")
#: config keys that only exist in a model with memory (``MODEL.MAPS.ENABLED``)
_MEMORY_KEYS = ("MODEL.MAPS.", "SOLVER.MEMORY_MULTIPLIER")
_MEMORY_FREE = ("MODEL.MAPS.ENABLED", "MODEL.MAPS.EXTRA_SELF_ATTN_LAYERS")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


class SweepError(MapsError):
    """A sweep file, study or storage is invalid; the message names the file, key or value."""


# ---------------------------------------------------------------------------------------------
# declaration
# ---------------------------------------------------------------------------------------------
def _number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"must be a number, got {value!r}")
    return value


#: a finite int or float, kept as written (``low: 3`` stays 3 in messages and in to_dict)
_Number = Annotated[Any, AfterValidator(_number)]


@pydantic.dataclasses.dataclass(frozen=True, config=ConfigDict(strict=True, extra="forbid"))
class ParamSpec:
    """One searched detectron2 key and its range (what ``trial.suggest_*`` is called with).

    Validated by pydantic on construction: a searchable key, a known type, numbers for the
    bounds, a non-empty range, distinct choices.
    """

    key: str
    type: Literal["int", "float", "categorical"]
    low: Optional[_Number] = None
    high: Optional[_Number] = None
    step: Optional[_Number] = None
    log: bool = False
    choices: Tuple[Any, ...] = ()

    @field_validator("choices", mode="before")
    @classmethod
    def _frozen_choices(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return tuple(tuple(c) if isinstance(c, list) else c for c in value)
        return value

    @model_validator(mode="after")
    def _a_range(self) -> "ParamSpec":
        if not re.match(r"^[A-Z0-9_]+(\.[A-Z0-9_]+)*$", self.key):
            raise ValueError("not a detectron2 config key (e.g. MODEL.MAPS.NUM_RETRIEVED)")
        if self.key in _FORBIDDEN_KEYS:
            raise ValueError(f"{self.key} cannot be searched (use the sweep's 'iterations' or its seed)")
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("empty range: 'choices' must be a non-empty list")
            if len(set(map(repr, self.choices))) != len(self.choices):
                raise ValueError(f"repeated value in 'choices' {_plain_choices(self.choices)}")
            return self
        low, high, step = self.low, self.high, self.step
        for name, v in (("low", low), ("high", high)):
            if v is None:
                raise ValueError(f"'{name}' must be a number, got None")
            if self.type == "int" and int(v) != v:
                raise ValueError(f"'{name}' must be an integer for type int, got {v!r}")
        if not low < high:
            raise ValueError(f"empty range: low {low!r} must be < high {high!r}")
        if step is not None and (step <= 0 or step > high - low):
            raise ValueError(f"'step' must be a number in (0, high - low], got {step!r}")
        if self.log and (low <= 0 or step not in (None, 1)):
            raise ValueError("'log' needs low > 0 and no step")
        return self

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


class _Heartbeat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    interval: float = Field(10.0, gt=0, description="seconds between a worker's heartbeats")
    grace: Optional[float] = Field(None, description="silence after which a worker is dead")

    @model_validator(mode="after")
    def _grace_after_beats(self) -> "_Heartbeat":
        grace = self.grace if self.grace is not None else max(120.0, 6 * self.interval)
        if grace <= 2 * self.interval:
            raise ValueError(f"need interval > 0 and grace > 2 * interval (got interval "
                             f"{self.interval:g}, grace {grace:g})")
        self.grace = grace
        return self


def _metrics(value: Any) -> List[str]:
    metrics = _as_list(value)
    if not metrics:
        raise ValueError("at least one metric is needed")
    for m in metrics:
        if m not in OBJECTIVE_METRICS:
            raise ValueError(f"unknown metric {m!r} (known: {', '.join(OBJECTIVE_METRICS)})")
    return metrics


def _component(known: Sequence[str], key: str) -> Any:
    """A sampler or pruner: a name, or a mapping with a ``name`` and its arguments."""
    def check(raw: Any) -> Dict[str, Any]:
        if isinstance(raw, str):
            raw = {"name": raw}
        if not isinstance(raw, dict) or raw.get("name") not in known:
            name = raw.get("name") if isinstance(raw, dict) else raw
            raise ValueError(f"unknown {key} {name!r} (known: {', '.join(known)})")
        return dict(raw)
    return AfterValidator(check)


def _task(value: str) -> str:
    """A trial task: ``maps``' own, or a module the operator named in ``$MAPS_TASK_MODULES``
    (importing a module runs its code: a file never chooses one)."""
    from maps.launch.specs import check_task
    from maps.errors import MapsError

    try:
        check_task(value)
    except MapsError as e:
        raise ValueError(str(e)) from None
    return value


def _study_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(f"{value!r} is not a valid study name (lower-case letters, digits, '_', "
                         "'-', '.')")
    return value


class _SweepFile(BaseModel):
    """The schema of a ``sweeps/*.yaml`` file (the search space is checked by ParamSpec)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)

    name: Annotated[str, AfterValidator(_study_name)]
    experiment: str = Field(min_length=1, description="the registry experiment the study starts from")
    description: Any = ""
    objective: Annotated[Any, AfterValidator(_metrics)] = "PQ"
    direction: Any = "maximize"
    sampler: Annotated[Any, _component(SAMPLERS, "sampler")] = "tpe"
    pruner: Annotated[Any, _component(PRUNERS, "pruner")] = "median"
    iterations: Optional[int] = Field(None, ge=1)
    overrides: Optional[Dict[str, Any]] = None
    space: Dict[Any, Any] = Field(description="config key -> range")
    seed: int = Field(0, ge=0)
    task: Annotated[str, AfterValidator(_task)] = DEFAULT_TASK
    heartbeat: Optional[_Heartbeat] = None

    @field_validator("space")
    @classmethod
    def _not_empty(cls, value: Dict[Any, Any]) -> Dict[Any, Any]:
        if not value:
            raise ValueError("expected a non-empty mapping of config key -> range")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "_SweepFile":
        objectives, directions = self.objective, _as_list(self.direction)
        if len(directions) == 1 and len(objectives) > 1:
            directions = directions * len(objectives)
        if len(directions) != len(objectives) or any(d not in DIRECTIONS for d in directions):
            raise ValueError(f"key 'direction': expected one of {DIRECTIONS} per objective "
                             f"({len(objectives)}), got {self.direction!r}")
        self.direction = directions
        if len(objectives) > 1 and self.pruner["name"] != "none":
            raise ValueError("key 'pruner': Optuna cannot prune a multi-objective study; use "
                             "pruner: none")
        clash = sorted(set(self.overrides or {}) & set(self.space))
        if clash:
            raise ValueError(f"key 'overrides': '{clash[0]}' is also searched in 'space'")
        return self


def parse_sweep(data: Mapping[str, Any], source: Optional[Path] = None) -> SweepSpec:
    """A :class:`SweepSpec` from its YAML mapping; every mistake names the file and key."""
    where = str(source) if source else f"sweep {data.get('name')!r}"
    try:
        f = _SweepFile.model_validate(dict(data))
    except ValidationError as e:
        raise SweepError(schema_error_message(e, where, _SweepFile)) from None
    params = tuple(_param(key, raw, where) for key, raw in f.space.items())
    heartbeat = f.heartbeat or _Heartbeat()
    return SweepSpec(name=f.name, experiment=f.experiment, space=params, objectives=tuple(f.objective),
                     directions=tuple(f.direction), sampler=f.sampler, pruner=f.pruner,
                     iterations=f.iterations, overrides=dict(f.overrides or {}), seed=f.seed,
                     task=f.task, heartbeat_interval=heartbeat.interval,
                     grace_period=heartbeat.grace, description=str(f.description or ""),
                     source=source)


def _as_list(value: Any) -> List[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _plain_choices(choices: Sequence[Any]) -> List[Any]:
    return [list(c) if isinstance(c, tuple) else c for c in choices]


def _param(key: Any, raw: Any, where: str) -> ParamSpec:
    at = f"space.{key}"
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: key '{at}': expected {{type: int|float|categorical, ...}}, got {raw!r}")
    kind = raw.get("type")
    if kind in PARAM_TYPES:
        allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "step", "log"}
        extra = sorted(set(raw) - allowed)
        if extra:
            raise SweepError(f"{where}: key '{at}': unknown field '{extra[0]}' for type {kind} "
                             f"(allowed: {', '.join(sorted(allowed))})")
    try:
        return ParamSpec(key=key, **raw)
    except ValidationError as e:
        raise SweepError(schema_error_message(e, where, None, prefix=at + ".")) from None


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
    return _experiment(spec, registry).memory_spec(base)


def trials_base(spec: SweepSpec, registry: Any = None,
                allow_random_weights: bool = False) -> Tuple[Any, Optional[Dict[str, Any]]]:
    """What every trial starts from: :func:`base_config` with its pretrained files resolved,
    and the memory spec the trials share (None without memory).

    The driver and each worker call it alike, so they agree on the memory's place. A model
    trained by the study needs its pretrained files in the weights cache
    (:class:`maps.weights.runs.MissingWeights` otherwise) unless ``allow_random_weights``.
    """
    cfg = base_config(spec, registry)
    if spec.task == DEFAULT_TASK:
        from maps.weights.runs import require_weights, resolve_config_weights

        require_weights(cfg, allow_random=allow_random_weights)
        cfg = resolve_config_weights(cfg, allow_random=allow_random_weights)
    return cfg, _sweep_memory(spec, registry, cfg)


def base_config(spec: SweepSpec, registry: Any = None, seed: Optional[int] = None) -> Any:
    """The experiment's resolved config with the sweep's iterations and fixed overrides."""
    from maps.registry.experiments import _set_iterations, apply_overrides

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


