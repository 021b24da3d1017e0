"""Fixtures: the shipped registry, and small registries written into tmp dirs."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable, Dict

import pytest

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "experiments"

#: datasets registered for the tmp registries (names no other test uses)
TRAIN, TEST, MEMORY = "regtest_train", "regtest_val", "regtest_memory"

BASE_YAML = """\
MODEL:
  MASK_FORMER:
    DEC_LAYERS: 10
  MAPS:
    ENABLED: False
SOLVER:
  MAX_ITER: 100
  STEPS: (90, 95)
DATASETS:
  TRAIN: ("regtest_train",)
  TEST: ("regtest_val",)
"""

MAPS_YAML = """\
_BASE_: base.yaml
MODEL:
  MAPS:
    ENABLED: True
"""

#: a valid one-table registry: a Mask2Former run, a MAPS run, an alias, an evaluation,
#: a reference row and a grid (with one grid point being an alias)
VALID_TABLE = f"""\
table: 5
suite: paper
title: tmp table
columns: [PQ, AP, mIoU]
defaults:
  base: maps.yaml
  iterations: 50
  seeds: 2
  datasets: {{train: [{TRAIN}], test: [{TEST}]}}
  memory_dataset: {MEMORY}
entries:
  - name: tmp/mask2former
    row: Mask2Former
    base: base.yaml
    memory_dataset: null
    paper: {{PQ: 39.1}}
  - name: tmp/maps
    row: MAPS
    paper: {{PQ: 40.7, AP: 27.0, mIoU: 47.0}}
  - name: tmp/none
    row: None
    same_as: tmp/maps
    paper: {{PQ: 40.7}}
  - name: tmp/scene-only
    row: "2"
    eval_of: tmp/maps
    overrides: {{MODEL.MAPS.TEST.OBJECT_MEMORY: false}}
  - name: tmp/other-method
    row: OneFormer [21]
    runnable: false
    paper: {{PQ: 41.9}}
  - name: tmp/k{{num_retrieved}}
    row: "{{num_retrieved}}"
    grid: {{MODEL.MAPS.NUM_RETRIEVED: [1, 5, 10]}}
    points:
      tmp/k5: {{same_as: tmp/maps}}
"""


@pytest.fixture(scope="session")
def registered_tmp_datasets() -> None:
    """Register the tmp registries' dataset names in detectron2's DatasetCatalog (once)."""
    from detectron2.data import DatasetCatalog

    for name in (TRAIN, TEST, MEMORY):
        if name not in DatasetCatalog.list():
            DatasetCatalog.register(name, lambda: [])


@pytest.fixture
def make_registry(tmp_path: Path, registered_tmp_datasets: None) -> Callable[..., Path]:
    """Write a registry into tmp: ``make_registry({"t.yaml": text, ...})`` -> its root.

    Base configs ``configs/base.yaml`` (Mask2Former, memory off) and ``configs/maps.yaml``
    (memory on) are always there unless ``configs`` replaces them.
    """

    def make(files: Dict[str, str], configs: Dict[str, str] | None = None) -> Path:
        root = tmp_path / "experiments"
        (root / "configs").mkdir(parents=True, exist_ok=True)
        for name, text in (configs or {"base.yaml": BASE_YAML, "maps.yaml": MAPS_YAML}).items():
            (root / "configs" / name).write_text(textwrap.dedent(text))
        for name, text in files.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))
        return root

    return make


@pytest.fixture(scope="session")
def shipped():
    """The shipped registry, fully validated (configs built, datasets checked) once."""
    from maps.registry import load_registry

    return load_registry(SHIPPED)
