"""`maps demo --quick` end to end, as a user runs it: a subprocess, into temporary folders.

Slow (several minutes on a loaded 2-core machine: three trainings start detectron2 each).
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROWS = {"synthetic/main/mask2former": "Mask2Former", "synthetic/main/maps": "MAPS",
        "synthetic/main/maps-aug": "MAPS-Aug"}


def _demo(runs: Path, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "maps", "demo", "--quick", "--runs-root", str(runs),
                           "--out", str(out), "--no-plots"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_quick_demo_writes_the_table_logs_wandb_and_reuses_runs(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results"
    first = _demo(runs, out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "randomly initialised" in first.stdout
    assert "same-scene retrieval" in first.stdout and "chance" in first.stdout

    # the table: one row per trained experiment, each with its one seed done and finite numbers
    with open(out / "synthetic" / "table2.csv") as f:
        rows = list(csv.DictReader(f))
    for experiment, label in ROWS.items():
        mine = {r["metric"]: r for r in rows if r["experiment"] == experiment}
        assert set(mine) == {"PQ", "PQ_th", "PQ_st", "AP", "mIoU"}
        for r in mine.values():
            assert r["row"] == label and r["runs"] == "1/1 done" and r["n"] == "1"
            assert 0.0 <= float(r["mean"]) <= 100.0
        final = json.loads((runs / experiment / "seed0" / "final.json").read_text())
        assert float(mine["PQ"]["mean"]) == pytest.approx(final["PQ"], abs=1e-5)
        assert final["iteration"] == 20
    md = (out / "synthetic" / "table2.md").read_text()
    assert "| Mask2Former (baseline) |" in md and "| MAPS-Aug |" in md
    assert (out / "synthetic" / "table2.tex").is_file()

    # W&B offline runs, one per training, inside the run directories
    for experiment in ROWS:
        assert list((runs / experiment / "seed0" / "wandb").glob("offline-run-*")), experiment
    # the memory the MAPS runs read is the launcher's prerequisite, marked complete
    (mem,) = (runs / "_memory").iterdir()
    assert (mem / "_COMPLETE").is_file() and (mem / "neighbors" / "synthetic_val.jsonl").is_file()
    # what the demo made carries maps' marker, with the dataset its memory and runs came from
    # (how a later demo tells stale products, and what --fresh may delete)
    from maps.io import made_by_maps

    assert made_by_maps(runs, "demo")
    fingerprint = made_by_maps(runs / "datasets" / "synthetic", "dataset")["fingerprint"]
    assert made_by_maps(mem, "memory")["dataset_fingerprint"] == fingerprint
    for experiment in ROWS:
        assert made_by_maps(runs / experiment / "seed0", "run")["dataset_fingerprint"] == fingerprint

    # a second invocation reuses the dataset, the memory and the finished runs
    attempts = {e: json.loads((runs / e / "seed0" / "status.json").read_text())["attempt"] for e in ROWS}
    second = _demo(runs, out)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "reused" in second.stdout and second.stdout.count("done, reused") == 3
    after = {e: json.loads((runs / e / "seed0" / "status.json").read_text())["attempt"] for e in ROWS}
    assert after == attempts
