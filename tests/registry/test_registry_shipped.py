"""The shipped registry: valid against the real base configs and datasets, and faithful to
the paper's tables (numbers checked against the paper's text and its prose)."""
from __future__ import annotations

import pytest

from maps.registry import SUITES, TABLES


def test_whole_shipped_registry_validates(shipped):
    """load_registry built every runnable config and found every dataset (fixture)."""
    assert len(shipped) >= 70
    for suite, tables in (("paper", set(TABLES)), ("synthetic", {2, 4, 5, 6, 7, 8})):
        assert {e.table for e in shipped if e.suite == suite} == tables
    assert {e.suite for e in shipped} == set(SUITES)


def test_every_runnable_config_is_complete(shipped):
    for e in shipped:
        if not e.runnable:
            assert e.base_config is None and e.seeds == () and e.paper, e.name
            continue
        assert e.base_config.is_file() and e.iterations >= 1 and e.seeds, e.name
        assert e.datasets["train"] and e.datasets["test"], e.name


# name -> the paper's numbers, transcribed from /work/shared/paper/maps-paper.txt
PAPER = {
    "coco/maps": {"params": 45.9, "PQ": 52.0, "PQ_th": 57.7, "PQ_st": 43.4, "AP": 41.7, "mIoU": 62.1},
    "coco/panoptic-deeplab": {"PQ": 39.7, "PQ_th": 43.9, "PQ_st": 33.2},
    "coco/cmt-deeplab": {"PQ": 48.5},
    "ade20k/maps-aug": {"PQ": 41.0, "PQ_th": 40.3, "PQ_st": 42.2, "AP": 27.3, "mIoU": 48.6},
    "ade20k/kmax-deeplab": {"PQ": 41.5, "mIoU": 45.0},
    "cityscapes/maps-aug-cls": {"iters": 45000, "PQ": 61.0, "PQ_th": 52.7, "PQ_st": 67.0,
                                "AP": 35.6, "mIoU": 79.1},
    "cityscapes/panoptic-fpn": {"iters": 65000, "PQ": 58.1, "PQ_th": 52.0, "PQ_st": 62.5,
                                "AP": 33.0, "mIoU": 75.7},
    "ade20k/table4/mask2former-6": {"params": 45.6, "PQ": 39.8, "AP": 26.4, "mIoU": 46.1},
    "ade20k/table5/input-masking": {"PQ": 41.3, "AP": 27.4, "mIoU": 47.5},
    "ade20k/table6/dino-cls": {"PQ": 39.7, "AP": 26.7, "mIoU": 46.0},
    "ade20k/table7/object-only": {"PQ": 34.1, "AP": 25.6, "mIoU": 41.9},
    "ade20k/table8/k10": {"PQ": 40.5, "AP": 27.1, "mIoU": 46.9},
}


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_numbers_transcribed(shipped, name):
    assert shipped.get(name).paper == PAPER[name]


def test_table1_reconstruction_agrees_with_section_4_4(shipped):
    """'0.3 points better than Mask2Former and 0.5 points more than OneFormer'; '1 point mIoU'."""
    maps, m2f, one = (shipped.get(f"coco/{n}").paper for n in ("maps", "mask2former", "oneformer"))
    assert round(maps["PQ"] - m2f["PQ"], 1) == 0.3
    assert round(maps["PQ"] - one["PQ"], 1) == 0.5
    baselines = [e.paper["mIoU"] for e in shipped.select("paper/table1") if "mIoU" in e.paper
                 and e.name != "coco/maps"]
    assert maps["mIoU"] == max(baselines + [maps["mIoU"]])
    assert round(maps["mIoU"] - max(baselines), 1) == pytest.approx(1.0, abs=0.15)
    rows = shipped.select("paper/table1")
    assert len(rows) == 12
    assert all("row" in e.reconstructed and e.confidence for e in rows)
    assert [e.name for e in rows if e.runnable] == ["coco/mask2former", "coco/maps"]


def test_ade20k_prose_agrees_with_table2(shipped):
    """'improves our panoptic quality by 0.4 points and improves mIOU by roughly 1.6 points'."""
    maps, aug, cls = (shipped.get(f"ade20k/{n}").paper for n in ("maps", "maps-aug", "maps-aug-cls"))
    assert round(cls["PQ"] - maps["PQ"], 1) == 0.4
    assert round(aug["mIoU"] - maps["mIoU"], 1) == 1.6


