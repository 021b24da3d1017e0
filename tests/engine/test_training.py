"""Training the tiny CPU configuration through MAPSTrainer (maps.engine.train.train).

The default test runs one short training on a 64 px synthetic dataset and checks what a run
leaves behind: a falling loss, checkpoints at SOLVER.CHECKPOINT_PERIOD, and the evaluation
hook's metrics in final.json. The slow test overfits a handful of 128 px images and compares
PQ against the untrained model's on the same images.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import pytest
import torch
from detectron2.utils.events import EventWriter, get_event_storage

TINY = "experiments/configs/synthetic/tiny.yaml"
OVERFIT_ITERS = 300  # the smallest of 200 / 300 that overfits robustly (see the slow test)


def make_dataset(root: Path, prefix: str, num_train: int, num_val: int, size: int) -> None:
    from maps.data import generate_synthetic_dataset, register_synthetic

    generate_synthetic_dataset(root, num_train, num_val, size=size, seed=0, progress=False)
    register_synthetic(prefix, str(root))


def tiny_cfg(out: Path, train: str, test: str, size: int, max_iter: int, *opts, seed: int = 0):
    """The tiny config at ``size`` px without scale jitter (a smaller, steadier problem)."""
    from maps.modeling.build import load_config

    return load_config(TINY, [
        "OUTPUT_DIR", str(out), "SEED", str(seed),
        "DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{test}',)",
        "SOLVER.MAX_ITER", str(max_iter), "SOLVER.STEPS", "()",
        "INPUT.IMAGE_SIZE", str(size), "INPUT.MIN_SIZE_TEST", str(size),
        "INPUT.MAX_SIZE_TEST", str(size), "INPUT.MIN_SCALE", "1.0", "INPUT.MAX_SCALE", "1.0",
        *map(str, opts)])


class LossRecorder(EventWriter):
    """Keeps every iteration's total loss (detectron2 writes metrics.json only every 20
    iterations) and the final metrics the run hands to its writers."""

    def __init__(self):
        self.losses: List[float] = []
        self.final: Optional[dict] = None

    def write(self) -> None:
        self.losses = [v for v, _ in get_event_storage().history("total_loss").values()]

    def log_final(self, final: dict) -> None:
        self.final = dict(final)


def read_metrics(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> str:
    make_dataset(tmp_path_factory.mktemp("synth") / "synthetic", "tt", 4, 2, 64)
    return "tt"


def test_training_run_loss_checkpoints_and_final_metrics(small_dataset, tmp_path, monkeypatch):
    from maps.engine.train import FINAL_METRICS, train
    from maps.engine.trainer import MAPSTrainer
    from maps.modeling.build import build_model, count_parameters

    evaluations = []
    real_test = MAPSTrainer.test.__func__

    def spy_test(cls, cfg, model, evaluators=None):
        results = real_test(cls, cfg, model, evaluators)
        evaluations.append(results)
        return results

    monkeypatch.setattr(MAPSTrainer, "test", classmethod(spy_test))
    out = tmp_path / "run"
    cfg = tiny_cfg(out, "tt_train", "tt_val", 64, 25,
                   "SOLVER.CHECKPOINT_PERIOD", 10, "TEST.EVAL_PERIOD", 25)
    recorder = LossRecorder()
    final = train(cfg, writers=[recorder])

    # the loss falls: mean of the last 5 of 25 iterations well below the first 5
    losses = recorder.losses
    assert len(losses) == 25
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, losses

    # checkpoints every CHECKPOINT_PERIOD iterations (detectron2 numbers them by the
    # 0-based iteration just finished) and the final one, which last_checkpoint names
    names = sorted(p.name for p in out.glob("model_*.pth"))
    assert names == ["model_0000009.pth", "model_0000019.pth", "model_final.pth"]
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    ckpt = torch.load(out / "model_0000009.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 9
    assert {"model", "trainer"} <= set(ckpt)  # trainer: optimizer, scheduler, hooks

    # the evaluation hook ran once, at the end, and its numbers are the run's final metrics
    assert len(evaluations) == 1
    pq = evaluations[0]["panoptic_seg"]["PQ"]
    on_disk = json.loads((out / "final.json").read_text())
    assert on_disk == final == recorder.final
    assert set(FINAL_METRICS) | {"iteration", "params"} <= set(final)
    assert final["PQ"] == pytest.approx(pq)
    assert final["iteration"] == 25
    assert final["params"] == round(count_parameters(build_model(cfg))["total"] / 1e6, 3)
    # and they reached metrics.json through the hook's event storage
    records = read_metrics(out / "metrics.json")
    assert any(r.get("panoptic_seg/PQ") == pytest.approx(pq) for r in records)
    assert max(r["iteration"] for r in records if "total_loss" in r) == 24
    assert (out / "config.yaml").is_file() and not (out / "memory.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_config_overfits_a_handful_of_images(tmp_path, seed):
    """300 iterations on 6 images of 128 px, evaluated on those same images: PQ far above
    the untrained model's. Measured by hand (same setup): untrained 0.0; after 200 iterations
    32.3 / 19.9 / 38.1 for seeds 0 / 1 / 2 (not robust), after 300 iterations 40.1 / 47.1 /
    57.7. About 300 x 0.2 s per seed on an idle core."""
    from maps.engine.train import train
    from maps.engine.trainer import MAPSTrainer
    from maps.evaluation import flatten_results
    from maps.modeling.build import build_model

    make_dataset(tmp_path / "synthetic", "ovf", 6, 1, 128)
    cfg = tiny_cfg(tmp_path / "run", "ovf_train", "ovf_train", 128, OVERFIT_ITERS,
                   "TEST.EVAL_PERIOD", OVERFIT_ITERS, "SOLVER.CHECKPOINT_PERIOD", 10000, seed=seed)
    torch.manual_seed(seed)
    untrained = flatten_results(MAPSTrainer.test(cfg, build_model(cfg).eval()))["PQ"]
    recorder = LossRecorder()
    trained = train(cfg, writers=[recorder])["PQ"]
    assert len(recorder.losses) == OVERFIT_ITERS
    assert sum(recorder.losses[-20:]) < 0.6 * sum(recorder.losses[:20])
    assert trained > untrained + 20.0, (trained, untrained)
