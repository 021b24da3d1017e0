"""How far a run has come: iteration of max, last PQ, ETA from the recent step rate, its logs
and its W&B run. Read from the run's own records, never from the job (which may be gone)."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional

from maps.launch.runstore import CONFIG_FILE, RunStore, RunStoreError, read_metrics

__all__ = ["run_progress", "eta_seconds", "LOG_FILE"]

#: detectron2's and maps' log of a run, written by the task in the run directory
LOG_FILE = "log.txt"
#: how many recent iterations' step times the ETA is taken from
RECENT = 20
PQ_KEYS = ("panoptic_seg/PQ", "PQ")


def _max_iter(run_dir: Path) -> Optional[int]:
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}
        return int(cfg["SOLVER"]["MAX_ITER"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def eta_seconds(records: List[Dict[str, Any]], max_iter: Optional[int]) -> Optional[float]:
    """Seconds left: the median step time of the last :data:`RECENT` logged iterations times
    the iterations left. detectron2's JSONWriter logs ``time`` (seconds per step) each period."""
    if not records or max_iter is None:
        return None
    times = [float(r["time"]) for r in records if isinstance(r.get("time"), (int, float))][-RECENT:]
    last = records[-1].get("iteration")
    if not times or last is None:
        return None
    return max(max_iter - 1 - int(last), 0) * statistics.median(times)


def run_progress(store: RunStore, run_dir: Path, status: Dict[str, Any]) -> Dict[str, Any]:
    """iteration, max_iter, last_pq, eta_s, log and wandb (URL or offline folder) of one run."""
    run_dir = Path(run_dir)
    try:
        records = read_metrics(run_dir)
    except RunStoreError:
        records = []
    its = [r for r in records if "iteration" in r]
    pq = next((r[k] for r in reversed(its) for k in PQ_KEYS if isinstance(r.get(k), (int, float))), None)
    final = {}
    try:
        final = store.read_final(run_dir) or {}
        wandb = store.read_wandb(run_dir) or {}
    except RunStoreError:
        wandb = {}
    max_iter = _max_iter(run_dir)
    done = status.get("state") == "done"
    log = run_dir / LOG_FILE
    return {
        "iteration": final.get("iteration", its[-1]["iteration"] if its else None),
        "max_iter": max_iter,
        "last_pq": final.get("PQ", pq),
        "eta_s": None if done or status.get("state") not in ("running",) else eta_seconds(its, max_iter),
        "log": str(log) if log.is_file() else status.get("log_stdout"),
        "wandb": wandb.get("url") or wandb.get("offline_dir") or wandb.get("dir"),
    }
