"""Memory builds as launch prerequisites: the job that builds an experiment's memory (bank,
index, neighbour caches) once, before the runs that read it (``afterok`` on Slurm)."""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from maps.launch.specs import PrereqSpec
from maps.memory.prepare import MEMORY_KIND, PREPARE_TASK, datasets_root, memory_dir, normalize_spec

__all__ = ["memory_prereq"]


def memory_prereq(spec: Mapping[str, Any], root, data_root: Optional[str] = None):
    """The :class:`maps.launch.PrereqSpec` that builds ``spec``'s memory under ``root``.

    The dataset root is passed to the task explicitly, so a job started with another
    environment still reads the datasets the launcher meant.
    """
    s = normalize_spec(spec)
    droot = os.path.abspath(data_root or datasets_root())
    return PrereqSpec(task=PREPARE_TASK, output_dir=str(memory_dir(s, root, droot).resolve()),
                      kwargs={**s, "data_root": droot}, kind=MEMORY_KIND)
