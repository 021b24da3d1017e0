"""Three ``maps launch`` processes of one selector at once: each run is submitted exactly once.

tests/launch covers two in-process launchers with a toy task; this is the user's view: the real
command, the local executor and the real training task (1 iteration of the tiny config).
"""
from __future__ import annotations

import json
import subprocess

import pytest

from .conftest import REPO, maps_cmd, maps_env

REGISTRY = """
table: 2
suite: synthetic
title: concurrent launch fault test
columns: [PQ]
defaults:
  base: synthetic/tiny.yaml
  iterations: 1
  seeds: 2
  datasets:
    train: [synthetic_train]
    test: [synthetic_val]
entries:
  - name: faults/race
    row: Mask2Former
    overrides:
      INPUT.IMAGE_SIZE: 64
      INPUT.MIN_SIZE_TEST: 64
      INPUT.MAX_SIZE_TEST: 64
"""


@pytest.mark.slow
def test_concurrent_maps_launch_submits_each_run_once(tmp_path, datasets_root):
    import shutil

    reg = tmp_path / "experiments"
    shutil.copytree(REPO / "experiments" / "configs", reg / "configs")
    (reg / "race.yaml").write_text(REGISTRY)
    runs = tmp_path / "runs"
    env = maps_env(datasets_root, MAPS_EXPERIMENTS=str(reg))
    procs = [subprocess.Popen(maps_cmd("launch", "faults/race", "--executor", "local", "--runs-root", str(runs)),
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    submitted = sum(o[0].count("submitted") - o[0].count("runs submitted") for o in outs)
    for seed in (0, 1):
        run = runs / "faults" / "race" / f"seed{seed}"
        status = json.loads((run / "status.json").read_text())
        assert status["attempt"] == 1, status
        assert status["state"] in ("done", "running", "queued"), status
    assert submitted == 2, [o[0] for o in outs]  # "submitted" in one launcher's table per run
    # the local executor starts one job (its pid as id) per run; "%j" is submitit's template folder
    jobs = [d.name for d in (runs / ".submitit").iterdir() if d.is_dir() and d.name != "%j"]
    assert len(jobs) == 2, jobs
