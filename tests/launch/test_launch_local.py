"""Launching without Slurm: the debug (in-process) and local (subprocess) executors.

The tasks come from maps_toy_tasks; their final metrics are a known function of the seed.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from maps.errors import ConfigError
from maps.launch import (ClusterProfile, LaunchError, PrereqSpec, RunSpec, launch, load_profile, reconcile)
from maps.launch.runstore import RunStore, read_metrics
from maps_toy_tasks import ATTEMPTS, final_metrics

PROFILES = Path(__file__).resolve().parents[2] / "slurm" / "profiles"


@pytest.fixture
def store(tmp_path):
    return RunStore(tmp_path / "runs")


def toy(seed, steps=3, fail=False, experiment="toy/a", task="maps_toy_tasks:toy_train", **extra):
    cfg = {"TOY": {"STEPS": steps, "FAIL": fail, **extra}, "SOLVER": {"IMS_PER_BATCH": 8}}
    return RunSpec(experiment, seed, json.dumps(cfg), task)


def attempts(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / ATTEMPTS).read_text().splitlines()]


def test_debug_launch_records_every_run(store):
    report = launch([toy(0), toy(1)], "debug", store=store)
    assert [o.action for o in report.outcomes] == ["submitted", "submitted"]
    for seed in (0, 1):
        run = store.run_dir("toy/a", seed)
        status = store.read_status(run)
        assert status["state"] == "done" and status["attempt"] == 1 and status["executor"] == "debug"
        assert status["world_size"] == 1 and status["ims_per_worker"] == 8
        assert store.read_final(run) == final_metrics(seed, 2)
        assert json.loads(store.read_config(run))["TOY"]["STEPS"] == 3
        assert [m["iteration"] for m in read_metrics(run)] == [0, 1, 2]
        assert attempts(run)[0]["resume"] is False


def test_relaunch_submits_nothing_for_done_runs(store):
    launch([toy(0)], "debug", store=store)
    report = launch([toy(0), toy(1)], "debug", store=store)
    assert [(o.action, o.previous_state) for o in report.outcomes] == [("skipped", "done"), ("submitted", None)]
    assert len(attempts(store.run_dir("toy/a", 0))) == 1


def test_failure_is_recorded_and_retried_only_when_asked(store):
    launch([toy(2, fail=True)], "debug", store=store)
    run = store.run_dir("toy/a", 2)
    status = store.read_status(run)
    assert status["state"] == "failed"
    assert status["error"] == "RuntimeError: toy failure requested by TOY.FAIL (seed 2)"
    assert "Traceback" in status["traceback"] and "toy_train" in status["traceback"]
    assert store.read_final(run) is None

    again = launch([toy(2)], "debug", store=store)
    assert again.outcomes[0].action == "skipped" and "--retry-failed" in again.outcomes[0].reason
    retried = launch([toy(2)], "debug", store=store, retry_failed=True)
    assert retried.outcomes[0].action == "submitted"
    status = store.read_status(run)
    assert status["state"] == "done" and status["attempt"] == 2 and "error" not in status
    # the retry resumes from the toy's checkpoint: metrics were not logged again from 0
    assert [a["resume"] for a in attempts(run)] == [False, True]
    assert [m["iteration"] for m in read_metrics(run)] == [0, 1, 2]


def test_dry_run_submits_and_writes_nothing(store):
    launch([toy(0)], "debug", store=store)
    pre = PrereqSpec("maps_toy_tasks:toy_prerequisite", str(store.root / "bank"))
    spec = toy(1)
    spec.prerequisites = [pre]
    report = launch([toy(0), spec], "slurm", profile=PROFILES / "a100.yaml", dry_run=True, store=store)
    assert [o.action for o in report.outcomes] == ["skipped", "would-submit"]
    assert report.resources["gpus_per_node"] == 8 and report.resources["partition"] == "gpu"
    assert report.prerequisites == [{"task": "maps_toy_tasks:toy_prerequisite",
                                     "output_dir": str(store.root / "bank"), "action": "would-build", "job_id": None}]
    assert not store.run_dir("toy/a", 1).exists() and not (store.root / "bank").exists()


def test_bad_launches_fail_before_submitting(store, tmp_path):
    with pytest.raises(LaunchError, match="run toy/a seed 0 is listed twice"):
        launch([toy(0), toy(0)], "debug", store=store)
    with pytest.raises(LaunchError, match="executor must be one of"):
        launch([toy(0)], "kubernetes", store=store)
    with pytest.raises(LaunchError, match=r"task 'maps_toy_tasks:nope': maps_toy_tasks has no function 'nope'"):
        launch([toy(0, task="maps_toy_tasks:nope")], "debug", store=store)
    assert store.read_status(store.run_dir("toy/a", 0)) is None
    with pytest.raises(ConfigError, match="the local executor has one node"):
        launch([toy(0)], "local", profile=ClusterProfile(nodes=2), store=store)


def test_dead_local_job_is_not_alive(store):
    run = store.run_dir("toy/a", 0)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.transition(run, "running", executor="local", job_id=str(dead.pid))
    status = reconcile(store, run, store.read_status(run))
    assert status["state"] == "failed" and f"local job {dead.pid} is gone" in status["error"]
    # alive: our own pid
    store.transition(run, "running", executor="local", job_id=str(os.getpid()))
    assert reconcile(store, run, store.read_status(run))["state"] == "running"


def test_prerequisite_is_built_once_before_its_runs(store):
    bank = store.root / "banks" / "toy"
    pre = PrereqSpec("maps_toy_tasks:toy_prerequisite", str(bank), {"payload": "neighbours"})
    runs = [toy(s, task="maps_toy_tasks:toy_needs_prerequisite", PREREQ=str(bank)) for s in (0, 1)]
    for r in runs:
        r.prerequisites = [pre, PrereqSpec(pre.task, str(bank), {"payload": "neighbours"})]
    report = launch(runs, "debug", store=store)
    assert [p["action"] for p in report.prerequisites] == ["built"]
    assert (bank / "_COMPLETE").is_file() and len((bank / "builds.txt").read_text().split()) == 1
    for s in (0, 1):
        assert store.read_final(store.run_dir("toy/a", s))["payload"] == "neighbours"
    # complete: a later launch (another seed) does not rebuild it
    more = toy(2, task="maps_toy_tasks:toy_needs_prerequisite", PREREQ=str(bank))
    more.prerequisites = [pre]
    report = launch([more], "debug", store=store)
    assert report.prerequisites[0]["action"] == "complete"
    assert len((bank / "builds.txt").read_text().split()) == 1


def test_failed_prerequisite_stops_the_runs(store, tmp_path):
    pre = PrereqSpec("maps_toy_tasks:toy_prerequisite", str(tmp_path / "bank"), {"nonsense": 1})
    spec = toy(0)
    spec.prerequisites = [pre]
    with pytest.raises(LaunchError, match=r"prerequisite maps_toy_tasks:toy_prerequisite -> .*bank failed"):
        launch([spec], "debug", store=store)
    assert store.read_status(store.run_dir("toy/a", 0)) is None
    assert not (tmp_path / "bank" / "_COMPLETE").exists()


_LAUNCHER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from maps.launch import RunSpec, launch
    from maps.launch.runstore import RunStore
    root, go = sys.argv[1], Path(sys.argv[2])
    runs = [RunSpec("race", s, "TOY: {STEPS: 2, SLEEP: 0.2}", "maps_toy_tasks:toy_train") for s in range(3)]
    while not go.exists():
        time.sleep(0.005)
    report = launch(runs, "debug", store=RunStore(root))
    print(json.dumps([o.action for o in report.outcomes]))
""")


