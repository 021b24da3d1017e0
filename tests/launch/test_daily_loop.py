"""The daily loop on a cluster, without Slurm: overrides at launch, the cost of a plan, following
runs (iteration, ETA, logs) and cancelling them. The Slurm side is in tests/slurm."""
import json
import time

import pytest
import yaml
from click.testing import CliRunner

import maps.commands.launch as launch_cmd
from maps.cli import main
from maps.launch import ClusterProfile, RunSpec, RunStore, estimate_costs, launch, plan_runs
from maps.launch.progress import eta_seconds
from maps.registry import load_registry


@pytest.fixture(scope="module")
def registry():
    return load_registry(validate=False)


# -- overrides -------------------------------------------------------------------------------
def test_overrides_apply_to_every_run_and_name_it(registry, tmp_path):
    store = RunStore(tmp_path / "runs")
    a = plan_runs(registry, "synthetic/main/mask2former", 2, store, overrides={"SOLVER.BASE_LR": 0.001})
    b = plan_runs(registry, "synthetic/main/mask2former", 1, store, overrides={"SOLVER.BASE_LR": 0.002})
    plain = plan_runs(registry, "synthetic/main/mask2former", 1, store)
    assert plain[0].experiment == "synthetic/main/mask2former" and not plain[0].overrides
    assert {s.experiment for s in a} == {a[0].experiment}
    assert a[0].experiment.startswith("synthetic/main/mask2former/+") and len(a[0].experiment.rsplit("+")[1]) == 8
    assert b[0].experiment != a[0].experiment          # a changed override is another run
    assert [s.config.SOLVER.BASE_LR for s in a] == [0.001, 0.001]
    assert a[0].overrides == {"SOLVER.BASE_LR": 0.001}


def test_an_evaluation_run_waits_for_the_training_run_with_the_same_overrides(registry, tmp_path):
    store = RunStore(tmp_path / "runs")
    specs = plan_runs(registry, "synthetic/table7/no-memory", 1, store, overrides={"SOLVER.BASE_LR": 0.001})
    train, evaluate = specs
    assert evaluate.after == ((train.experiment, 0),)
    assert train.experiment.endswith(evaluate.experiment.rsplit("/", 1)[1])


@pytest.mark.parametrize("opts, message", [
    (["SOLVER.BASE_LR"], "KEY VALUE pairs"),
    (["MODEL.MAPS.MEMORY.ENCODER", "dino"], "MODEL.MAPS.MEMORY.ENCODER: defines the run's memory"),
    (["DATASETS.TRAIN", "('x',)"], "DATASETS.TRAIN"),
    (["SOLVER.BASE_LRR", "0.1"], "unknown config key 'SOLVER.BASE_LRR'"),
    (["SOLVER.BASE_LR", "fast"], "SOLVER.BASE_LR"),
])
def test_bad_overrides_are_refused_before_anything_is_written(opts, message, tmp_path):
    root = tmp_path / "runs"
    r = CliRunner().invoke(main, ["launch", "synthetic/main/mask2former", *opts, "--executor", "debug",
                                  "--runs-root", str(root)])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not root.exists()


def test_a_finished_run_is_reused_only_with_the_same_overrides(tmp_path, monkeypatch):
    monkeypatch.setattr(launch_cmd, "TRAIN_TASK", "maps_toy_tasks:toy_train")
    root = str(tmp_path / "runs")

    def go(*opts):
        r = CliRunner().invoke(main, ["launch", "synthetic/main/mask2former", *opts, "--seeds", "1",
                                      "--executor", "debug", "--runs-root", root])
        assert r.exit_code == 0, r.output
        return r.output

    assert "1 of 1 runs submitted" in go("SOLVER.BASE_LR", "0.001")
    assert "0 of 1 runs submitted" in go("SOLVER.BASE_LR", "0.001")
    assert "1 of 1 runs submitted" in go("SOLVER.BASE_LR", "0.002")
    runs = {r.experiment: r.status for r in RunStore(root).iter_runs()}
    assert sorted(s["overrides"]["SOLVER.BASE_LR"] for s in runs.values()) == [0.001, 0.002]


