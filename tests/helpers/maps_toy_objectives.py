"""A cheap, deterministic sweep objective with the trial task's signature, for tests and demos.

Workers import it by path (``task: maps_toy_objectives:toy_objective`` in a sweep file) in a
fresh interpreter, so its knobs come from the environment (inherited by local and Slurm jobs):

* ``MAPS_SWEEP_TOY_SLEEP``: seconds per evaluation (default 0), to keep trials in flight;
* ``MAPS_SWEEP_TOY_KILL``: a trial number whose worker SIGKILLs itself mid-trial (a dead
  worker: no exception, no cleanup, exactly what a node failure or OOM kill looks like);
* ``MAPS_SWEEP_TOY_FAIL``: a trial number that raises (a failing trial, not a dead worker).
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Dict

import yaml

from maps.io import atomic_write_json


def toy_pq(cfg: Dict[str, Any]) -> float:
    """PQ of a config as a fixed function of its MAPS knobs: best at k = 4, input masking 0.3,
    scene memory in layers [0, 1], learning-rate multiplier 1 (tests know the optimum)."""
    maps = cfg["MODEL"]["MAPS"]
    k = int(maps["NUM_RETRIEVED"])
    p = float(maps["INPUT_MASKING_PROB"])
    scene = list(maps["SCENE_LAYERS"])
    mult = float(cfg["SOLVER"]["MEMORY_MULTIPLIER"])
    return round(50.0 - (k - 4) ** 2 - 20.0 * (p - 0.3) ** 2 - 2.0 * abs(len(scene) - 2)
                 - 5.0 * abs(mult - 1.0), 6)


def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, "-1"))
    except ValueError:
        return -1


def toy_objective(run_dir: str, config_yaml: str, seed: int, reporter: Any, writer: Any) -> Dict[str, Any]:
    """Report ``PQ * step / steps`` after each 'evaluation' (every TEST.EVAL_PERIOD of
    SOLVER.MAX_ITER), as training would, and return the final metrics."""
    cfg = yaml.safe_load(config_yaml)
    pq = toy_pq(cfg)
    steps = int(cfg["SOLVER"]["MAX_ITER"])
    period = max(int(cfg["TEST"]["EVAL_PERIOD"]), 1)
    sleep = float(os.environ.get("MAPS_SWEEP_TOY_SLEEP", "0") or 0)
    run = Path(run_dir)
    for it in range(period, steps + 1, period):
        if sleep:
            time.sleep(sleep)
        if reporter.number == _env_int("MAPS_SWEEP_TOY_KILL"):
            os.kill(os.getpid(), signal.SIGKILL)
        if reporter.number == _env_int("MAPS_SWEEP_TOY_FAIL"):
            raise RuntimeError(f"toy failure requested for trial {reporter.number}")
        value = pq * it / steps
        with open(run / "metrics.json", "a") as f:
            f.write(json.dumps({"iteration": it - 1, "panoptic_seg/PQ": value}) + "\n")
        if writer is not None:
            writer.log_metrics_by_step({it - 1: {"panoptic_seg/PQ": value}})
        reporter.report(value, it)
    final = {"PQ": pq, "PQ_th": pq + 1.0, "PQ_st": pq - 1.0, "AP": pq / 2, "mIoU": pq + 10.0,
             "params": 1.0 + 0.1 * len(cfg["MODEL"]["MAPS"]["SCENE_LAYERS"]), "iteration": steps}
    if writer is not None:
        writer.log_final(final)
    atomic_write_json(run / "final.json", final)
    return final
