"""The memory of a launch: its location, its build (prepare_memory) and its wiring into runs."""
import os
from pathlib import Path

import pytest

from maps.errors import ConfigError
from maps.launch.memory_jobs import BUILD_TASK, memory_prereq
from maps.memory.prepare import (DEFAULT_K, apply_memory, memory_dir,
                                 normalize_spec, prepare_memory)

SPEC = {"dataset": "synthetic_train", "key_encoder": "clip", "key_arch": "ViT-Tiny-16",
        "dense": "tiledclip", "weights": "", "seed": 0,
        "query_datasets": ["synthetic_train", "synthetic_val"]}


def test_memory_dir_is_a_function_of_the_spec(tmp_path):
    d = memory_dir(SPEC, tmp_path, data_root="/data")
    assert d.parent == tmp_path / "_memory"
    assert d.name.startswith("synthetic_train-clip-ViT-Tiny-16-tiledclip-")
    # spelling does not matter: defaults, None, order of query datasets
    same = dict(SPEC, weights=None, query_datasets=["synthetic_val", "synthetic_train"], k=DEFAULT_K)
    assert memory_dir(same, tmp_path, data_root="/data") == d
    for change in ({"seed": 1}, {"dense": "maskclip"}, {"query_datasets": ["synthetic_val"]},
                   {"weights": "/w.pt"}):
        assert memory_dir(dict(SPEC, **change), tmp_path, data_root="/data") != d, change
    assert memory_dir(SPEC, tmp_path, data_root="/other") != d


def test_bad_specs_name_the_key():
    with pytest.raises(ConfigError, match="'dataset'"):
        normalize_spec(dict(SPEC, dataset=None))
    with pytest.raises(ConfigError, match=r"unknown keys \['colour'\]"):
        normalize_spec(dict(SPEC, colour="red"))
    with pytest.raises(ConfigError, match="k must be >= 1"):
        normalize_spec(dict(SPEC, k=0))


def test_prereq_and_apply_memory(tmp_path):
    from maps.config import get_maps_cfg

    pre = memory_prereq(SPEC, tmp_path / "runs", data_root=str(tmp_path / "data"))
    assert pre.task == BUILD_TASK
    assert pre.kwargs["data_root"] == str(tmp_path / "data") and pre.kwargs["k"] == DEFAULT_K
    cfg = get_maps_cfg()
    cfg.freeze()
    apply_memory(cfg, pre.output_dir)
    assert cfg.is_frozen()
    assert cfg.MODEL.MAPS.MEMORY.BANK == str(Path(pre.output_dir) / "bank")
    assert cfg.MODEL.MAPS.MEMORY.NEIGHBORS == str(Path(pre.output_dir) / "neighbors")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from maps.data import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("memdata")
    generate_synthetic_dataset(root / "synthetic", num_train=6, num_val=3, size=64, seed=2,
                               progress=False)
    return root


def test_prepare_memory_builds_once_and_excludes_own_image(tmp_path, data_root, monkeypatch):
    from maps.data import register_all
    from maps.memory.retrieval import NeighborCache

    before = os.environ.get("DETECTRON2_DATASETS", "datasets")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "elsewhere"))
    pre = memory_prereq(SPEC, tmp_path / "runs", data_root=str(data_root))
    try:
        first = prepare_memory(pre.output_dir, **pre.kwargs, progress=False)
        assert first["built_bank"] and first["computed"] == ["synthetic_train", "synthetic_val"]
        out = Path(pre.output_dir)
        train = NeighborCache(out / "neighbors" / "synthetic_train.jsonl")
        val = NeighborCache(out / "neighbors" / "synthetic_val.jsonl")
        assert len(train) == 6 and len(val) == 3
        for image_id, (ids, _) in train.items():  # k=20 > bank: every other image, never itself
            assert image_id not in ids and len(ids) == 5
        assert all(len(ids) == 6 for _, (ids, _) in val.items())
        stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

        again = prepare_memory(pre.output_dir, **pre.kwargs, progress=False)
        assert not again["built_bank"] and again["computed"] == []
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamp

        (out / "neighbors" / "synthetic_val.jsonl").unlink()  # a half-finished build resumes
        third = prepare_memory(pre.output_dir, **pre.kwargs, progress=False)
        assert not third["built_bank"] and third["computed"] == ["synthetic_val"]
    finally:
        register_all(before)  # the worker-style registration pointed the catalog at data_root


def test_launch_command_wires_memory_and_evaluation_runs(tmp_path, monkeypatch):
    from maps.engine.evaluate import EVAL_TASK
    from maps.launch import RunStore, plan_runs
    from maps.registry import load_registry

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "data"))
    specs = plan_runs(load_registry(), "synthetic/table7,synthetic/main/mask2former", 1,
                      RunStore(tmp_path / "runs"))
    by = {s.experiment: s for s in specs}
    assert set(by) == {"synthetic/main/mask2former", "synthetic/main/maps", "synthetic/table7/no-memory",
                       "synthetic/table7/scene-only", "synthetic/table7/object-only"}
    assert not by["synthetic/main/mask2former"].prerequisites
    memory = {s.experiment: s.prerequisites for s in specs if s.prerequisites}
    assert len(memory) == 4 and len({p[0].output_dir for p in memory.values()}) == 1
    pre = memory["synthetic/main/maps"][0]
    assert pre.task == BUILD_TASK and pre.kwargs["dataset"] == "synthetic_train"
    assert pre.kwargs["data_root"] == str(tmp_path / "data")
    assert Path(pre.output_dir).parent == (tmp_path / "runs" / "_memory").resolve()
    train = by["synthetic/main/maps"]
    assert train.task == "maps.engine.train:run_training" and not train.after
    assert train.config.MODEL.MAPS.MEMORY.BANK == os.path.join(pre.output_dir, "bank")
    assert train.config.MODEL.MAPS.MEMORY.NEIGHBORS == os.path.join(pre.output_dir, "neighbors")
    ev = by["synthetic/table7/no-memory"]
    assert ev.task == EVAL_TASK and list(ev.after) == [("synthetic/main/maps", 0)]
    assert ev.config.MODEL.WEIGHTS == str(
        (tmp_path / "runs" / "synthetic/main/maps/seed0/model_final.pth").resolve())
    assert ev.config.MODEL.MAPS.TEST.SCENE_MEMORY is False
    assert ev.config.MODEL.MAPS.MEMORY.BANK == train.config.MODEL.MAPS.MEMORY.BANK


def test_launch_dry_run_lists_one_memory_build(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from maps.cli import main

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "data"))
    result = CliRunner().invoke(main, ["launch", "synthetic/table7", "--seeds", "1", "--dry-run",
                                       "--executor", "local", "--runs-root", str(tmp_path / "runs")],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    assert result.output.count("prerequisite maps.launch.memory_jobs:build_memory") == 1
    assert "would-build" in result.output
    assert "4 of 4 runs would be submitted" in result.output
