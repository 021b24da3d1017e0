"""Which weights a config needs, the refusal messages, resolution and the run record."""
from __future__ import annotations

import pytest

from maps.errors import ConfigError
from maps.modeling.build import load_config
from maps.weights import WeightsError, resolve_weight
from maps.weights.runs import check_weights, resolve_config_weights, weights_needed, weights_record
from maps.weights.verify import add_weight

CONFIGS = "experiments/configs"


def _cfg(rel: str, *opts: str):
    return load_config(f"{CONFIGS}/{rel}", list(opts))


def _registry_cfg(name: str):
    from maps.registry import load_registry

    return load_registry(validate=False).get(name).build_config()


@pytest.mark.parametrize("name, needed", [
    ("coco/mask2former", ["r50-imagenet"]),
    ("coco/maps", ["r50-imagenet", "clip-vit-b16-openai"]),
    ("cityscapes/maps-aug-cls", ["r50-imagenet", "clip-vit-b16-openai"]),
    ("ade20k/table4/mask2former-9", ["r50-imagenet"]),          # memory off
    ("ade20k/table6/dino-cls", ["r50-imagenet", "dino-vit-b16"]),  # no object memory
    ("ade20k/table6/dino-image", ["r50-imagenet", "clip-vit-b16-openai", "dino-vit-b16"]),
    ("ade20k/table6/maskclip-image", ["r50-imagenet", "clip-vit-b16-openai"]),
    ("synthetic/main/maps", []),
])
def test_weights_needed_by_the_registry_rows(name, needed):
    assert weights_needed(_registry_cfg(name)) == needed


def test_paper_configs_state_quickgelu_for_openai_clip():
    for rel in ("coco/maps_R50_bs16_50ep.yaml", "ade20k/maps_R50_bs16_160k.yaml",
                "cityscapes/maps_R50_bs16_45k.yaml"):
        mem = _cfg(rel).MODEL.MAPS.MEMORY
        assert (mem.KEY_ARCH, mem.WEIGHTS) == ("ViT-B-16-quickgelu", "clip-vit-b16-openai"), rel


def test_synthetic_configs_need_nothing(cache):
    assert check_weights(_cfg("synthetic/maps_tiny.yaml", "MODEL.MAPS.MEMORY.BANK", "b")) == []
    assert check_weights(_cfg("synthetic/tiny.yaml")) == []


def test_empty_weights_of_a_paper_backbone_are_refused_unless_random_is_allowed(cache):
    cfg = _cfg("coco/maps_R50_bs16_50ep.yaml", "MODEL.WEIGHTS", "",
               "MODEL.MAPS.MEMORY.WEIGHTS", "")
    problems = check_weights(cfg)
    assert len(problems) == 2
    assert problems[0].startswith("MODEL.WEIGHTS is empty: the paper's build_resnet_backbone:R50 "
                                  "starts from r50-imagenet")
    assert problems[1].startswith("MODEL.MAPS.MEMORY.WEIGHTS is empty")
    assert "clip-vit-b16-openai" in problems[1]
    assert all("--allow-random-weights" in p for p in problems)
    assert check_weights(cfg, allow_random=True) == []


@pytest.mark.parametrize("opts, words", [
    (("MODEL.WEIGHTS", "detectron2://ImageNetPretrained/torchvision/R-50.pkl"),
     "is a download URL: name the cache entry r50-imagenet"),
    (("MODEL.WEIGHTS", "/nowhere/R-50.pkl"), "/nowhere/R-50.pkl: no such file"),
    (("MODEL.MAPS.MEMORY.KEY_ARCH", "ViT-B-16"), "made for ViT-B-16-quickgelu (quick_gelu"),
    (("MODEL.MAPS.MEMORY.WEIGHTS", "dino-vit-b16"), "loads a clip backbone here"),
    (("MODEL.RESNETS.STRIDE_IN_1X1", "True"), "needs MODEL.RESNETS.STRIDE_IN_1X1 = False"),
    (("MODEL.PIXEL_STD", "[1.0, 1.0, 1.0]"), "needs MODEL.PIXEL_STD = [58.395"),
])
def test_wrong_configs_are_refused_even_with_random_allowed(cache, opts, words):
    cfg = _cfg("coco/maps_R50_bs16_50ep.yaml", *opts)
    problems = check_weights(cfg, allow_random=True)
    assert any(words in p for p in problems), problems
    with pytest.raises(WeightsError, match=words.split(":")[0][:20]):
        resolve_config_weights(cfg, allow_random=True)


def test_resolve_weight_and_the_run_record(cache, r50_pkl, tmp_path):
    from maps.io import file_sha256

    assert resolve_weight("") is None
    with pytest.raises(WeightsError, match=r"r50-imagenet: not in the cache .*maps weights fetch "
                                           r"r50-imagenet.*maps weights add r50-imagenet FILE"):
        resolve_weight("r50-imagenet")
    add_weight("r50-imagenet", r50_pkl)
    cached = str(cache / "r50-imagenet" / "r50-imagenet.pkl")
    assert resolve_weight("r50-imagenet") == cached
    assert resolve_weight(str(r50_pkl)) == str(r50_pkl)
    with pytest.raises(WeightsError, match="no such file"):
        resolve_weight(str(tmp_path / "nope.pkl"))

    cfg = resolve_config_weights(_cfg("coco/maskformer2_R50_bs16_50ep.yaml"))
    assert cfg.MODEL.WEIGHTS == cached and cfg.is_frozen()
    sha = file_sha256(r50_pkl)
    record = [{"key": "MODEL.WEIGHTS", "name": "r50-imagenet", "path": cached, "sha256": sha}]
    assert weights_record(cfg) == record  # a resolved config names its cache entry too
    assert weights_record(_cfg("coco/maskformer2_R50_bs16_50ep.yaml")) == record
    own = _cfg("coco/maskformer2_R50_bs16_50ep.yaml", "MODEL.WEIGHTS", str(r50_pkl))
    assert weights_record(own) == [{"key": "MODEL.WEIGHTS", "name": None,
                                    "path": str(r50_pkl.resolve()), "sha256": sha}]


def test_encoders_resolve_cache_names_and_refuse_missing_ones(cache):
    from maps.memory.encoders import build_key_encoder

    with pytest.raises(ConfigError, match="clip-vit-b16-openai: not in the cache.*maps weights"):
        build_key_encoder("clip", "ViT-B-16-quickgelu", weights="clip-vit-b16-openai")
