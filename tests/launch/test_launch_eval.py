"""A whole table through `launch`: memory build, training, evaluation-only run (real tasks).

synthetic/table7/no-memory evaluates synthetic/main/maps's trained model with both memories
off at inference; one launch builds the memory, trains, then evaluates (debug executor).
"""
import hashlib
import json
import os

import pytest
import torch

from maps.errors import ConfigError


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    from maps.data import generate_synthetic_dataset, register_all

    before = os.environ.get("DETECTRON2_DATASETS", "datasets")
    generate_synthetic_dataset(tmp_path / "data" / "synthetic", num_train=6, num_val=2, size=64,
                               seed=4, progress=False)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "data"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    register_all(str(tmp_path / "data"))
    yield tmp_path / "data"
    register_all(before)


def _shrink(spec):
    cfg = spec.config
    cfg.merge_from_list(["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "SOLVER.WARMUP_ITERS", "1",
                         "SOLVER.CHECKPOINT_PERIOD", "100", "TEST.EVAL_PERIOD", "0",
                         "INPUT.IMAGE_SIZE", "64", "INPUT.MIN_SIZE_TEST", "64",
                         "INPUT.MAX_SIZE_TEST", "64", "MODEL.MAPS.NUM_RETRIEVED", "2"])
    return spec


def test_one_launch_builds_memory_trains_then_evaluates(tiny_data, tmp_path, monkeypatch):
    from maps.engine.evaluate import MODEL_RECORD
    from maps.launch import RunStore, launch, plan_runs
    from maps.registry import load_registry

    monkeypatch.setenv("WANDB_MODE", "offline")
    store = RunStore(tmp_path / "runs")
    specs = [_shrink(s) for s in plan_runs(load_registry(), "synthetic/table7/no-memory", 1, store)]
    report = launch(specs, "debug", store=store)
    assert [p["action"] for p in report.prerequisites] == ["built"]
    assert [(o.experiment, o.action) for o in report.outcomes] == [
        ("synthetic/main/maps", "submitted"), ("synthetic/table7/no-memory", "submitted")]
    train_dir = store.run_dir("synthetic/main/maps", 0)
    eval_dir = store.run_dir("synthetic/table7/no-memory", 0)
    for d in (train_dir, eval_dir):
        assert store.read_status(d)["state"] == "done", store.read_status(d)
    final = store.read_final(eval_dir)
    assert {"PQ", "PQ_th", "PQ_st", "AP", "mIoU", "params"} <= set(final)
    assert final["iteration"] == 2
    assert final["params"] == store.read_final(train_dir)["params"]
    record = json.loads((eval_dir / MODEL_RECORD).read_text())
    weights = train_dir / "model_final.pth"
    assert record["weights"] == str(weights.resolve())
    assert record["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert not list(eval_dir.glob("model_*.pth"))  # an evaluation trains nothing
    assert "SCENE_MEMORY: false" in (eval_dir / "config.yaml").read_text()
    assert json.loads((eval_dir / "memory.json").read_text())["bank"] == \
        json.loads((train_dir / "memory.json").read_text())["bank"]
    # every kind of run is a W&B run (Table 7 from --source wandb needs the evaluation ones)
    ids = {json.loads((d / "wandb.json").read_text())["id"] for d in (train_dir, eval_dir)}
    assert len(ids) == 2 and list(eval_dir.glob("wandb/offline-run-*"))

    again = launch(specs, "debug", store=store)  # idempotent: nothing built or run again
    assert [o.action for o in again.outcomes] == ["skipped", "skipped"]
    assert [p["action"] for p in again.prerequisites] == []


class Payload:
    """Something a plain weights file does not hold (a pickled object of this module)."""


def test_evaluation_refuses_missing_and_unsafe_checkpoints(tmp_path):
    from maps.config import get_maps_cfg
    from maps.engine.checkpoint import SafeCheckpointer
    from maps.engine.evaluate import evaluate

    cfg = get_maps_cfg()
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    cfg.MODEL.WEIGHTS = str(tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match="MODEL.WEIGHTS .*missing.pth.*missing"):
        evaluate(cfg)

    bad = tmp_path / "bad.pth"
    torch.save({"model": {}, "extra": Payload()}, bad)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match=r"MODEL.WEIGHTS .*bad.pth: not a plain weights file"):
        SafeCheckpointer(model).load(str(bad), checkpointables=[])
    good = tmp_path / "good.pth"
    torch.save({"model": {k: torch.ones_like(v) for k, v in model.state_dict().items()},
                "iteration": 4}, good)
    assert SafeCheckpointer(model).load(str(good), checkpointables=[])["iteration"] == 4
    assert torch.equal(model.weight, torch.ones(2, 2))
