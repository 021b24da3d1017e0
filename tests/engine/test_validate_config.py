"""``maps train`` checks the whole config before it writes anything (issue 12): a bad value, a
stale checkpoint tag or an output path under a file leaves no run folder behind."""
from pathlib import Path

import pytest

from maps.engine.train import train, validate_config
from maps.errors import ConfigError
from maps.modeling.build import load_config

TINY = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "synthetic" / "tiny.yaml"


def _cfg(out, *opts):
    cfg = load_config(TINY, list(opts), freeze=False)
    cfg.OUTPUT_DIR = str(out)
    cfg.freeze()
    return cfg


@pytest.mark.parametrize("opts, message", [
    (("SOLVER.MAX_ITER", "0"), r"SOLVER\.MAX_ITER: must be >= 1, got 0"),
    (("MODEL.MAPS.LAYER_MASKING_PROB", "-0.5"), r"MODEL\.MAPS\.LAYER_MASKING_PROB"),
    (("SOLVER.MAX_ITER", "10", "SOLVER.STEPS", "(8, 4)"), r"SOLVER\.STEPS"),
    (("SOLVER.IMS_PER_BATCH", "0"), r"SOLVER\.IMS_PER_BATCH"),
    (("DATASETS.TEST", "('nowhere_val',)"), r"DATASETS\.TEST: 'nowhere_val' is not a registered dataset"),
])
def test_bad_values_are_refused_before_the_output_exists(tmp_path, opts, message):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        train(_cfg(out, *opts))
    assert not out.exists()


def test_output_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"OUTPUT_DIR .*f/run: is under .*f, which is a file"):
        validate_config(_cfg(tmp_path / "f" / "run"))


def test_resume_from_a_stale_checkpoint_tag(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last_checkpoint").write_text("model_0000009.pth")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ConfigError, match=r"last_checkpoint: names checkpoint 'model_0000009\.pth'"):
        train(_cfg(out), resume=True)
    assert sorted(p.name for p in out.iterdir()) == before
    validate_config(_cfg(out), resume=False)  # without --resume the tag is not read
    (out / "model_0000009.pth").write_bytes(b"")
    validate_config(_cfg(out), resume=True)
