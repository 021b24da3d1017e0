"""Launching on the real single-node Slurm of ``slurm/start.sh`` (run it first, as root).

    bash slurm/start.sh && .venv/bin/pytest -m slurm tests/slurm && bash slurm/stop.sh

Jobs are the toy tasks of maps_toy_tasks; every wait is bounded and names what it waited for.
"""
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from maps.cli import main
from maps.launch import ClusterProfile, PrereqSpec, RunSpec, launch, load_profile, slurm_job_states
from maps.launch.runstore import RunStore, read_metrics
from maps_toy_tasks import ATTEMPTS, final_metrics

from slurm_waits import wait_state, wait_until  # noqa: E402

pytestmark = pytest.mark.slurm

PROFILE = Path(__file__).resolve().parents[2] / "slurm" / "profiles" / "local-ci.yaml"


@pytest.fixture
def store(tmp_path):
    return RunStore(tmp_path / "runs")


def toy(experiment, seed, task="maps_toy_tasks:toy_train", **knobs):
    return RunSpec(experiment, seed, json.dumps({"TOY": knobs}), task)


def attempts(run):
    path = Path(run) / ATTEMPTS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_one_array_per_launch_and_idempotent_relaunch(store):
    runs = [toy("arr", s, STEPS=2) for s in range(3)]
    report = launch(runs, "slurm", profile=PROFILE, store=store)
    ids = [o.job_id for o in report.outcomes]
    array = ids[0].split("_")[0]
    assert sorted(ids) == [f"{array}_{i}" for i in range(3)]
    for s in range(3):
        run = store.run_dir("arr", s)
        assert store.read_status(run)["array_job_id"] == array
        status = wait_state(store, run, {"done", "failed"})
        assert status["state"] == "done" and status["job_id"] == f"{array}_{s}"
        assert store.read_final(run) == final_metrics(s, 1)
    wait_until(lambda: set(slurm_job_states(ids).values()) == {"COMPLETED"}, 60, "sacct to say COMPLETED")
    again = launch(runs, "slurm", profile=PROFILE, store=store)
    assert [o.action for o in again.outcomes] == ["skipped"] * 3 and not again.jobs