def test_two_launchers_at_once_submit_each_run_once(store, tmp_path):
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(store.root), str(go)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(1.5)  # both imported and polling
    go.touch()
    actions = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    per_run = list(zip(*actions))
    assert all(sorted(a) == ["skipped", "submitted"] for a in per_run), actions
    for s in range(3):
        run = store.run_dir("race", s)
        assert len(attempts(run)) == 1 and store.read_status(run)["state"] == "done"


def test_local_two_process_job_all_reduces_over_gloo(store):
    spec = RunSpec("dist", 0, "SOLVER: {IMS_PER_BATCH: 8}\n", "maps_toy_tasks:toy_distributed")
    launch([spec], "local", profile=ClusterProfile(tasks_per_node=2, timeout_min=5), store=store)
    run = store.run_dir("dist", 0)
    status = store.read_status(run)
    assert status["state"] == "done", status
    assert status["world_size"] == 2 and status["ims_per_worker"] == 4
    final = store.read_final(run)
    assert (final["world_size"], final["allreduce_sum"], final["backend"]) == (2, 3.0, "gloo")
    ranks = sorted(json.loads(line)["rank"] for line in (run / "ranks.jsonl").read_text().splitlines())
    assert ranks == [0, 1]


def test_local_preemption_requeues_and_resumes(store):
    spec = RunSpec("preempt", 0, "TOY: {STEPS: 30, SLEEP: 0.1}\n", "maps_toy_tasks:toy_train")
    report = launch([spec], "local", profile=load_profile(PROFILES / "local-ci.yaml"), store=store, wait=False)
    job = report.jobs[0]
    run = store.run_dir("preempt", 0)
    deadline = time.monotonic() + 60
    while len(read_metrics(run)) < 5:
        assert time.monotonic() < deadline, "the toy never started"
        time.sleep(0.1)
    # SIGUSR2 to the task, as Slurm sends it before preemption (submitit's LocalJob._interrupt
    # signals its controller process, which does not forward USR2)
    os.kill(attempts(run)[0]["pid"], signal.SIGUSR2)
    assert job.result() == final_metrics(0, 29)
    status = store.read_status(run)
    assert status["state"] == "done" and status["attempt"] == 2 and status["requeues"] == 1
    assert [a["resume"] for a in attempts(run)] == [False, True]
    assert [m["iteration"] for m in read_metrics(run)] == list(range(30))


