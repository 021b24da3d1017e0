"""``maps show --config FILE [--params] [--json] [KEY VALUE ...]``."""
from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from maps.cli import main
from maps.modeling import build_model, count_parameters, load_config

TINY = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "synthetic" / "tiny.yaml"


def _run(*args):
    return CliRunner().invoke(main, ["show", *args])


def test_show_prints_resolved_yaml_with_overrides():
    r = _run("--config", str(TINY), "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "7")
    assert r.exit_code == 0, r.output
    assert "NUM_OBJECT_QUERIES: 7" in r.output
    assert "META_ARCHITECTURE: MAPS" in r.output


def test_show_params_json_counts_the_built_model():
    r = _run("--config", str(TINY), "--params", "--json", "MODEL.MAPS.ENABLED", "True")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.output[r.output.index("{"):])
    assert payload["config"]["MODEL"]["MAPS"]["ENABLED"] is True
    counts = payload["parameters"]
    cfg = load_config(TINY, ["MODEL.MAPS.ENABLED", "True"])
    assert counts == count_parameters(build_model(cfg))
    assert 0 < counts["memory"] < counts["transformer_decoder"] < counts["total"]


def test_show_params_text_reports_total_and_memory_share():
    r = _run("--config", str(TINY), "--params")
    assert r.exit_code == 0, r.output
    total = count_parameters(build_model(load_config(TINY)))["total"]
    assert f"total {total:>12,}".replace("total", "") in r.output
    assert "memory" in r.output and "# parameters" in r.output


def test_show_errors_are_one_line_exit_2(tmp_path):
    for args, needle in (
        (("--config", str(tmp_path / "missing.yaml")), "missing.yaml does not exist"),
        (("--config", str(TINY), "MODEL.NOPE", "1"), "MODEL.NOPE"),
        ((), "exactly one"),
    ):
        r = _run(*args)
        assert r.exit_code == 2, r.output
        assert needle in r.output and "Traceback" not in r.output
        assert r.output.strip().count("\n") == 0
