"""A launch that fails leaves the run store as it was (issue 12): what it made, it removes;
what was there before, it keeps. Run directories it makes carry maps' marker."""
import hashlib
import json

import pytest

import maps.launch.launcher as launcher
from maps.io import MADE_MARKER, made_by_maps
from maps.launch import LaunchError, PrereqSpec, RunSpec, launch
from maps.launch.runstore import RunStore



def snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def toy(seed, experiment="toy/a", prerequisites=()):
    cfg = {"TOY": {"STEPS": 2}, "SOLVER": {"IMS_PER_BATCH": 8}}
    return RunSpec(experiment, seed, json.dumps(cfg), "maps_toy_tasks:toy_train", prerequisites=prerequisites)


@pytest.fixture
def store(tmp_path):
    return RunStore(tmp_path / "runs")


def _refusing_executor(*args, **kwargs):
    raise LaunchError("local submission refused (test)")


def test_failed_submission_removes_the_run_dirs_it_made(store, monkeypatch):
    monkeypatch.setattr(launcher, "make_executor", _refusing_executor)
    with pytest.raises(LaunchError, match="refused"):
        launch([toy(0), toy(1, "toy/b/c")], "local", store=store)
    assert not store.root.exists()  # not even the empty parents it created


def test_failed_submission_keeps_what_was_there(store, monkeypatch):
    launch([toy(0)], "debug", store=store)
    (store.root / "notes.txt").write_text("mine")
    before = snapshot(store.root)
    monkeypatch.setattr(launcher, "make_executor", _refusing_executor)
    with pytest.raises(LaunchError):
        launch([toy(1), toy(2, "toy/z")], "local", store=store)
    after = snapshot(store.root)
    assert after == before
    assert sorted(p.name for p in (store.root / "toy").iterdir()) == ["a"]


def test_failed_prerequisite_removes_the_folder_it_made(store, tmp_path, monkeypatch):
    out = tmp_path / "runs" / "_memory" / "m1"
    pre = PrereqSpec("maps_toy_tasks:toy_prerequisite", str(out), {}, kind="memory")
    monkeypatch.setattr(launcher, "_submit_prereq", lambda *a, **k: (_ for _ in ()).throw(LaunchError("boom")))
    with pytest.raises(LaunchError, match="boom"):
        launch([toy(0, prerequisites=(pre,))], "local", store=store)
    assert not out.exists()
    assert not store.run_dir("toy/a", 0).exists()


def test_run_dirs_made_by_a_launch_are_marked(store):
    launch([toy(0)], "debug", store=store)
    run = store.run_dir("toy/a", 0)
    assert made_by_maps(run, "run") == {"made_by": "maps", "kind": "run", "experiment": "toy/a", "seed": 0}
    assert store.read_status(run)["state"] == "done"


def test_an_existing_run_dir_is_not_marked_as_made(store):
    run = store.run_dir("toy/a", 0)
    run.mkdir(parents=True)
    launch([toy(0)], "debug", store=store)
    assert not (run / MADE_MARKER).exists()


def test_slurm_missing_is_refused_before_anything_is_made(store, monkeypatch):
    monkeypatch.setattr(launcher, "slurm_available", lambda: False)
    with pytest.raises(LaunchError, match="sbatch/squeue not found"):
        launch([toy(0)], "slurm", store=store)
    assert not store.root.exists()
