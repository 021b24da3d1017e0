"""The daily loop against the real single-node Slurm: logs and cancel through the CLI, and
distributed training of the tiny MAPS with 2 tasks (gloo on CPU) through the launcher.

    bash slurm/start.sh && .venv/bin/pytest -m slurm tests/slurm/test_slurm_daily.py
"""
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from maps.cli import main
from maps.launch import ClusterProfile, RunSpec, launch, plan_runs, slurm_job_states
from maps.launch.runstore import RunStore, read_metrics
from maps.registry import load_registry

from slurm_waits import wait_state, wait_until  # noqa: E402
from test_slurm_training import _start_now, env, shrink  # noqa: E402,F401  (fixtures shared)

pytestmark = pytest.mark.slurm
PROFILE = ClusterProfile(partition="debug", cpus_per_task=1, mem_gb=1, timeout_min=30)


def test_logs_and_cancel_through_the_cli(tmp_path):
    store = RunStore(tmp_path / "runs")
    spec = RunSpec("daily/slow", 0, "TOY: {STEPS: 600, SLEEP: 0.2}\n", "maps_toy_tasks:toy_train")
    report = launch([spec], "slurm", profile=PROFILE, store=store)
    run, job_id = store.run_dir("daily/slow", 0), report.outcomes[0].job_id
    wait_state(store, run, {"running"}, timeout=120)
    status = store.read_status(run)
    (attempt,) = status["attempts"]
    assert attempt["attempt"] == 1 and attempt["job_id"] == job_id and job_id in attempt["stdout"]

    root = ["--runs-root", str(store.root)]
    r = CliRunner().invoke(main, ["status", "daily/slow", *root, "--json"])
    row = json.loads(r.output.splitlines()[0])
    assert row["state"] == "running" and row["job_id"] == job_id and row["log"]
    r = CliRunner().invoke(main, ["logs", "daily/slow/seed0", *root])
    assert r.exit_code == 0 and f"==> {attempt['stdout']} <==" in r.output, r.output

    r = CliRunner().invoke(main, ["cancel", "daily/slow", "--yes", *root])
    assert r.exit_code == 0 and "daily/slow seed 0: cancelled (slurm job" in r.output, r.output
    assert store.read_status(run)["state"] == "cancelled"
    wait_until(lambda: slurm_job_states([job_id])[job_id].startswith("CANCELLED"), 90,
               f"Slurm to report job {job_id} cancelled")
    again = launch([spec], "slurm", profile=PROFILE, store=store)
    assert (again.outcomes[0].action, again.outcomes[0].previous_state) == ("skipped", "cancelled")


def _two_task_specs(store, names, iterations, period):
    (base,) = [s for s in plan_runs(load_registry(), "synthetic/main/maps", 1, store)]
    shrink(base.config, iterations=iterations, period=period)
    base.config.merge_from_list(["SOLVER.IMS_PER_BATCH", "4"])
    return [RunSpec(n, 0, base.config.clone(), base.task, prerequisites=base.prerequisites) for n in names]


def test_two_tasks_train_one_model_and_resume_to_the_same_weights(env):
    """gloo on CPU, 2 tasks: the global batch and LR are the config's, both ranks end with the
    same weights, records and W&B are written once, and a requeued 2-task job resumes to the
    same final weights as an uninterrupted one."""
    store = env["store"]
    profile = env["profile"].replace(tasks_per_node=2, mem_gb=4,
                                     setup=tuple(s for s in env["profile"].setup if "WANDB" not in s)
                                     + ("export WANDB_MODE=offline",))
    specs = _two_task_specs(store, ("ddp/straight", "ddp/interrupted"), iterations=40, period=10)
    report = launch(specs, "slurm", profile=profile, store=store)
    job = report.jobs[1]
    straight, run = (store.run_dir(n, 0) for n in ("ddp/straight", "ddp/interrupted"))
    wait_until(lambda: (run / "last_checkpoint").is_file(), 420, "the checkpoint of iteration 10")
    assert not (run / "model_final.pth").exists(), "training ended before the interruption"
    job._interrupt()  # USR2 to the job: both tasks stop, rank 0 requeues
    wait_until(lambda: (store.read_status(run) or {}).get("requeues") == 1, 120, "the requeue record")
    wait_until(lambda: (store.read_status(run) or {}).get("attempt") == 2 or _start_now(job.job_id),
               240, "the requeued job to restart")
    for r in (straight, run):
        status = wait_state(store, r, {"done", "failed", "cancelled"}, timeout=600)
        assert status["state"] == "done", status
        assert status["world_size"] == 2 and status["ims_per_worker"] == 2
        final = store.read_final(r)
        assert final["world_size"] == 2 and final["ranks_agree"] is True
        cfg = (r / "config.yaml").read_text()
        assert re.search(r"IMS_PER_BATCH: 4\b", cfg)           # the config's global batch
        # one writer, and a resume cuts what the interrupted attempt logged past its checkpoint:
        # the file itself (not only its reading) has each iteration once, in order
        raw = [json.loads(line)["iteration"] for line in (r / "metrics.json").read_text().splitlines()
               if "iteration" in json.loads(line)]
        assert raw == sorted(raw)                                # never back to an earlier iteration
        assert [m["iteration"] for m in read_metrics(r)] == sorted(set(raw))
        wandb_id = store.read_wandb(r)["id"]                   # rank 0's run, resumed by each attempt
        assert {p.name.rsplit("-", 1)[1] for p in r.glob("wandb/offline-run-*")} == {wandb_id}
        assert (r / "log.txt").is_file() and (r / "log.txt.rank1").is_file()
    assert store.read_status(run)["resumed"] is True
    a = torch.load(straight / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    b = torch.load(run / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    assert Path(store.read_wandb(run)["offline_dir"]).is_dir()
