"""A training run killed at random points resumes and ends exactly where an unbroken run ends.

The run is the real ``maps train`` (tiny config, 64 px, 20 iterations, a checkpoint every 3),
SIGKILLed 10 times: half at seeded random moments of a whole run (start-up, training,
checkpoint writes or the final evaluation alike), half at a seeded random moment shortly
after the attempt's first new checkpoint and restarted each time with ``--resume``. On CPU with one thread
and ``NUM_WORKERS 0`` training is deterministic (maps.engine.determinism), so the final
metrics and every weight must equal those of an uninterrupted run of the same seed.
An attempt that finishes before its kill time ends a run to completion, which is compared
with the reference there and then before the next one starts from nothing.
"""
from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import SMALL, TINY_CONFIG, maps_env

# the real `maps` command of this environment
SEEDED_MAPS = [sys.executable, "-m", "maps"]

MAX_ITER = 20
KILLS = 10
TRAIN_ARGS = ["SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", "3", "SEED", "7", *SMALL]


def _train(run_dir: Path, resume: bool) -> list:
    return ["train", "--config", str(TINY_CONFIG), "--output", str(run_dir),
            *(["--resume"] if resume else []), *TRAIN_ARGS]


def _weights(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _start_iterations(log: Path) -> list:
    """The iteration each attempt started from, as detectron2's trainer logs it."""
    return [int(m) for m in re.findall(r"Starting training from iteration (\d+)", log.read_text())]


def _alive_after(proc: subprocess.Popen, seconds: float) -> bool:
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        return True


def _alive_after_new_checkpoint(proc: subprocess.Popen, run: Path, extra_s: float,
                                timeout_s: float) -> bool:
    """Wait until ``run``'s last_checkpoint names a newer file than now, then ``extra_s``."""
    marker = run / "last_checkpoint"
    before = marker.read_text() if marker.is_file() else ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if marker.is_file() and marker.read_text() not in ("", before):
            return _alive_after(proc, extra_s)
        time.sleep(0.05)
    return proc.poll() is None


def _assert_matches_reference(run: Path, ref: Path, starts: list) -> None:
    """``run`` ended exactly where the uninterrupted ``ref`` ended: final metrics, every weight,
    and each iteration logged once in metrics.json."""
    assert json.loads((run / "final.json").read_text()) == json.loads((ref / "final.json").read_text())
    got, want = _weights(run / "model_final.pth"), _weights(ref / "model_final.pth")
    assert got.keys() == want.keys()
    diff = {k for k in want if not bool((got[k] == want[k]).all())}
    assert not diff, f"weights differ from the uninterrupted run: {sorted(diff)[:5]} (starts {starts})"
    # metrics.json has each iteration once after read_metrics' de-duplication, in order
    from maps.launch.runstore import read_metrics

    its = [m["iteration"] for m in read_metrics(run) if "total_loss" in m]
    assert its == sorted(set(its)) and its[-1] == MAX_ITER - 1


@pytest.mark.slow
def test_sigkill_ten_times_then_resume_matches_uninterrupted_run(datasets_root, tmp_path):
    env = maps_env(datasets_root)
    ref = tmp_path / "reference"
    t0 = time.monotonic()
    done = subprocess.run(SEEDED_MAPS + _train(ref, resume=False), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    reference_s = time.monotonic() - t0

    run = tmp_path / "killed"
    rng = random.Random(20260425)
    kills = 0
    resumed_from = []  # every attempt's start iteration, over all runs to completion
    while kills < KILLS:
        proc = subprocess.Popen(SEEDED_MAPS + _train(run, resume=True), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kills % 2 == 0:
            # a uniform moment of a whole run: start-up, training, checkpointing, evaluation
            alive = _alive_after(proc, rng.uniform(0.5, reference_s))
        else:
            # shortly after this attempt's first new checkpoint, whatever the start-up took
            # (under load a time-only draw can land in start-up every time)
            alive = _alive_after_new_checkpoint(proc, run, rng.uniform(0.0, 1.0), reference_s * 3)
        if alive:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        # it finished before its kill time: this run to completion (kills and resumes so far)
        # must already equal the reference; then start again from nothing, the kills are what
        # we test
        assert proc.returncode == 0
        starts = _start_iterations(run / "log.txt")
        _assert_matches_reference(run, ref, starts)
        resumed_from += starts
        for p in sorted(run.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
    final = subprocess.run(SEEDED_MAPS + _train(run, resume=True), env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-3000:]

    starts = _start_iterations(run / "log.txt")
    resumed_from += starts
    print(f"reference {reference_s:.1f} s; attempts started at iterations {resumed_from} "
          f"(last run: {starts})")
    _assert_matches_reference(run, ref, starts)
    # the odd-numbered kills each come after a new checkpoint, so attempts resumed mid-run
    # (whichever run to completion they fell in; fewer than KILLS // 2 only when a wait for a
    # new checkpoint timed out under load)
    assert len([s for s in resumed_from if s > 0]) >= 2, \
        f"too few resumptions from a checkpoint: starts {resumed_from}"