def test_garbled_cells_are_marked(shipped):
    k5 = shipped.get("ade20k/table8/k5")
    assert k5.paper["AP"] == 27.0 and "AP" in k5.reconstructed
    row1 = shipped.get("ade20k/table7/no-memory")
    assert row1.paper == {"PQ": 22.2, "AP": 24.4, "mIoU": 40.3}
    assert {"row", "PQ", "AP", "mIoU"} <= set(row1.reconstructed) and row1.confidence == "low"
    assert row1.cells == {"Scene Level": False, "Obj. Level": False}
    assert shipped.get("ade20k/table7/scene-only").paper == {"PQ": 40.2, "AP": 26.7, "mIoU": 46.7}
    assert "params" in shipped.get("ade20k/table4/mask2former-6").reconstructed


def test_rows_of_the_one_maps_run_are_aliases(shipped):
    """Table 2 MAPS, 4 'MAPS (6)', 5 'None', 6 row 6, 7 row 4, 8 k=5: one run, six rows."""
    rows = [e for e in shipped if e.suite == "paper" and e.paper.get("PQ") == 40.7]
    assert sorted(e.table for e in rows) == [2, 4, 5, 6, 7, 8]
    assert {e.canonical_name for e in rows} == {"ade20k/maps"}
    assert {e.run_name(0) for e in rows} == {"ade20k/maps/seed0"}
    assert all((e.paper["PQ"], e.paper["AP"], e.paper["mIoU"]) == (40.7, 27.0, 47.0) for e in rows)
    assert shipped.get("ade20k/table4/mask2former").same_as == "ade20k/mask2former"


def test_alias_config_is_its_targets(shipped):
    assert (shipped.get("ade20k/table8/k5").build_config().dump()
            == shipped.get("ade20k/maps").build_config().dump())


def test_variants_are_config_overrides(shipped):
    cfg = shipped.get("ade20k/maps").build_config()
    m = cfg.MODEL.MAPS
    assert m.ENABLED and list(m.SCENE_LAYERS) == [0, 1, 2] and list(m.OBJECT_LAYERS) == [3, 4, 5]
    assert m.NUM_RETRIEVED == 5 and m.MEMORY.KEY_ENCODER == "clip" and m.MEMORY.DENSE == "tiledclip"
    assert cfg.SOLVER.MAX_ITER == 160000 and tuple(cfg.DATASETS.TRAIN) == ("ade20k_panoptic_train",)
    assert not shipped.get("ade20k/mask2former").build_config().MODEL.MAPS.ENABLED
    aug = shipped.get("ade20k/maps-aug-cls").build_config().MODEL.MAPS
    assert (aug.RANDOM_SAMPLING, aug.POOL_SIZE, aug.INPUT_MASKING_PROB, aug.APPEND_QUERY_CLS) == (
        True, 10, 0.5, True)
    assert set(shipped.get("ade20k/maps-aug").our_choices) == {"MODEL.MAPS.POOL_SIZE",
                                                               "MODEL.MAPS.INPUT_MASKING_PROB"}
    assert shipped.get("ade20k/table5/swapped").build_config().MODEL.MAPS.SWAPPED
    assert shipped.get("ade20k/table5/layer-masking").build_config().MODEL.MAPS.LAYER_MASKING_PROB == 0.5
    t4 = shipped.get("ade20k/table4/mask2former-9").build_config().MODEL.MAPS
    assert not t4.ENABLED and list(t4.EXTRA_SELF_ATTN_LAYERS) == list(range(9))
    for name, key_enc, dense, object_layers in [
            ("ade20k/table6/clip-cls", "clip", "tiledclip", []),
            ("ade20k/table6/dino-cls", "dino", "tiledclip", []),
            ("ade20k/table6/clip-image", "clip", "clip", [3, 4, 5]),
            ("ade20k/table6/dino-image", "clip", "dino", [3, 4, 5]),
            ("ade20k/table6/maskclip-image", "clip", "maskclip", [3, 4, 5])]:
        m = shipped.get(name).build_config().MODEL.MAPS
        assert (m.MEMORY.KEY_ENCODER, m.MEMORY.DENSE, list(m.OBJECT_LAYERS)) == (
            key_enc, dense, object_layers), name
    assert shipped.get("ade20k/table6/dino-cls").build_config().MODEL.MAPS.MEMORY.KEY_ARCH == (
        "vit_base_patch16_224")  # a timm name: maps.memory.encoders builds DINO with timm
    assert [shipped.get(f"ade20k/table8/k{k}").build_config().MODEL.MAPS.NUM_RETRIEVED
            for k in (1, 5, 10)] == [1, 5, 10]


