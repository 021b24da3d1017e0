"""Config files are data (issue 12): detectron2's ``merge_from_file`` allows unsafe YAML by
default, where ``!!python/object/apply:os.system`` runs a command; maps reads every config and
its ``_BASE_`` chain with ``yaml.safe_load`` and names the file of a refused tag."""
import re
from pathlib import Path

import pytest

from maps.errors import ConfigError

PACKAGE = Path(__file__).resolve().parents[2] / "maps"
TINY = PACKAGE.parent / "experiments" / "configs" / "synthetic" / "tiny.yaml"


def _tag(canary: Path) -> str:
    return f'!!python/object/apply:os.system ["touch {canary}"]'


def test_unsafe_tag_in_a_config_is_refused_not_run(tmp_path):
    from maps.modeling.build import load_config

    canary = tmp_path / "PWNED"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"_BASE_: {TINY}\nSOLVER:\n  MAX_ITER: {_tag(canary)}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml, line 3: the tag '!!python/object/apply:os\.system' is refused"):
        load_config(cfg)
    assert not canary.exists()


def test_unsafe_tag_in_a_base_names_the_base(tmp_path):
    from maps.modeling.build import load_config

    canary = tmp_path / "PWNED"
    (tmp_path / "base.yaml").write_text(f"_BASE_: {TINY}\nSEED: {_tag(canary)}\n")
    (tmp_path / "c.yaml").write_text("_BASE_: base.yaml\n")
    with pytest.raises(ConfigError, match=r"base\.yaml, line 2"):
        load_config(tmp_path / "c.yaml")
    assert not canary.exists()


def test_a_safe_chain_merges_like_detectron2(tmp_path):
    from maps.modeling.build import load_config

    (tmp_path / "base.yaml").write_text(f"_BASE_: {TINY}\nSEED: 3\nSOLVER:\n  MAX_ITER: 7\n")
    (tmp_path / "c.yaml").write_text("_BASE_: [base.yaml]\nSOLVER:\n  BASE_LR: 0.5\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.SEED, cfg.SOLVER.MAX_ITER, cfg.SOLVER.BASE_LR) == (3, 7, 0.5)
    assert cfg.SOLVER.IMS_PER_BATCH == load_config(TINY).SOLVER.IMS_PER_BATCH


@pytest.mark.parametrize("text, message", [
    ("_BASE_: https://example.invalid/x.yaml\n", "only local files are read"),
    ("_BASE_: c.yaml\n", "is a cycle of bases"),
    ("_BASE_: nowhere.yaml\n", r"_BASE_ .*nowhere\.yaml does not exist"),
    ("- a\n", "expected a mapping of config keys, got list"),
])
def test_bad_base_chains(tmp_path, text, message):
    from maps.config import load_config_yaml

    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config_yaml(tmp_path / "c.yaml")


def test_a_run_config_text_is_read_safely(tmp_path):
    from maps.config import config_from_yaml_text

    canary = tmp_path / "PWNED"
    with pytest.raises(ConfigError, match=r"runs/x/config\.yaml, line 1: the tag"):
        config_from_yaml_text(f"SEED: {_tag(canary)}\n", source="runs/x/config.yaml")
    assert not canary.exists()


def test_no_unsafe_config_loading_left_in_maps():
    """detectron2's merge_from_file / load_yaml_with_base default to an unsafe load: maps uses
    maps.config.merge_config_file instead, everywhere."""
    pattern = re.compile(r"\.merge_from_file\(|load_yaml_with_base\(|yaml\.(unsafe_load|full_load)\(|"
                         r"Loader=yaml\.(Unsafe|Full)?Loader\b")
    found = [f"{p.relative_to(PACKAGE.parent)}:{i}" for p in PACKAGE.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found