def test_distributed_env_outside_a_job_reads_torchrun_variables(monkeypatch):
    from maps.launch.distributed import _port_for, distributed_env

    for k, v in dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2",
                     MASTER_ADDR="node7", MASTER_PORT="1234").items():
        monkeypatch.setenv(k, v)
    env = distributed_env()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 8, 1, 2)
    assert (env.master_addr, env.master_port, env.is_main) == ("node7", 1234, False)
    # one port per job, the same on every task of it
    assert _port_for("12_3") == _port_for("12_3") != _port_for("12_4")
    assert 20000 <= _port_for("12_3") < 50000


def test_distributed_env_inside_a_job_comes_from_submitit(monkeypatch):
    """submitit's TorchDistributedEnvironment (here a local job's variables): ranks from it,
    loopback on one node, the first host on several, the port from the job id."""
    from maps.launch.distributed import _port_for, distributed_env

    for k in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    job = dict(SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID="77", SUBMITIT_LOCAL_NTASKS="4",
               SUBMITIT_LOCAL_JOB_NUM_NODES="1", SUBMITIT_LOCAL_NODEID="0",
               SUBMITIT_LOCAL_GLOBALID="3", SUBMITIT_LOCAL_LOCALID="3")
    for k, v in job.items():
        monkeypatch.setenv(k, v)
    env = distributed_env()
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (3, 3, 4, 4)
    assert (env.master_addr, env.master_port, env.job_id) == ("127.0.0.1", _port_for("77"), "77")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SUBMITIT_LOCAL_NODEID", "1")
    monkeypatch.setenv("SUBMITIT_LOCAL_LOCALID", "1")
    env = distributed_env()
    assert (env.node_rank, env.local_rank, env.local_world_size) == (1, 1, 2)
    assert env.master_addr != "127.0.0.1"  # the job's first host
    monkeypatch.setenv("MASTER_PORT", "4242")
    assert distributed_env().master_port == 4242
