"""Memory builds as launch prerequisites: the job that builds an experiment's memory (bank,
index, neighbour caches) once, before the runs that read it (``afterok`` on Slurm)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from maps.launch.specs import PrereqSpec
from maps.memory.prepare import MEMORY_KIND, datasets_root, memory_dir, normalize_spec

__all__ = ["BUILD_TASK", "build_memory", "memory_prereq"]

#: the launched task of a memory build (:func:`build_memory`)
BUILD_TASK = "maps.launch.memory_jobs:build_memory"


def build_memory(output_dir: str, **spec: Any) -> Dict[str, Any]:
    """:func:`maps.memory.prepare.prepare_memory`, logged as a W&B run (``job_type`` memory,
    group ``memory``) in ``output_dir``: what was built and how long it took."""
    from maps.engine.wandb_writer import WandbWriter
    from maps.memory.prepare import prepare_memory

    writer = WandbWriter(output_dir, {"memory": spec}, tags=["job:memory"], job_type="memory",
                         group="memory", name=f"memory/{Path(output_dir).name}")
    start = time.time()
    try:
        result = prepare_memory(output_dir, **spec)
        writer.log_final({"built_bank": int(bool(result.get("built_bank"))),
                          "caches_computed": len(result.get("computed", ())),
                          "seconds": round(time.time() - start, 1)})
        return result
    finally:
        writer.close()


def memory_prereq(spec: Mapping[str, Any], root, data_root: Optional[str] = None):
    """The :class:`maps.launch.PrereqSpec` that builds ``spec``'s memory under ``root``.

    The dataset root is passed to the task explicitly, so a job started with another
    environment still reads the datasets the launcher meant.
    """
    s = normalize_spec(spec)
    droot = os.path.abspath(data_root or datasets_root())
    return PrereqSpec(task=BUILD_TASK, output_dir=str(memory_dir(s, root, droot).resolve()),
                      kwargs={**s, "data_root": droot}, kind=MEMORY_KIND)
