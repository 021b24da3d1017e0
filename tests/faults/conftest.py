"""Fixtures of the fault tests: a tiny synthetic dataset and helpers to run the real ``maps`` CLI.

Every test here drives the installed command (``python -m maps``) in a subprocess, because a
fault (a SIGKILL, a bad file) must be seen the way a user sees it: exit status, stderr, and the
files left on disk.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "experiments" / "configs" / "synthetic" / "tiny.yaml"
# 64 px images: the tiny model at its smallest useful size (one training step ~0.1 s)
SMALL = ["INPUT.IMAGE_SIZE", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
         "TEST.EVAL_PERIOD", "0"]


@pytest.fixture(scope="session")
def datasets_root(tmp_path_factory) -> Path:
    """``$DETECTRON2_DATASETS`` with a tiny ``synthetic`` dataset (8 train, 4 val, 64 px)."""
    from maps.data.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("d2data")
    generate_synthetic_dataset(root / "synthetic", num_train=8, num_val=4, size=64, seed=0, progress=False)
    return root


def maps_env(datasets_root: Optional[Path] = None, **extra: str) -> Dict[str, str]:
    """The environment of a ``maps`` subprocess: one thread, offline W&B, the tiny datasets."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true",
               PYTHONUNBUFFERED="1")
    env.pop("WANDB_API_KEY", None)
    if datasets_root is not None:
        env["DETECTRON2_DATASETS"] = str(datasets_root)
    env.update(extra)
    return env


def maps_cmd(*args: str) -> List[str]:
    return [sys.executable, "-m", "maps", *args]


def run_maps(args: Sequence[str], env: Dict[str, str], cwd: Optional[Path] = None,
             timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(maps_cmd(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def snapshot(root: Path) -> Dict[str, str]:
    """sha256 of every file under ``root``: 'nothing already stored is damaged' is equality of two."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="session")
def bank(datasets_root, tmp_path_factory) -> Path:
    """A CLIP-grid bank (ViT-Tiny-16, random init) of the tiny dataset, with neighbour caches."""
    root = tmp_path_factory.mktemp("bankcase")
    env = maps_env(datasets_root)
    done = run_maps(["memory", "build", "--dataset", "synthetic_train", "--out", str(root / "bank"),
                     "--arch", "ViT-Tiny-16", "--dense", "clip"], env)
    assert done.returncode == 0, done.stderr[-2000:]
    for split in ("synthetic_train", "synthetic_val"):
        done = run_maps(["memory", "neighbors", "--bank", str(root / "bank"), "--dataset", split,
                         "--out", str(root / "neighbors" / f"{split}.jsonl"), "--k", "5"], env)
        assert done.returncode == 0, done.stderr[-2000:]
    return root / "bank"