# -- cost ------------------------------------------------------------------------------------
def _finished(store, experiment, seed, times):
    run = store.run_dir(experiment, seed)
    run.mkdir(parents=True)
    store.transition(run, "done")
    with open(run / "metrics.json", "w") as f:
        for i, t in enumerate(times):
            f.write(json.dumps({"iteration": i, "time": t}) + "\n")


def test_cost_from_finished_runs_then_dataset_then_profile(tmp_path):
    store = RunStore(tmp_path / "runs")
    _finished(store, "ade20k/maps", 0, [0.4, 0.5, 0.6])       # median 0.5
    _finished(store, "ade20k/maps", 1, [0.7, 0.7, 0.7])       # median 0.7 -> experiment 0.6
    _finished(store, "ade20k/mask2former", 0, [0.3])          # dataset ade20k: median of 0.5, 0.7, 0.3 = 0.5
    prof = ClusterProfile(nodes=1, gpus_per_node=8, seconds_per_iter=2.0)
    cfg = "SOLVER: {MAX_ITER: 1000}\n"
    specs = [RunSpec("ade20k/maps/+1234abcd", 0, cfg), RunSpec("ade20k/table5/swapped", 0, cfg),
             RunSpec("coco/maps", 0, cfg)]
    costs = estimate_costs(specs, prof, store)
    assert [c.source for c in costs[:2]] == ["measured (2 runs)", "dataset (3 runs)"]
    assert costs[0].device_hours == pytest.approx(1000 * 0.6 / 3600 * 8)
    assert costs[1].device_hours == pytest.approx(1000 * 0.5 / 3600 * 8)
    assert costs[2].source == "profile" and costs[2].device_hours == pytest.approx(1000 * 2.0 / 3600 * 8)
    unknown = estimate_costs(specs[2:], ClusterProfile(nodes=1, gpus_per_node=8), store)[0]
    assert unknown.source == "unknown" and unknown.device_hours is None


def test_a_paper_table_is_refused_while_its_weights_are_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("MAPS_WEIGHTS", str(tmp_path / "empty-cache"))
    args = ["launch", "table6", "--dry-run", "--executor", "local", "--runs-root", str(tmp_path / "runs")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("error: ")]
    named = {line.split()[2] for line in lines[:-1]}
    assert named == {"r50-imagenet:", "clip-vit-b16-openai:", "dino-vit-b16:"}
    assert all("maps weights fetch" in line and "maps weights add" in line for line in lines[:-1])
    assert "--allow-random-weights" in lines[-1] and len(lines) == 5
    assert not (tmp_path / "runs").exists()


