"""Cluster profiles (slurm/profiles/*.yaml): the resources of one job, validated."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import yaml

from maps.errors import ConfigError

logger = logging.getLogger(__name__)


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


