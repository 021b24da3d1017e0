"""A broken registry is refused with one ConfigError naming the file, the entry and the key."""
from __future__ import annotations

import pytest

from maps.errors import ConfigError
from maps.registry import load_registry

from .conftest import TRAIN, VALID_TABLE


def _entry(body: str, defaults: str = "") -> str:
    """A one-entry table file (memory on by default) with ``body`` as the entry's extra lines."""
    return f"""\
table: 5
suite: paper
columns: [PQ, AP, mIoU]
defaults:
  base: maps.yaml
  iterations: 50
  datasets: {{train: [{TRAIN}], test: [regtest_val]}}
  memory_dataset: regtest_memory
{defaults}entries:
  - name: tmp/bad
    row: Bad
{body}"""


def test_valid_tmp_registry_loads(make_registry):
    reg = load_registry(make_registry({"t.yaml": VALID_TABLE}))
    assert [e.name for e in reg] == ["tmp/mask2former", "tmp/maps", "tmp/none", "tmp/scene-only",
                                     "tmp/other-method", "tmp/k1", "tmp/k5", "tmp/k10"]


# (entry lines, expected fragments of the message besides the file and the entry name)
CASES = {
    "unknown entry key": ("    bogus: 1\n", ["unknown key 'bogus'"]),
    "misspelled entry key": ("    overide: {}\n", ["unknown key 'overide'", "did you mean 'overrides'"]),
    "unknown detectron2 key": ("    overrides: {MODEL.MAPS.NUM_RETRIEVE: 3}\n",
                               ["unknown config key 'MODEL.MAPS.NUM_RETRIEVE'",
                                "did you mean 'MODEL.MAPS.NUM_RETRIEVED'"]),
    "unknown detectron2 group": ("    overrides: {MODEL.MAPZ.ENABLED: true}\n",
                                 ["unknown config key 'MODEL.MAPZ.ENABLED'"]),
    "wrong value type": ("    overrides: {MODEL.MAPS.NUM_RETRIEVED: five}\n",
                         ["key 'MODEL.MAPS.NUM_RETRIEVED'", "bad value 'five'"]),
    "probability above 1": ("    overrides: {MODEL.MAPS.INPUT_MASKING_PROB: 1.5}\n",
                            ["key 'MODEL.MAPS.INPUT_MASKING_PROB'", "1.5 is not a probability"]),
    "negative probability": ("    overrides: {MODEL.MAPS.LAYER_MASKING_PROB: -0.1}\n",
                             ["key 'MODEL.MAPS.LAYER_MASKING_PROB'", "not a probability"]),
    "k below 1": ("    overrides: {MODEL.MAPS.NUM_RETRIEVED: 0}\n",
                  ["key 'MODEL.MAPS.NUM_RETRIEVED'", "k must be >= 1, got 0"]),
    "pool smaller than k": ("    overrides: {MODEL.MAPS.RANDOM_SAMPLING: true, MODEL.MAPS.POOL_SIZE: 3}\n",
                            ["key 'MODEL.MAPS.POOL_SIZE'", "pool 3 < k 5"]),
    "layer index 9": ("    overrides: {MODEL.MAPS.OBJECT_LAYERS: [3, 9]}\n",
                      ["key 'MODEL.MAPS.OBJECT_LAYERS'", "layer index 9 outside 0..8"]),
    "negative layer index": ("    overrides: {MODEL.MAPS.EXTRA_SELF_ATTN_LAYERS: [-1]}\n",
                             ["key 'MODEL.MAPS.EXTRA_SELF_ATTN_LAYERS'", "outside 0..8"]),
    "repeated layer": ("    overrides: {MODEL.MAPS.SCENE_LAYERS: [0, 0]}\n",
                       ["key 'MODEL.MAPS.SCENE_LAYERS'", "repeated layer index"]),
    "unknown key encoder": ("    overrides: {MODEL.MAPS.MEMORY.KEY_ENCODER: siglip}\n",
                            ["key 'MODEL.MAPS.MEMORY.KEY_ENCODER'", "'siglip' is not one of clip, dino"]),
    "missing base config": ("    base: nowhere.yaml\n", ["key 'base'", "base config not found",
                                                        "nowhere.yaml"]),
    "unregistered dataset": ("    datasets: {train: [no_such_dataset]}\n",
                             ["key 'datasets.train'", "'no_such_dataset' is not registered"]),
    "unregistered memory dataset": ("    memory_dataset: no_such_memory\n",
                                    ["key 'memory_dataset'", "'no_such_memory' is not registered"]),
    "memory on without memory dataset": ("    memory_dataset: null\n",
                                         ["missing key 'memory_dataset'"]),
    "same_as pointing nowhere": ("    same_as: tmp/nowhere\n",
                                 ["key 'same_as'", "no experiment named 'tmp/nowhere'"]),
    "same_as itself": ("    same_as: tmp/bad\n", ["cycle", "tmp/bad -> tmp/bad"]),
    "eval_of pointing nowhere": ("    eval_of: tmp/nowhere\n", ["key 'eval_of'", "tmp/nowhere"]),
    "MAX_ITER override": ("    overrides: {SOLVER.MAX_ITER: 10}\n",
                          ["key 'SOLVER.MAX_ITER'", "set 'iterations'"]),
    "iterations zero": ("    iterations: 0\n", ["key 'iterations'", "integer >= 1, got 0"]),
    "seeds zero": ("    seeds: 0\n", ["key 'seeds'", "count >= 1"]),
    "repeated seeds": ("    seeds: [1, 1]\n", ["key 'seeds'", "distinct"]),
    "metric not a column": ("    paper: {PQ_th: 40.3}\n", ["key 'paper'", "'PQ_th' is not a column"]),
    "unknown metric": ("    paper: {accuracy: 1.0}\n", ["key 'paper'", "unknown metric 'accuracy'"]),
    "metric not a number": ("    paper: {PQ: '-'}\n", ["key 'paper.PQ'", "expected a number"]),
    "reconstructed nothing": ("    paper: {PQ: 1.0}\n    reconstructed: {AP: lost}\n",
                              ["key 'reconstructed'", "'AP' is neither 'row' nor"]),
    "our choice not overridden": ("    our_choices: {MODEL.MAPS.POOL_SIZE: mine}\n",
                                  ["key 'our_choices'", "'MODEL.MAPS.POOL_SIZE' is not overridden"]),
    "lower-case override key": ("    overrides: {model.maps.enabled: true}\n",
                                ["key 'overrides'", "'model.maps.enabled' is not a detectron2"]),
    "bad confidence": ("    confidence: sure\n", ["key 'confidence'", "'sure' is not one of"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_entry_is_refused_with_file_entry_and_key(make_registry, case):
    body, want = CASES[case]
    root = make_registry({"t.yaml": VALID_TABLE, "bad.yaml": _entry(body).replace("table: 5", "table: 6")})
    with pytest.raises(ConfigError) as info:
        load_registry(root)
    msg = str(info.value)
    assert "bad.yaml" in msg and "'tmp/bad'" in msg, msg
    for fragment in want:
        assert fragment in msg, msg
    assert "\n" not in msg


def test_unknown_table_is_refused(make_registry):
    root = make_registry({"t.yaml": VALID_TABLE.replace("table: 5", "table: 9")})
    with pytest.raises(ConfigError, match=r"t\.yaml: key 'table': unknown table 9"):
        load_registry(root, validate=False)


def test_unknown_suite_and_file_key_are_refused(make_registry):
    root = make_registry({"t.yaml": VALID_TABLE.replace("suite: paper", "suite: nightly")})
    with pytest.raises(ConfigError, match=r"t\.yaml: key 'suite': unknown suite 'nightly'"):
        load_registry(root, validate=False)
    root = make_registry({"t.yaml": "tabel: 5\n" + VALID_TABLE})
    with pytest.raises(ConfigError, match=r"t\.yaml: unknown key 'tabel' \(did you mean 'table'\?\)"):
        load_registry(root, validate=False)


def test_duplicate_name_names_both_files(make_registry):
    other = VALID_TABLE.replace("table: 5", "table: 6")
    root = make_registry({"a.yaml": VALID_TABLE, "sub/b.yaml": other})
    with pytest.raises(ConfigError) as info:
        load_registry(root, validate=False)
    msg = str(info.value)
    assert "entry 'tmp/mask2former': duplicate name" in msg
    assert "a.yaml" in msg and "b.yaml" in msg


def test_invalid_yaml_names_the_file(make_registry):
    root = make_registry({"t.yaml": VALID_TABLE + "  - name: [unclosed\n"})
    with pytest.raises(ConfigError, match=r"t\.yaml: not valid YAML"):
        load_registry(root, validate=False)


def test_yaml_tags_are_not_executed(make_registry):
    """safe_load only: a Python tag is a YAML error, never an object."""
    root = make_registry({"t.yaml": VALID_TABLE.replace("title: tmp table",
                                                        "title: !!python/object/apply:os.getcwd []")})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_registry(root, validate=False)


def test_alias_whose_setup_differs_from_its_target_is_refused(make_registry):
    text = VALID_TABLE.replace("tmp/k5: {same_as: tmp/maps}", "tmp/k10: {same_as: tmp/maps}")
    root = make_registry({"t.yaml": text})
    with pytest.raises(ConfigError) as info:
        load_registry(root)
    msg = str(info.value)
    assert "t.yaml: entry 'tmp/k10'" in msg
    assert "key 'MODEL.MAPS.NUM_RETRIEVED'" in msg and "(10 here, 5 there)" in msg


def test_eval_of_may_only_change_test_time_keys(make_registry):
    text = VALID_TABLE.replace("overrides: {MODEL.MAPS.TEST.OBJECT_MEMORY: false}",
                               "overrides: {MODEL.MAPS.SWAPPED: true}")
    with pytest.raises(ConfigError, match=r"entry 'tmp/scene-only': key 'MODEL.MAPS.SWAPPED': an "
                                          r"'eval_of' entry may only change test-time keys"):
        load_registry(make_registry({"t.yaml": text}), validate=False)


def test_eval_of_an_evaluation_is_refused(make_registry):
    text = VALID_TABLE + """\
  - name: tmp/eval-of-eval
    row: x
    eval_of: tmp/scene-only
"""
    with pytest.raises(ConfigError, match=r"'tmp/eval-of-eval': key 'eval_of': 'tmp/scene-only' is "
                                          "not a trained run"):
        load_registry(make_registry({"t.yaml": text}), validate=False)


def test_reference_row_takes_no_setup(make_registry):
    text = VALID_TABLE.replace("    runnable: false\n",
                               "    runnable: false\n    overrides: {MODEL.MAPS.ENABLED: true}\n")
    with pytest.raises(ConfigError, match=r"entry 'tmp/other-method': key 'overrides': a reference "
                                          r"row \(runnable: false\) has no setup"):
        load_registry(make_registry({"t.yaml": text}), validate=False)


def test_same_as_a_reference_row_is_refused(make_registry):
    text = VALID_TABLE.replace("same_as: tmp/maps\n    paper: {PQ: 40.7}",
                               "same_as: tmp/other-method\n    paper: {PQ: 40.7}")
    with pytest.raises(ConfigError, match=r"entry 'tmp/none': key 'same_as': 'tmp/other-method' is a "
                                          "reference row"):
        load_registry(make_registry({"t.yaml": text}), validate=False)


def test_cycle_through_two_aliases(make_registry):
    text = VALID_TABLE + """\
  - name: tmp/a
    row: a
    same_as: tmp/b
  - name: tmp/b
    row: b
    same_as: tmp/a
"""
    with pytest.raises(ConfigError, match=r"cycle: tmp/a -> tmp/b -> tmp/a"):
        load_registry(make_registry({"t.yaml": text}), validate=False)


def test_grid_point_that_is_not_in_the_grid(make_registry):
    text = VALID_TABLE.replace("tmp/k5: {same_as: tmp/maps}", "tmp/k7: {same_as: tmp/maps}")
    with pytest.raises(ConfigError, match=r"key 'points': 'tmp/k7' is not a name of the grid \(it "
                                          r"expands to: tmp/k1, tmp/k5, tmp/k10\)"):
        load_registry(make_registry({"t.yaml": text}), validate=False)


def test_grid_template_with_unknown_placeholder(make_registry):
    text = VALID_TABLE.replace('row: "{num_retrieved}"', 'row: "{k}"')
    with pytest.raises(ConfigError, match=r"key 'row': template '\{k\}' uses an unknown placeholder"):
        load_registry(make_registry({"t.yaml": text}), validate=False)


def test_bad_base_config_names_the_base_file(make_registry):
    root = make_registry({"t.yaml": VALID_TABLE},
                         configs={"base.yaml": "MODEL:\n  NOPE: 1\n", "maps.yaml": "_BASE_: base.yaml\n"})
    with pytest.raises(ConfigError) as info:
        load_registry(root)
    msg = str(info.value)
    assert "t.yaml: entry 'tmp/mask2former'" in msg and "base config" in msg and "base.yaml" in msg
    assert "NOPE" in msg


def test_registry_folder_missing():
    with pytest.raises(ConfigError, match="experiment registry folder not found: /nonexistent/x"):
        load_registry("/nonexistent/x")


def test_bad_defaults_name_the_key_inside_defaults(make_registry):
    root = make_registry({"t.yaml": VALID_TABLE.replace("  iterations: 50\n", "  iterations: 0\n")})
    with pytest.raises(ConfigError, match=r"t\.yaml: key 'defaults.iterations': expected an integer >= 1, got 0"):
        load_registry(root, validate=False)
    root = make_registry({"t.yaml": VALID_TABLE.replace("  iterations: 50\n", "  iteration: 50\n")})
    with pytest.raises(ConfigError, match=r"t\.yaml: key 'defaults': unknown key 'iteration' \(did you mean 'iterations'\?\)"):
        load_registry(root, validate=False)


def test_bad_grid_point_names_the_point_and_key(make_registry):
    text = VALID_TABLE.replace("tmp/k5: {same_as: tmp/maps}", "tmp/k5: {same_as: tmp/maps, seeds: 3}")
    with pytest.raises(ConfigError, match=r"entry 'tmp/k\{num_retrieved\}': key 'points.tmp/k5': unknown key 'seeds'"):
        load_registry(make_registry({"t.yaml": text}), validate=False)
