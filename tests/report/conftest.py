"""Fixtures: the shipped registry (YAML only) and run records written into tmp run stores.

Run records are written the way the launcher and trainer write them (status.json,
final.json, metrics.json in ``<root>/<experiment>/seed<k>/``), so the report reads real files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "experiments"
WANDB_FIXTURE = Path(__file__).parent / "fixtures" / "wandb_runs.json"

#: W&B run state -> run store state, as the project maps them (written here independently)
STATE_OF = {"finished": "done", "running": "running", "crashed": "failed", "killed": "cancelled"}


@pytest.fixture(scope="session")
def registry():
    from maps.registry import load_registry

    return load_registry(SHIPPED, validate=False)


def write_run(root: Path, experiment: str, seed: int, state: str = "done",
              final: Optional[Mapping[str, Any]] = None,
              metrics: Iterable[Mapping[str, Any]] = ()) -> Path:
    run_dir = Path(root) / experiment / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "status.json").write_text(json.dumps({"experiment": experiment, "seed": seed,
                                                     "state": state, "attempt": 1}))
    if final is not None:
        (run_dir / "final.json").write_text(json.dumps(dict(final)))
    lines = [json.dumps(dict(m)) for m in metrics]
    if lines:
        (run_dir / "metrics.json").write_text("\n".join(lines) + "\n")
    return run_dir


def final_record(pq: float, ap: float, miou: float, **more: float) -> Dict[str, float]:
    return {"PQ": pq, "PQ_th": pq + 1.0, "PQ_st": pq - 1.0, "AP": ap, "mIoU": miou,
            "iteration": 1000, **more}


def store_from_wandb_fixture(root: Path) -> None:
    """The run store the recorded W&B runs came from: same states, final metrics, history."""
    doc = json.loads(WANDB_FIXTURE.read_text())
    for run in doc["runs"]:
        tags = dict(t.split(":", 1) for t in run["tags"])
        if "exp" in tags:
            experiment, seed = tags["exp"], int(tags["seed"])
        elif "OUTPUT_DIR" in run["config"]:
            experiment, _, seed_dir = run["config"]["OUTPUT_DIR"].split("/runs/")[1].rpartition("/")
            seed = int(seed_dir[len("seed"):])
        else:
            continue  # the W&B source cannot place this run either
        final = None
        if run["state"] == "finished":
            final = {k: run["summary"][k] for k in ("PQ", "PQ_th", "PQ_st", "AP", "mIoU", "iteration")}
        history: Dict[int, Dict[str, Any]] = {}
        for row in run["history"]:
            rec = history.setdefault(row["_step"], {"iteration": row["_step"]})
            rec.update({k: v for k, v in row.items() if not k.startswith("_")})
        write_run(root, experiment, seed, STATE_OF[run["state"]], final,
                  [history[k] for k in sorted(history)])