def test_table7_evaluates_the_trained_maps_model(shipped):
    train = shipped.get("ade20k/maps").build_config()
    for name, scene, obj in [("no-memory", False, False), ("scene-only", True, False),
                             ("object-only", False, True)]:
        e = shipped.get(f"ade20k/table7/{name}")
        assert e.eval_of == "ade20k/maps" and e.run_name(0) == f"ade20k/table7/{name}/seed0"
        assert e.train_run_name(0) == "ade20k/maps/seed0"
        cfg = e.build_config()
        assert (cfg.MODEL.MAPS.TEST.SCENE_MEMORY, cfg.MODEL.MAPS.TEST.OBJECT_MEMORY) == (scene, obj)
        cfg.MODEL.MAPS.TEST.SCENE_MEMORY = cfg.MODEL.MAPS.TEST.OBJECT_MEMORY = True
        assert cfg.dump() == train.dump()  # only the test-time switches differ


def test_cityscapes_iterations(shipped):
    assert shipped.get("cityscapes/maps").build_config().SOLVER.MAX_ITER == 45000
    m2f = shipped.get("cityscapes/mask2former").build_config()
    assert m2f.SOLVER.MAX_ITER == 45000 and not m2f.MODEL.MAPS.ENABLED
    assert shipped.get("cityscapes/mask2former-90k").build_config().SOLVER.MAX_ITER == 90000


def test_synthetic_suite_mirrors_the_paper(shipped):
    synthetic = [e for e in shipped if e.suite == "synthetic"]
    for e in synthetic:
        assert e.mirrors, e.name
        target = shipped.get(e.mirrors)
        assert target.suite == "paper" and target.table == e.table, e.name
        assert target.row.startswith(e.row), e.name  # the paper's label, minus dagger/citation
        assert e.paper == {}
        if e.runnable and not e.is_alias:
            cfg = e.build_config()
            assert tuple(cfg.DATASETS.TRAIN) == ("synthetic_train",)
            assert 100 <= cfg.SOLVER.MAX_ITER <= 2000
    assert {e.name for e in shipped.select("synthetic/table2")} == {
        "synthetic/main/mask2former", "synthetic/main/maps", "synthetic/main/maps-aug",
        "synthetic/main/maps-aug-cls"}


def test_shortened_schedule_scales_lr_steps(shipped):
    """synthetic/tiny.yaml: 2000 iterations, steps (1800, 1900); the suite runs 1000."""
    cfg = shipped.get("synthetic/main/maps").build_config(seed=3)
    assert cfg.SOLVER.MAX_ITER == 1000 and tuple(cfg.SOLVER.STEPS) == (900, 950)
    assert cfg.SEED == 3


def test_memory_specs_group_runs_by_bank(shipped):
    assert shipped.get("ade20k/mask2former").memory_spec() is None
    assert shipped.get("coco/detr").memory_spec() is None
    maps = shipped.get("ade20k/maps").memory_spec()
    assert maps["dataset"] == "coco_2017_train_panoptic"  # paper section 3.2: COCO memory
    assert (maps["key_encoder"], maps["dense"]) == ("clip", "tiledclip")
    assert shipped.get("ade20k/table5/swapped").memory_spec() == maps  # same bank
    dino = shipped.get("ade20k/table6/dino-image").memory_spec()
    assert dino["dense"] == "dino" and dino != maps
    assert shipped.get("synthetic/main/maps").memory_spec()["dataset"] == "synthetic_train"


@pytest.mark.parametrize("key, value", [("MODEL.MAPS.MEMORY.DENSE_ARCH", "ViT-L-14"),
                                        ("MODEL.MAPS.MEMORY.DENSE_WEIGHTS", "/ckpt/dense.pt"),
                                        ("MODEL.MAPS.MEMORY.INDEX", "flat")])
def test_every_memory_key_that_changes_the_bank_changes_its_spec(shipped, key, value, tmp_path):
    """Two runs share a bank only when every key the bank is built from is equal."""
    import dataclasses

    from maps.memory.prepare import memory_dir

    base = shipped.get("synthetic/main/maps")
    other = dataclasses.replace(base, overrides={**base.overrides, key: value})
    assert other.memory_spec() != base.memory_spec()
    assert memory_dir(other.memory_spec(), tmp_path, "/d") != memory_dir(base.memory_spec(), tmp_path, "/d")
