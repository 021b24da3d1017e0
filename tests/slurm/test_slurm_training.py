"""Real trainings launched on the single-node Slurm of ``slurm/start.sh`` through submitit.

A small grid of the synthetic suite (Mask2Former and MAPS, one seed, ~20 iterations at 64 px,
plus the Table 7 evaluation-only run of the MAPS model): the memory is built by its own
job first and the runs wait for it (afterok), the evaluation waits for its training run, and
everything lands in the run store. Then: a relaunch submits nothing, a cancelled run is
recorded as cancelled, and a run interrupted (SIGUSR2 -> checkpoint -> requeue) resumes from
its checkpoint and ends with the weights and metrics of a run that was never interrupted.

    bash slurm/start.sh && .venv/bin/pytest -m slurm tests/slurm/test_slurm_training.py
"""
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from maps.launch import ClusterProfile, RunSpec, launch, reconcile, slurm_job_states
from maps.launch.runstore import RunStore

from slurm_waits import wait_state, wait_until  # noqa: E402

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny synthetic dataset the jobs can read, a run store, and a profile exporting both."""
    from maps.data import generate_synthetic_dataset, register_all

    root = tmp_path_factory.mktemp("slurm_training")
    data = root / "data"
    generate_synthetic_dataset(data / "synthetic", num_train=6, num_val=2, size=64, seed=7,
                               progress=False)
    before = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = str(data)
    register_all(str(data))
    profile = ClusterProfile(partition="debug", cpus_per_task=1, mem_gb=3, timeout_min=30,
                             array_parallelism=8,
                             setup=(f"export DETECTRON2_DATASETS={data}", "export OMP_NUM_THREADS=1",
                                    "export MKL_NUM_THREADS=1", "export WANDB_MODE=disabled"))
    yield {"store": RunStore(root / "runs"), "profile": profile, "data": data}
    if before is None:
        os.environ.pop("DETECTRON2_DATASETS", None)
    else:
        os.environ["DETECTRON2_DATASETS"] = before
    register_all(before)


def shrink(cfg, iterations=20, period=100):
    cfg.merge_from_list(["SOLVER.MAX_ITER", str(iterations), "SOLVER.STEPS", f"({iterations - 2},)",
                         "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", str(period),
                         "TEST.EVAL_PERIOD", "0", "INPUT.IMAGE_SIZE", "64", "INPUT.MIN_SIZE_TEST", "64",
                         "INPUT.MAX_SIZE_TEST", "64", "MODEL.MAPS.NUM_RETRIEVED", "2",
                         "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "128"])
    return cfg


def grid_specs(store, selector="synthetic/table7/no-memory,synthetic/main/mask2former"):
    from maps.launch import plan_runs
    from maps.registry import load_registry

    specs = plan_runs(load_registry(), selector, 1, store)
    for s in specs:
        shrink(s.config)
    return specs


def test_grid_builds_memory_first_then_trains_and_evaluates(env):
    store, profile = env["store"], env["profile"]
    specs = grid_specs(store)
    assert [s.experiment for s in specs] == ["synthetic/main/mask2former", "synthetic/main/maps",
                                             "synthetic/table7/no-memory"]
    report = launch(specs, "slurm", profile=profile, store=store)
    (pre,) = report.prerequisites
    assert pre["action"] == "submitted" and pre["task"] == "maps.launch.memory_jobs:build_memory"
    runs = {s.experiment: store.run_dir(s.experiment, 0) for s in specs}
    train_job = store.read_status(runs["synthetic/main/maps"])["job_id"]
    assert store.read_status(runs["synthetic/main/mask2former"]).get("dependency") is None
    assert store.read_status(runs["synthetic/main/maps"])["dependency"] == f"afterok:{pre['job_id']}"
    assert store.read_status(runs["synthetic/table7/no-memory"])["dependency"] == \
        f"afterok:{':'.join(sorted([pre['job_id'], train_job]))}"
    for name, run in runs.items():
        status = wait_state(store, run, {"done", "failed", "cancelled"}, timeout=420)
        assert status["state"] == "done", (name, status)
        final = store.read_final(run)
        assert {"PQ", "PQ_th", "PQ_st", "AP", "mIoU", "params"} <= set(final) and final["iteration"] == 20
    assert (Path(pre["output_dir"]) / "_COMPLETE").is_file()
    assert store.read_status(runs["synthetic/table7/no-memory"])["started_at"] >= \
        store.read_status(runs["synthetic/main/maps"])["ended_at"]

    again = launch(grid_specs(store), "slurm", profile=profile, store=store)
    assert [o.action for o in again.outcomes] == ["skipped"] * 3 and not again.jobs
    assert again.prerequisites == []


def test_cancelled_training_is_recorded_as_cancelled(env):
    store, profile = env["store"], env["profile"]
    spec = grid_specs(store, "synthetic/main/mask2former")[0]
    spec = RunSpec("cancel/mask2former", 0, shrink(spec.config, iterations=5000), spec.task)
    report = launch([spec], "slurm", profile=profile, store=store)
    run, job_id = store.run_dir("cancel/mask2former", 0), report.outcomes[0].job_id
    wait_state(store, run, {"running"}, timeout=120)
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    wait_until(lambda: slurm_job_states([job_id])[job_id].startswith("CANCELLED"), 90, f"job {job_id} to be cancelled")
    status = reconcile(store, run, store.read_status(run))
    assert status["state"] == "cancelled" and job_id in status["error"]
    again = launch([spec], "slurm", profile=profile, store=store)
    assert (again.outcomes[0].action, again.outcomes[0].previous_state) == ("skipped", "cancelled")


def _start_now(job_id):
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True, timeout=30)
    return False


def test_interrupted_training_resumes_to_the_same_weights(env):
    """Two runs of one config and seed, one interrupted after its checkpoint of iteration 10.

    The task is the real one, maps.engine.train:run_training: deterministic CPU training, so
    the comparison checks the requeue and the resume themselves."""
    store, profile = env["store"], env["profile"]
    base = grid_specs(store, "synthetic/main/mask2former")[0].config
    shrink(base, iterations=60, period=10)
    specs = [RunSpec(name, 0, base.clone(), "maps.engine.train:run_training")
             for name in ("resume/straight", "resume/interrupted")]
    report = launch(specs, "slurm", profile=profile, store=store)
    job = report.jobs[1]
    straight, run = store.run_dir("resume/straight", 0), store.run_dir("resume/interrupted", 0)
    # last_checkpoint is written after the .pth: interrupted between the two, the job would
    # rightly restart from the previous checkpoint (here: from scratch)
    wait_until(lambda: (run / "last_checkpoint").is_file(), 300, "the checkpoint of iteration 10")
    assert not (run / "model_final.pth").exists(), "training ended before the interruption: raise MAX_ITER"
    job._interrupt()  # USR2, as before a preemption: submitit checkpoints and requeues
    wait_until(lambda: (store.read_status(run) or {}).get("requeues") == 1, 120, "the requeue record")
    wait_until(lambda: (store.read_status(run) or {}).get("attempt") == 2 or _start_now(job.job_id),
               240, "the requeued job to restart")
    for r in (straight, run):
        status = wait_state(store, r, {"done", "failed", "cancelled"}, timeout=420)
        assert status["state"] == "done", status
    status = store.read_status(run)
    assert status["resumed"] is True and status["job_id"] == job.job_id
    log = (run / "log.txt").read_text()
    assert re.search(r"Loading from \S+/model_00000[0-5]9\.pth", log), "not resumed from a checkpoint"
    assert re.search(r"Starting training from iteration [1-5]0\n", log)
    a = torch.load(straight / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    b = torch.load(run / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    assert store.read_final(straight) == store.read_final(run)