def test_cancelled_job_is_not_alive_and_is_retried_on_request(store):
    run = store.run_dir("cancel", 0)
    report = launch([toy("cancel", 0, STEPS=600, SLEEP=1.0)], "slurm", profile=PROFILE, store=store)
    job_id = report.outcomes[0].job_id
    wait_state(store, run, {"running"})
    subprocess.run(["scancel", job_id], check=True)
    wait_until(lambda: slurm_job_states([job_id])[job_id].startswith("CANCELLED"), 60, "the job to be cancelled")
    assert store.read_status(run)["state"] == "running"  # killed: it could not say so itself

    r = CliRunner().invoke(main, ["status", "cancel", "--runs-root", str(store.root), "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)
    assert row["state"] == "cancelled" and row["slurm"].startswith("CANCELLED")

    again = launch([toy("cancel", 0, STEPS=2)], "slurm", profile=PROFILE, store=store)
    assert again.outcomes[0].action == "skipped" and again.outcomes[0].previous_state == "cancelled"
    retried = launch([toy("cancel", 0, STEPS=2)], "slurm", profile=PROFILE, store=store, retry_failed=True)
    assert retried.outcomes[0].action == "submitted" and retried.outcomes[0].job_id != job_id
    assert wait_state(store, run, {"done", "failed"})["state"] == "done"


def _start_now(job_id):
    """Skip the ~120 s BeginTime Slurm gives a requeued job (see shared notes), once it is
    pending again. Not sooner: slurmd revokes the job's credential at the requeue with a
    1-second clock, and a restart within that second dies with "Job credential revoked"."""
    if slurm_job_states([job_id]).get(job_id) == "PENDING":
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
    return False


def test_preempted_job_requeues_and_resumes_in_the_same_run_dir(store):
    # a checkpoint every 10 steps: the steps after the last one are logged twice
    spec = toy("preempt", 0, STEPS=40, SLEEP=0.25, CHECKPOINT_PERIOD=10)
    report = launch([spec], "slurm", profile=load_profile(PROFILE), store=store)
    job, run = report.jobs[0], store.run_dir("preempt", 0)
    wait_until(lambda: len(read_metrics(run)) >= 13, 120, "13 toy steps")
    job._interrupt()  # USR2, as before a preemption (timeout_min 30 > 10: 'preempted', not 'timed-out')
    status = wait_state(store, run, {"queued"}, timeout=60)
    assert status["requeues"] == 1
    wait_until(lambda: len(attempts(run)) >= 2 or _start_now(job.job_id), 180, "the requeued job to restart")
    status = wait_state(store, run, {"done", "failed"}, timeout=120)
    assert status["state"] == "done", status
    assert status["attempt"] == 2 and status["job_id"] == job.job_id
    tries = attempts(run)
    assert [t["resume"] for t in tries] == [False, True]
    assert tries[1]["slurm_restart_count"] == "1"
    lines = (run / "metrics.json").read_text().splitlines()
    assert len(lines) > 40  # replayed steps after the checkpoint
    assert [m["iteration"] for m in read_metrics(run)] == list(range(40))
    assert store.read_final(run) == final_metrics(0, 39)


def test_two_task_job_sets_up_gloo(store):
    spec = RunSpec("dist", 0, "SOLVER: {IMS_PER_BATCH: 16}\n", "maps_toy_tasks:toy_distributed")
    prof = ClusterProfile(partition="debug", tasks_per_node=2, cpus_per_task=1, mem_gb=2, timeout_min=30)
    launch([spec], "slurm", profile=prof, store=store)
    run = store.run_dir("dist", 0)
    status = wait_state(store, run, {"done", "failed"}, timeout=240)
    assert status["state"] == "done", status
    assert status["world_size"] == 2 and status["ims_per_worker"] == 8
    final = store.read_final(run)
    assert (final["world_size"], final["allreduce_sum"], final["backend"]) == (2, 3.0, "gloo")


def test_runs_wait_for_their_prerequisite(store, tmp_path):
    bank = tmp_path / "bank"
    pre = PrereqSpec("maps_toy_tasks:toy_prerequisite", str(bank), {"payload": "memory"})
    runs = []
    for s in range(2):
        spec = toy("needs", s, task="maps_toy_tasks:toy_needs_prerequisite", PREREQ=str(bank))
        spec.prerequisites = [pre]
        runs.append(spec)
    report = launch(runs, "slurm", profile=PROFILE, store=store)
    (entry,) = report.prerequisites
    assert entry["action"] == "submitted"
    for s in range(2):
        run = store.run_dir("needs", s)
        assert store.read_status(run)["dependency"] == f"afterok:{entry['job_id']}"
        status = wait_state(store, run, {"done", "failed"})
        assert status["state"] == "done", status
        assert store.read_final(run)["payload"] == "memory"
    assert len((bank / "builds.txt").read_text().split()) == 1 and (bank / "_COMPLETE").is_file()


_LAUNCHER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from maps.launch import RunSpec, launch
    from maps.launch.runstore import RunStore
    root, profile, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    runs = [RunSpec("race", s, "TOY: {STEPS: 2}", "maps_toy_tasks:toy_train") for s in range(4)]
    while not go.exists():
        time.sleep(0.005)
    report = launch(runs, "slurm", profile=profile, store=RunStore(root))
    print(json.dumps([o.job_id if o.action == "submitted" else None for o in report.outcomes]))
""")


def test_two_launchers_at_once_submit_each_run_once(store, tmp_path):
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(store.root), str(PROFILE), str(go)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(1.5)
    go.touch()
    results = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    for s, per_run in enumerate(zip(*results)):
        submitted = [j for j in per_run if j]
        assert len(submitted) == 1, results
        run = store.run_dir("race", s)
        assert store.read_status(run)["job_id"] == submitted[0]
        assert wait_state(store, run, {"done", "failed"})["state"] == "done"
        assert len(attempts(run)) == 1


def test_failed_prerequisite_cancels_its_runs_and_is_rebuilt_on_retry(store, tmp_path):
    bank = tmp_path / "bank"
    broken = PrereqSpec("maps_toy_tasks:toy_prerequisite", str(bank), {"nonsense": 1})
    spec = toy("orphan", 0, task="maps_toy_tasks:toy_needs_prerequisite", PREREQ=str(bank))
    spec.prerequisites = [broken]
    report = launch([spec], "slurm", profile=PROFILE, store=store)
    job_id = report.outcomes[0].job_id
    # --kill-on-invalid-dep: the run is cancelled, not left pending forever
    wait_until(lambda: slurm_job_states([job_id])[job_id].startswith("CANCELLED"), 90, "the orphaned run to be cancelled")
    again = launch([spec], "slurm", profile=PROFILE, store=store)
    assert again.outcomes[0].previous_state == "cancelled" and again.outcomes[0].action == "skipped"
    fixed = toy("orphan", 0, task="maps_toy_tasks:toy_needs_prerequisite", PREREQ=str(bank))
    fixed.prerequisites = [PrereqSpec(broken.task, str(bank), {"payload": "ok"})]
    retried = launch([fixed], "slurm", profile=PROFILE, store=store, retry_failed=True)
    assert retried.prerequisites[0]["action"] == "submitted"  # the dead build is not waited on
    status = wait_state(store, store.run_dir("orphan", 0), {"done", "failed"})
    assert status["state"] == "done" and store.read_final(store.run_dir("orphan", 0))["payload"] == "ok"


def test_waiting_run_gets_an_afterok_on_the_run_it_waits_for(store):
    train = toy("first", 0, STEPS=3, SLEEP=0.5)
    evaluation = RunSpec("second", 0, json.dumps({"TOY": {"AFTER": str(store.run_dir("first", 0))}}),
                         "maps_toy_tasks:toy_after", after=(("first", 0),))
    report = launch([evaluation, train], "slurm", profile=PROFILE, store=store)
    first_job = report.outcomes[1].job_id
    second = store.run_dir("second", 0)
    assert store.read_status(second)["dependency"] == f"afterok:{first_job}"
    status = wait_state(store, second, {"done", "failed", "cancelled"})
    assert status["state"] == "done", status
    assert store.read_final(second)["after_PQ"] == final_metrics(0, 2)["PQ"]
    # a second launch while the first run is queued waits on its job (not yet on the store)
    third = RunSpec("second", 1, json.dumps({"TOY": {"AFTER": str(store.run_dir("first", 1))}}),
                    "maps_toy_tasks:toy_after", after=(("first", 1),))
    launch([toy("first", 1, STEPS=20, SLEEP=0.5)], "slurm", profile=PROFILE, store=store)
    queued = store.read_status(store.run_dir("first", 1))["job_id"]
    launch([third], "slurm", profile=PROFILE, store=store)
    assert store.read_status(store.run_dir("second", 1))["dependency"] == f"afterok:{queued}"
    assert wait_state(store, store.run_dir("second", 1), {"done", "failed", "cancelled"})["state"] == "done"
