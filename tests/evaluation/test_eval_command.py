"""``maps eval pq``: the table, the JSON, and one-line errors."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from maps.cli import main

from .test_pq_compute import _write_hand_fixture


@pytest.fixture
def args(tmp_path):
    p = _write_hand_fixture(tmp_path)
    return ["eval", "pq", "--gt-json", str(p["gt_json"]), "--gt-dir", str(p["gt_dir"]),
            "--pred-json", str(p["pred_json"]), "--pred-dir", str(p["pred_dir"])]


def test_table_in_percent(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    cells = [line.split("|") for line in result.output.splitlines() if "|" in line]
    rows = {head.strip(): values.split() for head, values in cells}
    assert rows[""] == ["PQ", "SQ", "RQ", "N"]
    assert rows["All"] == ["67.78", "91.67", "73.33", "2"]      # 61/90, 11/12, 11/15
    assert rows["Things"] == ["55.56", "83.33", "66.67", "1"]   # 5/9, 5/6, 2/3
    assert rows["Stuff"] == ["80.00", "100.00", "80.00", "1"]


def test_json_output(args):
    result = CliRunner().invoke(main, args + ["--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["All"]["pq"] == pytest.approx(61 / 90) and data["All"]["n"] == 2
    assert data["per_class"]["1"]["fn"] == 1 and data["per_class"]["2"]["fp"] == 1


def test_bad_input_is_one_line_and_exit_2(args, tmp_path):
    (tmp_path / "pred" / "b.png").unlink()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "b.png" in lines[0]
    assert lines[0].startswith("error: panoptic PNG not found")