def test_dry_run_prints_gpu_hours_of_the_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("MAPS_WEIGHTS", str(tmp_path / "empty-cache"))
    r = CliRunner().invoke(main, ["launch", "table6", "--dry-run", "--executor", "local",
                                  "--allow-random-weights", "--runs-root", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    assert "synthetic/" not in r.output           # a bare table is the paper's
    assert "CPU-hours" in r.output and "without a step time" in r.output


def test_runs_record_the_keys_that_start_from_random_weights(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("MAPS_WEIGHTS", str(tmp_path / "empty-cache"))
    store = RunStore(tmp_path / "runs")
    paper = plan_runs(registry, "ade20k/maps", 1, store, allow_random_weights=True)[0]
    assert paper.random_weights == ["MODEL.WEIGHTS", "MODEL.MAPS.MEMORY.WEIGHTS"]
    assert paper.config.MODEL.WEIGHTS == "" and paper.config.MODEL.MAPS.MEMORY.WEIGHTS == ""
    synthetic = plan_runs(registry, "synthetic/main/mask2former", 1, store)[0]
    assert synthetic.random_weights == ["MODEL.WEIGHTS"]


# -- following -------------------------------------------------------------------------------
def test_eta_is_the_recent_median_step_time_times_the_steps_left():
    records = [{"iteration": i, "time": t} for i, t in enumerate([9.0] * 5 + [0.5] * 20)]
    assert eta_seconds(records, 100) == pytest.approx((100 - 1 - 24) * 0.5)
    assert eta_seconds(records, None) is None and eta_seconds([], 100) is None


def test_status_shows_iteration_eta_log_and_wandb(tmp_path):
    store = RunStore(tmp_path / "runs")
    run = store.run_dir("x/y", 0)
    run.mkdir(parents=True)
    store.transition(run, "running", executor="local", job_id="1", attempt=1)
    (run / "config.yaml").write_text(yaml.safe_dump({"SOLVER": {"MAX_ITER": 100}}))
    with open(run / "metrics.json", "w") as f:
        for i in range(10):
            f.write(json.dumps({"iteration": i, "time": 0.5, "panoptic_seg/PQ": 12.5}) + "\n")
    (run / "log.txt").write_text("hello\n")
    store.write_wandb(run, {"id": "abc", "offline_dir": "/w/offline-run-abc"})
    r = CliRunner().invoke(main, ["status", "x/y", "--runs-root", str(store.root), "--json"])
    row = json.loads(r.output.splitlines()[0])
    assert (row["iteration"], row["max_iter"], row["last_pq"]) == (9, 100, 12.5)
    assert row["eta_s"] == pytest.approx(90 * 0.5)
    assert row["log"] == str(run / "log.txt") and row["wandb"] == "/w/offline-run-abc"
    r = CliRunner().invoke(main, ["status", "x/y", "--runs-root", str(store.root)])
    assert "9/100" in r.output and "0m45s" in r.output


def test_logs_prints_the_attempt_asked_for(tmp_path):
    store = RunStore(tmp_path / "runs")
    launch([RunSpec("toy/a", 0, "TOY: {STEPS: 2}", "maps_toy_tasks:toy_train")], "local", store=store)
    run = store.run_dir("toy/a", 0)
    (run / "log.txt").write_text("training log line\n")
    r = CliRunner().invoke(main, ["logs", "toy/a/seed0", "--runs-root", str(store.root)])
    assert r.exit_code == 0, r.output
    assert "training log line" in r.output and "_log.out <==" in r.output
    r = CliRunner().invoke(main, ["logs", "toy/a/seed0", "--attempt", "2", "--runs-root", str(store.root)])
    assert r.exit_code == 2 and "no attempt 2 (attempts: 1)" in r.output
    r = CliRunner().invoke(main, ["logs", "toy/b/seed0", "--runs-root", str(store.root)])
    assert r.exit_code == 2 and "no such run" in r.output


def test_cancel_stops_a_local_job_and_records_it(tmp_path):
    store = RunStore(tmp_path / "runs")
    report = launch([RunSpec("toy/slow", 0, "TOY: {STEPS: 200, SLEEP: 0.1}", "maps_toy_tasks:toy_train")],
                    "local", store=store, wait=False)
    run = store.run_dir("toy/slow", 0)
    deadline = time.time() + 60
    while (store.read_status(run) or {}).get("state") != "running":
        assert time.time() < deadline, "the toy job never started"
        time.sleep(0.2)
    pid = int(store.read_status(run)["job_id"])
    r = CliRunner().invoke(main, ["cancel", "toy/slow", "--yes", "--runs-root", str(store.root)])
    assert r.exit_code == 0 and "toy/slow seed 0: cancelled" in r.output, r.output
    assert store.read_status(run)["state"] == "cancelled"
    deadline = time.time() + 30
    while True:
        try:  # gone, or a zombie waiting for this process (its parent) to reap it
            if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        except FileNotFoundError:
            break
        assert time.time() < deadline, "the cancelled job is still alive"
        time.sleep(0.2)
    r = CliRunner().invoke(main, ["cancel", "toy/slow", "--yes", "--runs-root", str(store.root)])
    assert "no queued or running run" in r.output
    del report


def test_a_batch_that_does_not_divide_over_the_processes_is_refused(tmp_path):
    from maps.launch import LaunchError

    store = RunStore(tmp_path / "runs")
    spec = RunSpec("toy/a", 0, "SOLVER: {IMS_PER_BATCH: 3}\n", "maps_toy_tasks:toy_train")
    with pytest.raises(LaunchError, match=r"IMS_PER_BATCH 3 does not divide over 2 processes"):
        launch([spec], "local", profile=ClusterProfile(tasks_per_node=2), store=store)
    assert not store.root.exists() or not any(store.root.iterdir())
