"""Small deterministic tasks with the training task's signature, for the launcher's tests.

Slurm and local jobs import them by path (``"maps_toy_tasks:toy_train"``) in a fresh
interpreter: tests/conftest.py puts this folder on ``PYTHONPATH`` (inherited by the jobs) and
names the module in ``MAPS_TASK_MODULES``, the only way a task outside ``maps`` is accepted. Each reads its knobs from an optional
``TOY`` section of the config YAML, so a test controls a job through the config it launches::

    TOY: {STEPS: 20, SLEEP: 0.5, FAIL: false}

``toy_train`` behaves like detectron2 training in the ways the run store cares about: it
appends to metrics.json with a JSONWriter-like record per step, checkpoints every
``CHECKPOINT_PERIOD`` steps, and on ``resume=True`` restarts from the last checkpoint, so the
steps after it are appended a second time (exactly the duplicate read_metrics removes).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict

import yaml

from maps.io import atomic_write_json

CHECKPOINT = "toy_checkpoint.json"
ATTEMPTS = "toy_attempts.jsonl"


def toy_knobs(config_yaml: str) -> Dict[str, Any]:
    cfg = yaml.safe_load(config_yaml) or {}
    knobs = {"STEPS": 5, "SLEEP": 0.0, "FAIL": False, "CHECKPOINT_PERIOD": 1}
    knobs.update((cfg.get("TOY") or {}) if isinstance(cfg, dict) else {})
    return knobs


def final_metrics(seed: int, iteration: int) -> Dict[str, Any]:
    """The toy's final metrics: a fixed function of the seed, so tests know them in advance."""
    return {"PQ": 40.0 + seed, "PQ_th": 45.0 + seed, "PQ_st": 30.0 + seed,
            "AP": 20.0 + seed, "mIoU": 50.0 + seed, "iteration": iteration}


def _append(path: Path, record: Dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def toy_train(run_dir: str, config_yaml: str, seed: int, resume: bool) -> Dict[str, Any]:
    """Step ``STEPS`` times (sleeping ``SLEEP`` s each), logging ``loss = 1/(iter+1) + seed``."""
    knobs = toy_knobs(config_yaml)
    run = Path(run_dir)
    _append(run / ATTEMPTS, {"resume": resume, "pid": os.getpid(), "host": socket.gethostname(),
                             "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT")})
    start = 0
    if resume and (run / CHECKPOINT).is_file():
        start = json.loads((run / CHECKPOINT).read_text())["iteration"] + 1
    for it in range(start, int(knobs["STEPS"])):
        if knobs["SLEEP"]:
            time.sleep(float(knobs["SLEEP"]))
        _append(run / "metrics.json", {"iteration": it, "loss": 1.0 / (it + 1) + seed})
        if (it + 1) % int(knobs["CHECKPOINT_PERIOD"]) == 0:
            atomic_write_json(run / CHECKPOINT, {"iteration": it})
    if knobs["FAIL"]:
        raise RuntimeError(f"toy failure requested by TOY.FAIL (seed {seed})")
    return final_metrics(seed, int(knobs["STEPS"]) - 1)


def toy_distributed(run_dir: str, config_yaml: str, seed: int, resume: bool) -> Dict[str, Any]:
    """All-reduce ``rank + 1`` over the job's processes (started by the launcher): returns the
    world size and the sum, which is ``w (w + 1) / 2`` when every rank took part."""
    import torch
    import torch.distributed as dist
    from detectron2.utils import comm

    t = torch.tensor([float(comm.get_rank() + 1)])
    if comm.get_world_size() > 1:
        dist.all_reduce(t)
    record = {"rank": comm.get_rank(), "local_rank": comm.get_local_rank() if comm.get_world_size() > 1 else 0,
              "world_size": comm.get_world_size(), "allreduce_sum": float(t.item()),
              "backend": dist.get_backend() if dist.is_initialized() else None}
    _append(Path(run_dir) / "ranks.jsonl", record)
    return {**final_metrics(seed, 0), "world_size": record["world_size"],
            "allreduce_sum": record["allreduce_sum"], "backend": record["backend"]}


def toy_prerequisite(output_dir: str, payload: str = "bank") -> str:
    """A prerequisite that counts its builds in ``builds.txt`` (a test checks it ran once)."""
    out = Path(output_dir)
    with open(out / "builds.txt", "a") as f:
        f.write(f"{os.getpid()}\n")
    (out / "payload.txt").write_text(payload)
    return payload


def toy_needs_prerequisite(run_dir: str, config_yaml: str, seed: int, resume: bool) -> Dict[str, Any]:
    """A run that reads the prerequisite named by ``TOY.PREREQ`` (fails if it is not built)."""
    knobs = toy_knobs(config_yaml)
    payload = (Path(knobs["PREREQ"]) / "payload.txt").read_text()
    return {**final_metrics(seed, 0), "payload": payload}


def toy_after(run_dir: str, config_yaml: str, seed: int, resume: bool) -> Dict[str, Any]:
    """A run that needs another run's result: reads ``TOY.AFTER``'s final.json (an evaluation
    run reading its training run's output); fails if that run has not finished."""
    knobs = toy_knobs(config_yaml)
    source = Path(knobs["AFTER"]) / "final.json"
    if not source.is_file():
        raise RuntimeError(f"toy_after: {source} does not exist yet")
    before = json.loads(source.read_text())
    return {**final_metrics(seed, 0), "after_PQ": before["PQ"]}
