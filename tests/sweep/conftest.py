"""Fixtures of the sweep tests: a toy study (cheap deterministic objective, no training)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict

import pytest

REPO = Path(__file__).resolve().parents[2]


def toy_sweep(name: str = "toy", **changes: Any) -> Dict[str, Any]:
    """A sweep mapping over synthetic/main/maps with the toy objective of maps_toy_objectives."""
    data: Dict[str, Any] = {
        "name": name,
        "experiment": "synthetic/main/maps",
        "task": "maps_toy_objectives:toy_objective",
        "iterations": 4,
        "overrides": {"TEST.EVAL_PERIOD": 1},
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2},
        "pruner": {"name": "none"},
        "heartbeat": {"interval": 0.2, "grace": 1.0},
        "space": {
            "MODEL.MAPS.NUM_RETRIEVED": {"type": "int", "low": 1, "high": 8},
            "MODEL.MAPS.INPUT_MASKING_PROB": {"type": "float", "low": 0.0, "high": 1.0},
            "MODEL.MAPS.SCENE_LAYERS": {"type": "categorical", "choices": [[0, 1, 2], [0, 1]]},
        },
    }
    data.update(changes)
    return data


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    """W&B off unless a test asks for it (offline init costs ~1 s per trial)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for var in ("MAPS_SWEEP_TOY_KILL", "MAPS_SWEEP_TOY_FAIL", "MAPS_SWEEP_TOY_SLEEP"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def runs_root(tmp_path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def experiments_copy(tmp_path) -> Path:
    """A private copy of the registry, so registering a best trial leaves the repo alone."""
    dst = tmp_path / "experiments"
    shutil.copytree(REPO / "experiments", dst)
    return dst
