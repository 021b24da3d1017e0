"""What to run: a run (experiment, seed, config, task) and its prerequisites, and the task
named by import path that a job calls."""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple


from maps.errors import MapsError

logger = logging.getLogger(__name__)


EXECUTORS = ("slurm", "local", "debug")
DEFAULT_TASK = "maps.engine.train:run_training"
PREREQ_MARKER = "_COMPLETE"
_PREREQ_JOB = ".prereq_job.json"
_PREREQ_LOCK = ".prereq.lock"


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
    #: the kind of the output folder's maps marker when the launcher creates it (maps.io)
    kind: str = "prereq"

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
    #: command-line config overrides (``maps launch SEL KEY VALUE``), kept in the run's record;
    #: they are part of the run's identity (its experiment name ends in their tag)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    #: config keys whose pretrained file is replaced by a random initialisation (recorded)
    random_weights: Sequence[str] = ()

    def config_yaml(self) -> str:
        if isinstance(self.config, str):
            return self.config
        dump = getattr(self.config, "dump", None)
        if dump is None:
            raise LaunchError(f"{self.experiment} seed {self.seed}: config must be a CfgNode or YAML text")
        return dump()


#: modules besides maps' own whose functions may be tasks (comma-separated), named by the
#: operator in the environment, never by a file (a sweep's or a record's ``task:``)
TASK_MODULES_ENV = "MAPS_TASK_MODULES"


def config_value(config: Any, key: str) -> Optional[Any]:
    """``key`` (dotted, e.g. ``SOLVER.MAX_ITER``) of a run's config, a CfgNode or YAML text;
    None when it has none (the toy tasks' configs)."""
    node = config
    if isinstance(config, str):
        import yaml

        try:
            node = yaml.safe_load(config) or {}
        except yaml.YAMLError:
            return None
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, IndexError):
            return None
    return node


def check_task(path: Any, where: str = "") -> None:
    """Refuse a task path maps would not import: not ``module:function``, or a module outside
    ``maps.`` and the modules of ``$MAPS_TASK_MODULES``. ``where`` (a file and key) prefixes
    the error. A task path read from a file must never import an arbitrary module: importing
    runs the module's code."""
    prefix = f"{where}: " if where else ""
    if not isinstance(path, str):
        raise LaunchError(f"{prefix}task {path!r}: expected 'package.module:function'")
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise LaunchError(f"{prefix}task {path!r}: expected 'package.module:function'")
    allowed = ["maps"] + [m.strip() for m in os.environ.get(TASK_MODULES_ENV, "").split(",") if m.strip()]
    if not any(module_name == m or module_name.startswith(m + ".") for m in allowed):
        raise LaunchError(f"{prefix}task {path!r}: module {module_name!r} is not maps' own; tasks of "
                          f"other modules run only when the operator names them in ${TASK_MODULES_ENV}")


def resolve_task(path: str, where: str = "") -> Callable[..., Any]:
    """Import ``"package.module:function"`` (see :func:`check_task`); a clear error names a bad path."""
    check_task(path, where)
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise LaunchError(f"task {path!r}: cannot import {module_name} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise LaunchError(f"task {path!r}: {module_name} has no function {attr!r}")
    return fn


