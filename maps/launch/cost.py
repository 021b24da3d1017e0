"""What a launch will cost before it is submitted: GPU-hours per run and in total.

A run's hours are its iterations times a step time, times the GPUs (or CPU cores) its
profile asks for. The step time is calibrated from finished runs of this run store when
there are any (the median logged ``time`` of the same experiment's runs, else of the same
dataset's), else the profile's ``seconds_per_iter`` (the user's estimate for that hardware);
with neither the cost is unknown and the plan says so.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from maps.launch.runstore import RunStore, RunStoreError, read_metrics
from maps.launch.specs import config_value

__all__ = ["RunCost", "estimate_costs", "measured_step_times"]


@dataclass
class RunCost:
    experiment: str
    seed: int
    iterations: Optional[int]
    seconds_per_iter: Optional[float]
    source: str                    # measured (N runs) | dataset (N runs) | profile | unknown
    devices: int                   # GPUs (or CPU cores when the profile has no GPU)
    unit: str                      # "GPU" | "CPU"

    @property
    def hours(self) -> Optional[float]:
        if self.iterations is None or self.seconds_per_iter is None:
            return None
        return self.iterations * self.seconds_per_iter / 3600.0

    @property
    def device_hours(self) -> Optional[float]:
        return None if self.hours is None else self.hours * self.devices


def _base_name(experiment: str) -> str:
    """``ade20k/maps/+1a2b3c4d`` -> ``ade20k/maps``: overrides rarely change the step time."""
    parts = experiment.split("/")
    return "/".join(p for p in parts if not p.startswith("+"))


def measured_step_times(store: RunStore) -> Dict[str, List[float]]:
    """Median step time of every finished run of the store, by experiment (overrides dropped)."""
    out: Dict[str, List[float]] = {}
    for run in store.iter_runs("*"):
        if run.state != "done":
            continue
        try:
            times = [float(r["time"]) for r in read_metrics(run.run_dir) if isinstance(r.get("time"), (int, float))]
        except RunStoreError:
            continue
        if times:
            out.setdefault(_base_name(run.experiment), []).append(statistics.median(times))
    return out


def _step_time(experiment: str, measured: Dict[str, List[float]],
               profile_value: Optional[float]) -> Tuple[Optional[float], str]:
    name = _base_name(experiment)
    if measured.get(name):
        return statistics.median(measured[name]), f"measured ({len(measured[name])} runs)"
    dataset = name.split("/")[0] + "/"
    same = [t for k, ts in measured.items() if k.startswith(dataset) for t in ts]
    if same:
        return statistics.median(same), f"dataset ({len(same)} runs)"
    if profile_value:
        return float(profile_value), "profile"
    return None, "unknown"


def _iterations(config: Any) -> Optional[int]:
    value = config_value(config, "SOLVER.MAX_ITER")
    return int(value) if value is not None else None


def estimate_costs(specs: Sequence[Any], profile: Any, store: RunStore) -> List[RunCost]:
    """One :class:`RunCost` per run spec (``maps launch --dry-run`` prints them)."""
    measured = measured_step_times(store)
    gpus = int(profile.nodes) * int(profile.gpus_per_node or 0)
    devices, unit = (gpus, "GPU") if gpus else (int(profile.nodes) * profile.ntasks_per_node * int(profile.cpus_per_task), "CPU")
    out = []
    for spec in specs:
        seconds, source = _step_time(spec.experiment, measured, getattr(profile, "seconds_per_iter", None))
        out.append(RunCost(spec.experiment, spec.seed, _iterations(spec.config), seconds, source, devices, unit))
    return out
