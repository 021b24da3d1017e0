"""The base configs reproduce the paper's recipes; config loading fails with clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from maps.errors import ConfigError
from maps.modeling import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"
ALL = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))


def _cfg(rel: str, *opts: str):
    return load_config(CONFIGS / rel, list(opts))


@pytest.mark.parametrize("rel", ALL)
def test_every_config_loads(rel):
    cfg = _cfg(rel)
    assert cfg.is_frozen()


def test_the_expected_configs_exist():
    assert set(ALL) >= {
        "coco/Base-COCO-PanopticSegmentation.yaml", "coco/maskformer2_R50_bs16_50ep.yaml",
        "coco/maps_R50_bs16_50ep.yaml", "ade20k/maskformer2_R50_bs16_160k.yaml",
        "ade20k/maps_R50_bs16_160k.yaml", "cityscapes/maskformer2_R50_bs16_90k.yaml",
        "cityscapes/maps_R50_bs16_45k.yaml", "synthetic/tiny.yaml", "synthetic/maps_tiny.yaml"}


def test_coco_recipe_is_mask2formers_50_epochs():
    cfg = _cfg("coco/maskformer2_R50_bs16_50ep.yaml")
    s = cfg.SOLVER
    assert s.MAX_ITER == 368_750 and s.IMS_PER_BATCH == 16
    assert s.MAX_ITER * s.IMS_PER_BATCH / 118_000 == pytest.approx(50, rel=0.001)  # epochs
    assert s.STEPS == (327_778, 355_092)  # Mask2Former's released config, not 0.9 / 0.95
    assert (s.OPTIMIZER, s.BASE_LR, s.WEIGHT_DECAY, s.BACKBONE_MULTIPLIER) == ("ADAMW", 1e-4, 0.05, 0.1)
    assert (s.CLIP_GRADIENTS.ENABLED, s.CLIP_GRADIENTS.CLIP_TYPE, s.CLIP_GRADIENTS.CLIP_VALUE) == (
        True, "full_model", 0.01)
    assert cfg.INPUT.IMAGE_SIZE == 1024 and cfg.INPUT.DATASET_MAPPER_NAME == "coco_panoptic_lsj"
    m = cfg.MODEL
    assert (m.META_ARCHITECTURE, m.RESNETS.DEPTH, m.RESNETS.NORM, m.RESNETS.STRIDE_IN_1X1) == (
        "MAPS", 50, "FrozenBN", False)
    assert m.WEIGHTS == "r50-imagenet"  # torchvision's ImageNet R50, by weights cache name
    assert (tuple(m.PIXEL_MEAN), tuple(m.PIXEL_STD)) == ((123.675, 116.280, 103.530),
                                                         (58.395, 57.120, 57.375))
    assert m.SEM_SEG_HEAD.NUM_CLASSES == 133 and m.MASK_FORMER.NUM_OBJECT_QUERIES == 100
    assert m.MASK_FORMER.DEC_LAYERS == 10 and m.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS == 6
    assert not m.MAPS.ENABLED


def test_ade20k_schedule_is_the_papers():
    cfg = _cfg("ade20k/maps_R50_bs16_160k.yaml")
    s = cfg.SOLVER
    assert s.MAX_ITER == 160_000 and s.LR_SCHEDULER_NAME == "WarmupMultiStepLR"
    assert s.STEPS == (100_000, 140_000) and s.GAMMA == 0.9
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 150
    assert cfg.DATASETS.TRAIN == ("ade20k_panoptic_train",)


def test_cityscapes_iterations():
    m2f = _cfg("cityscapes/maskformer2_R50_bs16_90k.yaml")
    assert m2f.SOLVER.MAX_ITER == 90_000
    assert m2f.MODEL.RESNETS.NORM == "SyncBN"  # Mask2Former's Cityscapes recipe
    cfg = _cfg("cityscapes/maps_R50_bs16_45k.yaml")
    assert cfg.SOLVER.MAX_ITER == 45_000 and cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 19


CLIP = ("MODEL.MAPS.MEMORY.WEIGHTS", "clip-vit-b16-openai")  # the memory's encoder weights


@pytest.mark.parametrize("maps_rel, base_rel, also", [
    ("coco/maps_R50_bs16_50ep.yaml", "coco/maskformer2_R50_bs16_50ep.yaml", CLIP),
    ("ade20k/maps_R50_bs16_160k.yaml", "ade20k/maskformer2_R50_bs16_160k.yaml", CLIP),
    ("cityscapes/maps_R50_bs16_45k.yaml", "cityscapes/maskformer2_R50_bs16_90k.yaml",
     ("SOLVER.MAX_ITER", "45000", *CLIP)),
    ("synthetic/maps_tiny.yaml", "synthetic/tiny.yaml",
     ("MODEL.MAPS.SCENE_MEMORY_DIM", "64", "MODEL.MAPS.OBJECT_MEMORY_DIM", "64",
      "MODEL.MAPS.MEMORY.KEY_ARCH", "ViT-Tiny-16")),
])
def test_maps_configs_differ_from_mask2former_only_by_memory(maps_rel, base_rel, also):
    maps_cfg = _cfg(maps_rel)
    assert maps_cfg.MODEL.MAPS.ENABLED
    assert list(maps_cfg.MODEL.MAPS.SCENE_LAYERS) == [0, 1, 2]
    assert list(maps_cfg.MODEL.MAPS.OBJECT_LAYERS) == [3, 4, 5]
    assert maps_cfg.MODEL.MAPS.NUM_RETRIEVED == 5
    # switching memory off gives back the Mask2Former config exactly
    off = _cfg(maps_rel, "MODEL.MAPS.ENABLED", "False")
    assert off.dump() == _cfg(base_rel, *also).dump()


def test_tiny_config_matches_the_synthetic_dataset():
    from maps.data import SYNTHETIC_CATEGORIES

    cfg = _cfg("synthetic/tiny.yaml")
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == len(SYNTHETIC_CATEGORIES)
    assert cfg.DATASETS.TRAIN == ("synthetic_train",) and cfg.DATASETS.TEST == ("synthetic_val",)
    assert cfg.MODEL.MASK_FORMER.DEC_LAYERS == 10  # 9 layers: placement 1-3 / 4-6 / 7-9 kept
    assert cfg.MODEL.DEVICE == "cpu"


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_missing_base_names_the_base(tmp_path):
    f = tmp_path / "child.yaml"
    f.write_text("_BASE_: missing_base.yaml\n")
    with pytest.raises(ConfigError, match=r"child\.yaml.*missing_base\.yaml"):
        load_config(f)


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("MODEL:\n  MAPS:\n    ENABLD: True\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*MODEL\.MAPS\.ENABLD"):
        load_config(f)


def test_invalid_yaml_is_a_config_error(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("MODEL: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML: .*line 1, column 8"):
        load_config(f)


@pytest.mark.parametrize("opts, message", [
    (["MODEL.NOPE", "1"], r"MODEL\.NOPE"),
    (["MODEL.MAPS.ENABLED"], "KEY VALUE pairs"),
    (["MODEL.MAPS.NUM_RETRIEVED", "five"], r"MODEL\.MAPS\.NUM_RETRIEVED"),
])
def test_bad_overrides_are_config_errors(opts, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "synthetic/tiny.yaml", opts)


def test_overrides_apply_last_and_unfrozen_on_request():
    cfg = load_config(CONFIGS / "synthetic/maps_tiny.yaml", ["MODEL.MAPS.NUM_RETRIEVED", "10"],
                      freeze=False)
    assert cfg.MODEL.MAPS.NUM_RETRIEVED == 10 and not cfg.is_frozen()
