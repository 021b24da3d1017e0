"""Cluster profiles (slurm/profiles/*.yaml): the resources of one job, validated by pydantic.

Every string of a profile ends up in the sbatch script submitit writes (``#SBATCH`` lines, the
setup lines, the srun command), so the schema refuses control characters everywhere: a value
holding a newline would otherwise become new lines of the script. The whole profile is checked
before anything is written or submitted; each mistake is one :class:`ConfigError` naming the
file and the key.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Dict, Mapping, Optional, Tuple, Union

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError,
                      ValidationInfo, field_validator, model_validator)

from maps.errors import ConfigError, schema_error_message

logger = logging.getLogger(__name__)

__all__ = ["ClusterProfile", "load_profile", "apply_profile_overrides"]


def _no_control(text: str) -> str:
    bad = next((ch for ch in text if unicodedata.category(ch) == "Cc"), None)
    if bad is not None:
        raise ValueError(f"must not contain a control character ({bad!r} in {text!r}): it would "
                         "become new lines of the sbatch script")
    return text


_SBATCH_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
# keys submitit sets itself from the typed fields: overriding them through sbatch_args would
# silently disagree with what the launcher believes it asked for
_RESERVED_SBATCH = {"ntasks_per_node", "nodes", "gpus_per_node", "gres", "time", "dependency", "array",
                    "partition", "account", "qos", "constraint", "exclusive", "signal", "cpus_per_task",
                    "mem", "job_name", "output", "error"}


def _sbatch_key(key: str) -> str:
    if not _SBATCH_KEY.match(key):
        raise ValueError(f"{key!r} is not an sbatch option name (a letter, then letters, digits, "
                         "'-' or '_')")
    return key


def _sbatch_value(value: Any) -> Any:
    if value is True or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    if isinstance(value, str):
        return _no_control(value)
    raise ValueError(f"must be text, a number or true (a flag), got {value!r}")


#: one line of text: no newline, carriage return, NUL or other control character
Text = Annotated[str, AfterValidator(_no_control)]
Name = Annotated[str, Field(min_length=1), AfterValidator(_no_control)]
SbatchArgs = Dict[Annotated[str, AfterValidator(_sbatch_key)], Annotated[Any, AfterValidator(_sbatch_value)]]


class ClusterProfile(BaseModel):
    """Resources of one job, from a cluster profile YAML (slurm/profiles/*.yaml).

    ``gpus_per_node`` GPUs per node become as many processes (``tasks_per_node``), one per
    GPU; without GPUs ``tasks_per_node`` may still ask for several CPU processes (gloo).
    Constructing one validates it (types, ranges, no control characters, known keys only).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    partition: Optional[Name] = Field(None, description="sbatch --partition")
    account: Optional[Name] = Field(None, description="sbatch --account")
    qos: Optional[Name] = Field(None, description="sbatch --qos")
    constraint: Optional[Name] = Field(None, description="sbatch --constraint, e.g. a100")
    exclusive: bool = Field(False, description="sbatch --exclusive: whole nodes")
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    tasks_per_node: Optional[int] = Field(None, ge=1, description="processes per node; "
                                          "default one per GPU")
    cpus_per_task: int = Field(1, ge=1)
    mem_gb: Optional[float] = Field(None, ge=0)
    timeout_min: int = Field(60, ge=1, description="the job's time limit in minutes")
    array_parallelism: int = Field(256, ge=1)
    signal_delay_s: int = Field(120, ge=1, description="Slurm: USR2 this many seconds before the "
                                "time limit, so a timeout is a checkpointed requeue")
    max_num_timeout: int = Field(3, ge=0, description="requeues after a timeout before the run "
                                 "counts as failed")
    setup: Tuple[Text, ...] = Field((), description="shell lines run before the job (module "
                                    "load, exports); kept out of the run records")
    srun_args: Tuple[Text, ...] = Field((), description="extra arguments of the srun call")
    sbatch_args: SbatchArgs = Field(default_factory=dict, description="extra #SBATCH options")
    additional_parameters: SbatchArgs = Field(default_factory=dict,
                                              description="submitit's name for sbatch_args")
    seconds_per_iter: Optional[float] = Field(None, gt=0, description="estimated seconds per "
                                              "training iteration on this hardware (costs)")

    _source: str = PrivateAttr("<defaults>")

    # -- validation ---------------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """``key: null`` (or ``--set profile.key=null``) means the default."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @field_validator("setup", "srun_args", mode="before")
    @classmethod
    def _list_of_strings(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        what = "shell lines" if info.field_name == "setup" else "srun arguments"
        raise ValueError(f"must be a list of {what} (strings), got {value!r}")

    @field_validator("sbatch_args", "additional_parameters")
    @classmethod
    def _not_reserved(cls, value: Dict[str, Any]) -> Dict[str, Any]:
        clash = sorted(k for k in value if k.replace("-", "_") in _RESERVED_SBATCH)
        if clash:
            raise ValueError(f"may not set {clash}: use the profile's own keys")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ClusterProfile":
        gpus, tasks = self.gpus_per_node, self.tasks_per_node
        if gpus and tasks is not None and tasks != gpus:
            raise ValueError(f"key 'tasks_per_node' is {tasks} but gpus_per_node is {gpus}: "
                             "one process per GPU (leave tasks_per_node out)")
        both = sorted({k.replace("-", "_") for k in self.sbatch_args}
                      & {k.replace("-", "_") for k in self.additional_parameters})
        if both:
            raise ValueError(f"key 'sbatch_args': {both} also set in additional_parameters "
                             "(its older name): keep one")
        if self.signal_delay_s >= 60 * self.timeout_min:
            raise ValueError(f"key 'signal_delay_s' is {self.signal_delay_s} s, not shorter than "
                             f"the time limit (timeout_min {self.timeout_min} = "
                             f"{60 * self.timeout_min} s)")
        return self

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "<defaults>",
                     prefix: str = "") -> "ClusterProfile":
        """Validate ``data``; a mistake is a ConfigError ``"<source>: key '<prefix>KEY' ..."``."""
        try:
            profile = cls.model_validate(dict(data))
        except ValidationError as e:
            raise ConfigError(schema_error_message(e, source, cls, prefix)) from None
        profile._source = source
        return profile

    # -- derived ------------------------------------------------------------------------------
    @property
    def source(self) -> str:
        """The file the profile was read from (``<defaults>`` for none)."""
        return self._source

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    def sbatch_parameters(self) -> Dict[str, Any]:
        """Extra ``#SBATCH`` options: ``additional_parameters`` and ``sbatch_args`` together."""
        return {**self.additional_parameters, **self.sbatch_args}

    def replace(self, **changes: Any) -> "ClusterProfile":
        """A copy with ``changes``, validated like the original (same source)."""
        return type(self).from_mapping({**self.model_dump(exclude_unset=True), **changes},
                                       self.source)

    def resources(self) -> Dict[str, Any]:
        """The resources as plain data: what a dry run prints and every run's status records.

        The setup lines are not in it (they may export tokens): only their count and the
        sha256 of the lines joined by newlines, enough to tell two setups apart.
        """
        data = self.model_dump(mode="json", exclude={"setup"})
        out = {k: v for k, v in data.items() if v not in (None, [], {})}
        out["tasks_per_node"] = self.ntasks_per_node
        out["setup_lines"] = len(self.setup)
        out["setup_sha256"] = hashlib.sha256("\n".join(self.setup).encode()).hexdigest()
        return out


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
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a cluster profile is a mapping of keys, got {type(data).__name__}")
    return ClusterProfile.from_mapping(data, str(path))


def apply_profile_overrides(profile: ClusterProfile, overrides: Mapping[str, Any]) -> ClusterProfile:
    """``profile`` with fields replaced from the command line (``--set profile.KEY=VALUE``).

    A string VALUE is read as YAML (``60`` an int, ``true`` a bool, ``[a, b]`` a list, ``null``
    the default), then the whole profile is validated by the same schema as a file; a mistake
    names ``profile.KEY``.
    """
    parsed: Dict[str, Any] = {}
    for key, value in overrides.items():
        # a control character stays as it is (and is refused): YAML would fold a newline away
        if isinstance(value, str) and not any(unicodedata.category(ch) == "Cc" for ch in value):
            try:
                value = yaml.safe_load(value) if value.strip() else None
            except yaml.YAMLError:
                pass  # not YAML: the text itself
        parsed[key] = value
    data = {**profile.model_dump(exclude_unset=True), **parsed}
    where = f"--set (over {profile.source})"
    changed = ", ".join(f"profile.{k}" for k in parsed)
    result = ClusterProfile.from_mapping(data, where, prefix="profile.")
    result._source = f"{profile.source} with --set {changed}" if parsed else profile.source
    return result
