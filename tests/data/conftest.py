"""Fixtures of the data tests: one tiny synthetic dataset per session, broken copies of it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

TINY = dict(num_train=8, num_val=4, size=64, seed=0)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A tiny synthetic dataset; tests must not modify it (use ``broken_copy``)."""
    from maps.data.synthetic import generate_synthetic_dataset

    return generate_synthetic_dataset(tmp_path_factory.mktemp("synth") / "ds", progress=False, **TINY)


@pytest.fixture
def dataset_copy(synthetic_root, tmp_path) -> Path:
    """A private copy of the tiny dataset that a test may break."""
    dst = tmp_path / "ds"
    shutil.copytree(synthetic_root, dst)
    return dst


@pytest.fixture
def edit_json() -> Callable[[Path, Callable[[dict], None]], None]:
    """``edit_json(path, fn)``: load a JSON file, let ``fn`` mutate it, write it back."""

    def edit(path: Path, fn: Callable[[dict], None]) -> None:
        data = json.loads(path.read_text())
        fn(data)
        path.write_text(json.dumps(data))

    return edit
