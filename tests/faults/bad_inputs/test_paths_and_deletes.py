"""Output paths maps cannot write (under a regular file, a read-only folder, a full disk) end
as one line naming the path; and maps deletes only what it made: ``--fresh``, ``--overwrite``
and the demo's stale products refuse a folder without maps' marker (issue 12)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from maps.io import mark_made

from .harness import Case, check_refused, maps_env, params, run_record


def _file(ws: Path, name: str = "a_file") -> Path:
    f = ws / name
    f.write_text("a regular file, not a folder\n")
    return f


# -- output paths under a regular file -----------------------------------------------------------
def tables_out_under_a_file(ws):
    return ["tables", "--table", "2", "--suite", "synthetic", "--runs-root", str(ws / "runs"),
            "--out", str(_file(ws) / "results"), "--no-plots"]


def demo_runs_root_under_a_file(ws):
    return ["demo", "--quick", "--runs-root", str(_file(ws) / "demo")]


def demo_runs_root_is_a_file(ws):
    return ["demo", "--quick", "--runs-root", str(_file(ws))]


def synth_out_under_a_file(ws):
    return ["data", "synth", "--out", str(_file(ws) / "ds"), "--train", "1", "--val", "1", "--size", "32"]


def status_runs_root_is_a_file(ws):
    return ["status", "--runs-root", str(_file(ws))]


def sweep_runs_root_under_a_file(ws):
    return ["sweep", "synthetic_retrieval", "--best", "--runs-root", str(_file(ws) / "runs")]


def tables_out_in_proc(ws):
    return ["tables", "--table", "2", "--suite", "synthetic", "--runs-root", str(ws / "runs"),
            "--out", "/proc/version/results", "--no-plots"]


def train_output_under_a_file(ws, datasets_root):
    return ["train", "--config", str(_tiny()), "--output", str(_file(ws) / "run")]


def _tiny() -> Path:
    from .harness import REPO

    return REPO / "experiments" / "configs" / "synthetic" / "tiny.yaml"


# -- read-only folders and a full disk (a private mount: root can write anywhere else) ----------
def tables_out_read_only(ws):
    (ws / "ro").mkdir()
    return ["tables", "--table", "2", "--suite", "synthetic", "--runs-root", str(ws / "runs"),
            "--out", str(ws / "ro" / "results"), "--no-plots"]


def synth_out_read_only(ws):
    (ws / "ro").mkdir()
    return ["data", "synth", "--out", str(ws / "ro" / "ds"), "--train", "1", "--val", "1", "--size", "32"]


def status_of_a_read_only_store_with_a_stale_run(ws):
    # a queued local run whose process is gone: status records it failed, in a read-only store
    run_record(ws, status={"experiment": "synthetic/main/maps", "seed": 0, "state": "queued",
                           "attempt": 0, "executor": "local", "job_id": "999999999",
                           "submit_host": os.uname().nodename})
    return ["status", "--runs-root", str(ws / "runs")]


def synth_disk_full(ws):
    (ws / "full").mkdir()
    return ["data", "synth", "--out", str(ws / "full" / "ds"), "--train", "200", "--val", "1", "--size", "64"]


# -- maps deletes only what it made --------------------------------------------------------------
def fresh_on_a_run_store(ws):
    run_record(ws)  # weeks of GPU work, made by `maps launch`
    return ["demo", "--quick", "--fresh", "--runs-root", str(ws / "runs")]


def fresh_on_a_users_folder(ws):
    d = ws / "work"
    d.mkdir()
    (d / "model_final.pth").write_bytes(b"\0" * 64)
    return ["demo", "--quick", "--fresh", "--runs-root", str(d)]


def fresh_on_a_symlink_to_a_demo_folder(ws):
    demo = ws / "demo"
    demo.mkdir()
    mark_made(demo, "demo")
    (ws / "link").symlink_to(demo)
    return ["demo", "--quick", "--fresh", "--runs-root", str(ws / "link")]


def fresh_on_a_folder_maps_made_as_another_kind(ws):
    d = ws / "ds"
    d.mkdir()
    mark_made(d, "dataset")
    return ["demo", "--quick", "--fresh", "--runs-root", str(d)]


def overwrite_a_users_folder(ws):
    d = ws / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("\\documentclass{article}\n")
    return ["data", "synth", "--out", str(d), "--overwrite", "--train", "1", "--val", "1", "--size", "32"]


def overwrite_a_symlink(ws):
    d = ws / "mine"
    d.mkdir()
    mark_made(d, "dataset")
    (ws / "link").symlink_to(d)
    return ["data", "synth", "--out", str(ws / "link"), "--overwrite", "--train", "1", "--val", "1", "--size", "32"]


def overwrite_a_file(ws):
    return ["data", "synth", "--out", str(_file(ws, "data.bin")), "--overwrite", "--train", "1", "--val", "1"]


def demo_over_an_unmarked_stale_dataset(ws):
    # a demo folder from before maps marked its folders, with a dataset of an older format
    ds = ws / "demo" / "datasets" / "synthetic"
    ds.mkdir(parents=True)
    (ds / "maps_synthetic.json").write_text(json.dumps({"format": "maps-synthetic-panoptic", "version": 1}))
    (ds / "panoptic_train.json").write_text("{}")
    return ["demo", "--quick", "--runs-root", str(ws / "demo")]


def memory_build_over_a_users_folder(ws, datasets_root):
    d = ws / "bank"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    return ["memory", "build", "--dataset", "synthetic_val", "--out", str(d), "--arch", "ViT-Tiny-16",
            "--dense", "clip"]


def demo_stale_runs_without_fingerprint(ws, datasets_root):
    # the demo's dataset is regenerated (other sizes); its runs from before markers stay
    from maps.data.synthetic import generate_synthetic_dataset

    generate_synthetic_dataset(ws / "demo" / "datasets" / "synthetic", 2, 1, size=32, seed=0, progress=False)
    run_record(ws, "synthetic/main/maps")
    os.rename(ws / "runs" / "synthetic", ws / "demo" / "synthetic")
    return ["demo", "--quick", "--runs-root", str(ws / "demo")]


CASES = [
    Case("tables --out under a regular file", tables_out_under_a_file, "a_file/results"),
    Case("tables --out under /proc/version", tables_out_in_proc, "/proc/version/results"),
    Case("demo --runs-root under a regular file", demo_runs_root_under_a_file, "a_file/demo"),
    Case("demo --runs-root is a regular file", demo_runs_root_is_a_file, "a_file"),
    Case("status --runs-root is a regular file", status_runs_root_is_a_file, "a_file"),
    Case("sweep --runs-root under a regular file", sweep_runs_root_under_a_file, "a_file/runs"),
    Case("tables --out in a read-only folder", tables_out_read_only, "ro/results", mounts=[("ro", "ro")]),
    Case("status of a read-only store that needs an update", status_of_a_read_only_store_with_a_stale_run,
         "runs/synthetic/main/maps/seed0", mounts=[("ro", "runs")]),
    Case("demo --fresh on a run store", fresh_on_a_run_store, "runs has no maps marker"),
    Case("demo --fresh on a user's folder", fresh_on_a_users_folder, "work has no maps marker"),
    Case("demo --fresh on a symlink to a demo folder", fresh_on_a_symlink_to_a_demo_folder, "link is a symbolic link"),
    Case("demo --fresh on a dataset maps made", fresh_on_a_folder_maps_made_as_another_kind,
         "ds was made by maps as a 'dataset' folder, not a 'demo' one"),
    Case("data synth --overwrite on a file", overwrite_a_file, "data.bin"),
]
SLOW_NO_DATA = [
    Case("data synth --out under a regular file", synth_out_under_a_file, "a_file: File exists (a file, where a folder is needed)", slow=True),
    Case("data synth --out in a read-only folder", synth_out_read_only, "ro/ds", mounts=[("ro", "ro")], slow=True),
    Case("data synth on a full disk", synth_disk_full, "No space left on device",
         mounts=[("tmpfs:256k", "full")], slow=True),
    Case("data synth --overwrite on a user's folder", overwrite_a_users_folder, "mine has no maps dataset marker", slow=True),
    Case("data synth --overwrite on a symlink", overwrite_a_symlink, "link is a symbolic link", slow=True),
    Case("demo over an unmarked stale dataset", demo_over_an_unmarked_stale_dataset,
         "synthetic has no maps dataset marker", slow=True),
]
SLOW_CASES = [
    Case("train --output under a regular file", train_output_under_a_file, "a_file/run", slow=True),
    Case("memory build --out a user's folder", memory_build_over_a_users_folder, "bank has no maps bank marker",
         slow=True),
    Case("demo: stale runs without a dataset fingerprint", demo_stale_runs_without_fingerprint,
         "seed0 may be built from the previous dataset", slow=True),
]


@pytest.mark.parametrize("case", params(CASES + SLOW_NO_DATA))
def test_paths_and_deletes(case, tmp_path):
    args = case.setup(tmp_path)
    check_refused(case, args, tmp_path, maps_env())


@pytest.mark.parametrize("case", params(SLOW_CASES))
def test_paths_and_deletes_with_datasets(case, tmp_path, datasets_root):
    args = case.setup(tmp_path, datasets_root)
    check_refused(case, args, tmp_path, maps_env(datasets_root))
