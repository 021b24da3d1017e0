"""`maps train`: detectron2-style overrides, errors before any work, and --resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from maps.cli import main

TINY = "experiments/configs/synthetic/tiny.yaml"


@pytest.fixture(scope="module")
def cli_dataset(tmp_path_factory) -> str:
    from maps.data import generate_synthetic_dataset, register_synthetic

    root = tmp_path_factory.mktemp("synth") / "synthetic"
    generate_synthetic_dataset(root, 2, 1, size=64, seed=1, progress=False)
    register_synthetic("tcli", str(root))
    return "tcli"


def _train(out: Path, *opts: str, resume: bool = False):
    args = ["train", "--config", TINY, "--output", str(out), *(["--resume"] if resume else []),
            "DATASETS.TRAIN", "('tcli_train',)", "DATASETS.TEST", "('tcli_val',)",
            "INPUT.IMAGE_SIZE", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
            "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0", "TEST.EVAL_PERIOD", "0", *opts]
    return CliRunner().invoke(main, args)


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("opts, named", [
    (["SOLVER.NOT_A_KEY", "3"], "SOLVER.NOT_A_KEY"),
    (["MODEL.MAPS.NUM_RETRIEVD", "5"], "MODEL.MAPS.NUM_RETRIEVD"),
    (["SOLVER.MAX_ITER", "many"], "SOLVER.MAX_ITER"),
    (["SOLVER.MAX_ITER"], "KEY VALUE"),
])
def test_bad_override_fails_before_any_work(tmp_path, opts, named):
    out = tmp_path / "run"
    args = ["train", "--config", TINY, "--output", str(out), *opts]
    line = _one_line_error(CliRunner().invoke(main, args))
    assert named in line
    assert not out.exists()


def test_missing_config_file_is_named(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "nope.yaml"),
                                       "--output", str(out)])
    assert "nope.yaml" in _one_line_error(result)
    assert not out.exists()


def _iterations(out: Path):
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    return [r["iteration"] for r in records if "total_loss" in r]


def test_resume_continues_from_the_last_checkpoint(cli_dataset, tmp_path):
    out = tmp_path / "run"
    first = _train(out, "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "3")
    assert first.exit_code == 0, first.output
    assert json.loads((out / "final.json").read_text())["iteration"] == 6
    assert _iterations(out) == [5]
    step2 = torch.load(out / "model_0000002.pth", map_location="cpu", weights_only=False)

    # a longer schedule, resumed: training continues at iteration 6, not from scratch
    second = _train(out, "SOLVER.MAX_ITER", "10", "SOLVER.CHECKPOINT_PERIOD", "3", resume=True)
    assert second.exit_code == 0, second.output
    assert _iterations(out) == [5, 9]
    log = (out / "log.txt").read_text()
    assert "Starting training from iteration 0" in log
    assert "Starting training from iteration 6" in log
    assert log.count("Starting training from iteration") == 2
    # checkpoints of the resumed part only; the early one is untouched
    assert torch.load(out / "model_0000008.pth", map_location="cpu",
                      weights_only=False)["iteration"] == 8
    again = torch.load(out / "model_0000002.pth", map_location="cpu", weights_only=False)
    assert again["iteration"] == step2["iteration"] == 2
    final = json.loads(second.output[second.output.rindex("{\n"):])
    assert final["iteration"] == 10 == json.loads((out / "final.json").read_text())["iteration"]


def test_resume_of_a_finished_run_does_not_train_again(cli_dataset, tmp_path):
    out = tmp_path / "run"
    assert _train(out, "SOLVER.MAX_ITER", "2").exit_code == 0
    (out / "final.json").unlink()
    again = _train(out, "SOLVER.MAX_ITER", "2", resume=True)
    assert again.exit_code == 0, again.output
    assert _iterations(out) == [1]  # nothing appended: evaluation only
    assert json.loads((out / "final.json").read_text())["iteration"] == 2
