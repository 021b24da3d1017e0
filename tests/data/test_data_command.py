"""``maps data synth`` and ``maps data check`` through the real click group."""
from __future__ import annotations

import json

import os

import pytest
from click.testing import CliRunner

from maps.cli import main


@pytest.fixture
def restore_synthetic_registration():
    """``check --synthetic-root`` re-points synthetic_*; point them back for later tests."""
    yield
    from maps.data import datasets_root, register_synthetic

    register_synthetic("synthetic", os.path.join(datasets_root(), "synthetic"))


def test_synth_writes_a_dataset_and_refuses_to_clobber_it(tmp_path):
    out = tmp_path / "ds"
    runner = CliRunner()
    res = runner.invoke(main, ["data", "synth", "--out", str(out), "--train", "3", "--val", "2",
                               "--size", "48", "--seed", "4"])
    assert res.exit_code == 0, res.output
    assert f"wrote 3 train + 2 val images to {out}" in res.output
    assert len(json.loads((out / "panoptic_train.json").read_text())["annotations"]) == 3
    assert json.loads((out / "maps_synthetic.json").read_text())["seed"] == 4

    res = runner.invoke(main, ["data", "synth", "--out", str(out), "--train", "3"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1] == f"error: {out}: already exists; pass --overwrite to replace it"


def test_check_reads_every_file_and_reports_a_broken_one(synthetic_root, dataset_copy,
                                                         restore_synthetic_registration):
    runner = CliRunner()
    res = runner.invoke(main, ["data", "check", "synthetic_train", "synthetic_val",
                               "--synthetic-root", str(synthetic_root)])
    assert res.exit_code == 0, res.output
    assert "synthetic_train: ok, 8 images, 8 read" in res.output
    assert "synthetic_val: ok, 4 images, 4 read" in res.output

    jpg = dataset_copy / "val" / "000010000002.jpg"
    jpg.write_bytes(jpg.read_bytes()[:100])
    res = runner.invoke(main, ["data", "check", "synthetic_val", "--synthetic-root", str(dataset_copy)])
    assert res.exit_code == 2
    assert "000010000002.jpg: unreadable or truncated image" in res.output


def test_check_unknown_name():
    res = CliRunner().invoke(main, ["data", "check", "no_such_dataset"])
    assert res.exit_code == 2 and "no_such_dataset: no such registered dataset" in res.output
