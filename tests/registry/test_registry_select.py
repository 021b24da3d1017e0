"""Selecting experiments (names, tables, globs, prefixes), launch plans, grids, run names."""
from __future__ import annotations

import pickle

import pytest

from maps.errors import ConfigError
from maps.registry import expand_grid, load_registry

from .conftest import SHIPPED, VALID_TABLE


@pytest.fixture(scope="module")
def reg():
    return load_registry(SHIPPED, validate=False)  # schema only: select needs no configs


def names(experiments):
    return [e.name for e in experiments]


def test_select_by_name(reg):
    assert names(reg.select("ade20k/table5/swapped")) == ["ade20k/table5/swapped"]


@pytest.mark.parametrize("selector, suite, count", [
    ("table6", None, 6), ("6", None, 6), ("table6", "paper", 6), ("6", "synthetic", 6),
    ("paper/table6", None, 6), ("synthetic/table6", None, 6), ("synthetic/6", None, 6),
    ("table1", None, 12), ("table8", None, 3),
])
def test_select_by_table(reg, selector, suite, count):
    """A bare table is the paper's (a GPU launch must not train the CPU mirror's rows); the
    synthetic mirror is asked for by its prefix or ``suite``."""
    out = reg.select(selector, suite=suite)
    assert len(out) == count
    want = suite or (selector.split("/")[0] if "/" in selector else "paper")
    assert {e.suite for e in out} == {want}
    assert {e.table for e in out} == {int(selector.rsplit("table", 1)[-1].rsplit("/", 1)[-1])}


def test_select_glob_prefix_and_commas(reg):
    assert names(reg.select("ade20k/table8/*")) == ["ade20k/table8/k1", "ade20k/table8/k5",
                                                    "ade20k/table8/k10"]
    assert names(reg.select("ade20k/table4")) == names(reg.select("ade20k/table4/*"))
    assert names(reg.select("*/maps-aug-cls")) == ["ade20k/maps-aug-cls", "cityscapes/maps-aug-cls",
                                                   "synthetic/main/maps-aug-cls"]
    both = reg.select("ade20k/table8/k1, coco/maps,ade20k/table8/k1")
    assert names(both) == ["coco/maps", "ade20k/table8/k1"]  # registry order, no repeats


def test_select_nothing_suggests(reg):
    with pytest.raises(ConfigError, match=r"no experiment matches 'ade20k/map' \(did you mean: "
                                          r"ade20k/maps"):
        reg.select("ade20k/map")
    with pytest.raises(ConfigError, match="unknown table 9"):
        reg.select("table9")
    with pytest.raises(ConfigError, match="unknown suite 'nightly'"):
        reg.select("table6", suite="nightly")


def test_runs_collapse_aliases_and_put_training_before_evaluation(reg):
    runs = names(reg.runs("paper/table7"))
    assert runs == ["ade20k/maps", "ade20k/table7/no-memory", "ade20k/table7/scene-only",
                    "ade20k/table7/object-only"]
    table5 = names(reg.runs("ade20k/table5"))
    assert table5 == ["ade20k/maps", "ade20k/table5/swapped", "ade20k/table5/random-sampling",
                      "ade20k/table5/input-masking", "ade20k/table5/layer-masking"]
    everything = reg.runs("paper/table4,paper/table5,paper/table6,paper/table7,paper/table8")
    assert names(everything).count("ade20k/maps") == 1
    assert len(everything) == 1 + 1 + 2 + 4 + 5 + 3 + 2  # maps, m2f, (6)(9), t5, t6, t7, t8
    assert reg.runs("coco/detr, coco/maps") == [reg.get("coco/maps")]  # references dropped


def test_run_names(reg):
    assert reg.get("ade20k/table5/none").run_name(2) == "ade20k/maps/seed2"
    assert reg.get("synthetic/main/maps").seeds == (0, 1, 2)
    with pytest.raises(ConfigError, match="reference row"):
        reg.get("coco/detr").run_name(0)
    with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
        reg.get("coco/maps").run_name(-1)


def test_experiment_is_frozen_hashable_and_picklable(reg):
    e = reg.get("ade20k/table8/k10")
    with pytest.raises(AttributeError):
        e.name = "x"
    assert len({e, reg.get("ade20k/table8/k10")}) == 1
    assert pickle.loads(pickle.dumps(e)) == e


def test_expand_grid_product_order():
    assert expand_grid({"A.X": [1, 2], "B.Y": ["a", "b"]}) == [
        {"A.X": 1, "B.Y": "a"}, {"A.X": 1, "B.Y": "b"}, {"A.X": 2, "B.Y": "a"}, {"A.X": 2, "B.Y": "b"}]


def test_two_key_grid_without_template_names_each_point(make_registry):
    text = VALID_TABLE + """\
  - name: tmp/sweep
    row: sweep
    grid:
      MODEL.MAPS.NUM_RETRIEVED: [1, 2]
      MODEL.MAPS.INPUT_MASKING_PROB: [0.0, 0.5]
"""
    reg = load_registry(make_registry({"t.yaml": text}))
    sweep = reg.select("tmp/sweep/*")
    assert names(sweep) == [
        "tmp/sweep/num-retrieved1-input-masking-prob0.0", "tmp/sweep/num-retrieved1-input-masking-prob0.5",
        "tmp/sweep/num-retrieved2-input-masking-prob0.0", "tmp/sweep/num-retrieved2-input-masking-prob0.5"]
    last = sweep[-1]
    assert last.grid_point == {"MODEL.MAPS.NUM_RETRIEVED": 2, "MODEL.MAPS.INPUT_MASKING_PROB": 0.5}
    cfg = last.build_config()
    assert (cfg.MODEL.MAPS.NUM_RETRIEVED, cfg.MODEL.MAPS.INPUT_MASKING_PROB) == (2, 0.5)
    assert last.seeds == (0, 1)


def test_grid_points_keep_their_own_rows_and_aliases(make_registry):
    reg = load_registry(make_registry({"t.yaml": VALID_TABLE}))
    assert [(e.name, e.row, e.same_as) for e in reg.select("tmp/k*")] == [
        ("tmp/k1", "1", None), ("tmp/k5", "5", "tmp/maps"), ("tmp/k10", "10", None)]
    assert reg.get("tmp/k10").build_config().MODEL.MAPS.NUM_RETRIEVED == 10


def test_short_schedules_keep_only_decay_steps_inside_the_run():
    from maps.config import get_maps_cfg
    from maps.registry.experiments import _set_iterations

    cfg = get_maps_cfg()
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 1000, (900, 950)
    _set_iterations(cfg, 100, steps_overridden=False)
    assert cfg.SOLVER.MAX_ITER == 100 and cfg.SOLVER.STEPS == (90, 95)
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 1000, (900, 950)
    _set_iterations(cfg, 4, steps_overridden=False)  # both round to 4 = MAX_ITER: dropped
    assert cfg.SOLVER.STEPS == ()
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 1000, (900, 950)
    _set_iterations(cfg, 20, steps_overridden=False)  # 18, 19
    assert cfg.SOLVER.STEPS == (18, 19)
