"""Exact resumption: a run stopped after a checkpoint and resumed ends where an uninterrupted
run ends, bit for bit (weights, per-iteration losses, final metrics).

The stop is an exception raised by a hook right after the checkpoint of iteration 6 (the
checkpointer hook runs first), which is what a preempted job leaves behind: the checkpoint
and a metrics.json that may hold iterations past it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
MAX_ITER, PERIOD, STOP_AFTER = 9, 3, 6


class _Interrupted(RuntimeError):
    pass


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from maps.data import generate_synthetic_dataset, register_synthetic

    root = tmp_path_factory.mktemp("resume") / "synthetic"
    generate_synthetic_dataset(root, num_train=8, num_val=2, size=64, seed=5, progress=False)
    register_synthetic("resume_test", str(root))
    return "resume_test"


def _cfg(dataset: str, out: Path):
    from maps.modeling.build import load_config

    cfg = load_config(REPO / "experiments/configs/synthetic/tiny.yaml", [
        "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.STEPS", "(4, 7)",
        "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", str(PERIOD),
        "TEST.EVAL_PERIOD", "0", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
        "INPUT.IMAGE_SIZE", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "128",
        "DATASETS.TRAIN", f"('{dataset}_train',)", "DATASETS.TEST", f"('{dataset}_val',)",
        "SEED", "3", "OUTPUT_DIR", str(out)], freeze=False)
    cfg.freeze()
    return cfg


def _losses(run_dir: Path) -> dict:
    """Iteration -> logged total loss (a re-logged iteration keeps its last value)."""
    out = {}
    for line in (run_dir / "metrics.json").read_text().splitlines():
        rec = json.loads(line)
        if "total_loss" in rec:
            out[rec["iteration"]] = rec["total_loss"]
    return out


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "model_final.pth", map_location="cpu", weights_only=True)["model"]


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def test_interrupted_and_resumed_run_ends_with_identical_weights(dataset, tmp_path, monkeypatch):
    from detectron2.engine import HookBase

    from maps.engine.determinism import reseed_all
    from maps.engine.train import train
    from maps.engine.trainer import MAPSTrainer

    reseed_all(1234)  # a different global RNG state before each run must not matter
    straight = train(_cfg(dataset, tmp_path / "straight"))

    class StopAfter(HookBase):
        def after_step(self):
            if self.trainer.iter == STOP_AFTER - 1:
                raise _Interrupted(f"stopped after iteration {self.trainer.iter}")

    plain_hooks = MAPSTrainer.build_hooks
    monkeypatch.setattr(MAPSTrainer, "build_hooks",
                        lambda self: plain_hooks(self) + [StopAfter()])
    reseed_all(99)
    with pytest.raises(_Interrupted):
        train(_cfg(dataset, tmp_path / "resumed"))
    monkeypatch.setattr(MAPSTrainer, "build_hooks", plain_hooks)
    run = tmp_path / "resumed"
    assert (run / f"model_{STOP_AFTER - 1:07d}.pth").is_file()
    assert not (run / "model_final.pth").exists()
    assert (run / "last_checkpoint").read_text().strip() == f"model_{STOP_AFTER - 1:07d}.pth"

    resumed = train(_cfg(dataset, run), resume=True)

    a, b = _weights(tmp_path / "straight"), _weights(run)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ after the resume, e.g. {differ[:3]}"
    # metrics.json holds losses smoothed over detectron2's 20-iteration window, whose history
    # restarts with the resumed process: those are not comparable; the iterations are
    la, lb = _losses(tmp_path / "straight"), _losses(run)
    assert MAX_ITER - 1 in la and set(la) <= set(lb)
    assert straight.keys() == resumed.keys()
    assert all(_same(straight[k], resumed[k]) for k in straight), (straight, resumed)
    assert resumed["iteration"] == MAX_ITER


def test_same_seed_gives_same_initial_weights(dataset, tmp_path):
    """Two runs of one seed must start from the same weights, whatever ran before them."""
    from maps.engine.trainer import MAPSTrainer

    torch.manual_seed(1)
    first = MAPSTrainer(_cfg(dataset, tmp_path / "one")).model.state_dict()
    torch.manual_seed(2)
    second = MAPSTrainer(_cfg(dataset, tmp_path / "two")).model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_train_loader_has_its_own_generator(dataset, tmp_path):
    """The DataLoader must not draw from the global torch RNG that the reseed hook controls."""
    import torch.utils.data as torchdata

    from maps.engine.trainer import MAPSTrainer

    loader = MAPSTrainer.build_train_loader(_cfg(dataset, tmp_path / "loader"))
    inner = loader if isinstance(loader, torchdata.DataLoader) else loader.dataset
    assert isinstance(inner, torchdata.DataLoader)
    assert inner.generator is not None


def test_last_checkpoint_tag_is_replaced_atomically(tmp_path, monkeypatch):
    """A kill while the tag is written must leave the old tag or the new one, never an empty
    file (fvcore truncates, then writes: --resume then failed on "Checkpoint <dir>/ not found")."""
    import os

    from maps.engine.checkpoint import RunCheckpointer

    ck = RunCheckpointer(torch.nn.Linear(2, 2), str(tmp_path), save_to_disk=True)
    ck.tag_last_checkpoint("model_0000002.pth")
    replaced = []
    real_replace = os.replace

    def killed_at_rename(src, dst):  # the moment before the new tag takes the old one's place
        replaced.append((Path(src).read_text(), (tmp_path / "last_checkpoint").read_text()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_rename)
    ck.tag_last_checkpoint("model_0000005.pth")
    assert replaced == [("model_0000005.pth", "model_0000002.pth")]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000005.pth"
    assert ck.get_checkpoint_file() == str(tmp_path / "model_0000005.pth")
