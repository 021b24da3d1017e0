"""``maps list`` and ``maps show NAME`` through the real click group."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from maps.cli import main
from maps.errors import ConfigError
from maps.registry import resolve_show_target

from .conftest import SHIPPED


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_list_json_table8():
    result = run("list", "--registry", str(SHIPPED), "--table", "8", "--suite", "paper", "--json")
    assert result.exit_code == 0, result.output
    entries = json.loads(result.stdout)
    assert [(e["name"], e["table"], e["row"], e["runnable"]) for e in entries] == [
        ("ade20k/table8/k1", 8, "1", True), ("ade20k/table8/k5", 8, "5", True),
        ("ade20k/table8/k10", 8, "10", True)]
    assert [e["paper"] for e in entries] == [{"PQ": 39.7, "AP": 26.7, "mIoU": 46.4},
                                             {"PQ": 40.7, "AP": 27.0, "mIoU": 47.0},
                                             {"PQ": 40.5, "AP": 27.1, "mIoU": 46.9}]
    assert entries[1]["same_as"] == "ade20k/maps" and "AP" in entries[1]["reconstructed"]


def test_list_table_prints_rows_and_paper_numbers():
    result = run("list", "--registry", str(SHIPPED), "--table", "1")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    maps = next(line for line in lines if line.startswith("coco/maps "))
    for cell in ("P1", "MAPS*", "run", "52.0", "57.7", "43.4", "41.7", "62.1", "45.9"):
        assert cell in maps.split(), maps
    detr = next(line for line in lines if line.startswith("coco/detr "))
    assert "reference" in detr and "43" in detr.split()


def test_list_json_reference_row_and_check():
    result = run("list", "--registry", str(SHIPPED), "--suite", "paper", "--json", "--check")
    assert result.exit_code == 0, result.output
    entries = {e["name"]: e for e in json.loads(result.stdout)}
    assert entries["ade20k/oneformer"]["runnable"] is False
    assert entries["ade20k/oneformer"]["paper"] == {"PQ": 41.9, "AP": 27.3, "mIoU": 47.3}
    assert all(e["suite"] == "paper" for e in entries.values())


def test_show_name_prints_resolved_config():
    result = run("show", "ade20k/table5/swapped", "--registry", str(SHIPPED))
    assert result.exit_code == 0, result.output
    assert "SWAPPED: true" in result.output and "MAX_ITER: 160000" in result.output


def test_show_json_with_overrides():
    result = run("show", "synthetic/table8/k10", "--registry", str(SHIPPED), "--json",
                 "MODEL.MAPS.POOL_SIZE", "12")
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.stdout)["config"]
    assert cfg["MODEL"]["MAPS"]["NUM_RETRIEVED"] == 10 and cfg["MODEL"]["MAPS"]["POOL_SIZE"] == 12
    assert cfg["SOLVER"]["MAX_ITER"] == 1000


def test_show_unknown_name_is_one_line_exit_2():
    result = CliRunner().invoke(main, ["show", "ade20k/mapz", "--registry", str(SHIPPED)])
    assert result.exit_code == 2
    assert "no experiment named 'ade20k/mapz'" in result.output
    assert "did you mean: ade20k/maps" in result.output and "Traceback" not in result.output


def test_resolve_show_target_needs_exactly_one_source(tmp_path):
    with pytest.raises(ConfigError, match="exactly one"):
        resolve_show_target(None, None)
    with pytest.raises(ConfigError, match="exactly one"):
        resolve_show_target("ade20k/maps", "x.yaml", root=SHIPPED)
    with pytest.raises(ConfigError, match="unknown config key 'MODEL.MAPS.NOPE'"):
        resolve_show_target("ade20k/maps", None, ["MODEL.MAPS.NOPE", "1"], root=SHIPPED)
    cfg = resolve_show_target(None, SHIPPED / "configs/synthetic/maps_tiny.yaml",
                              ["MODEL.MAPS.NUM_RETRIEVED", "3"])
    assert cfg.MODEL.MAPS.ENABLED and cfg.MODEL.MAPS.NUM_RETRIEVED == 3
