"""Parameter budgets of the paper's R50 models (Tables 1 and 4), built on the CPU."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest

from maps.modeling import build_model, count_parameters, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"
EXTRA6 = ("MODEL.MAPS.EXTRA_SELF_ATTN_LAYERS", "[0, 1, 2, 3, 4, 5]")
EXTRA9 = ("MODEL.MAPS.EXTRA_SELF_ATTN_LAYERS", "[0, 1, 2, 3, 4, 5, 6, 7, 8]")

# nn.MultiheadAttention(256, 8): in-projection 3*256*256 + 3*256, out-projection 256*256 + 256
MHA_256 = 4 * 256 * 256 + 4 * 256
LAYER_NORM_256 = 2 * 256


@lru_cache(maxsize=None)
def _counts(config: str, *opts: str) -> dict:
    cfg = load_config(CONFIGS / config, list(opts) + ["MODEL.DEVICE", "cpu"])
    return count_parameters(build_model(cfg))


@pytest.mark.parametrize("config, opts, paper_millions", [
    ("coco/maskformer2_R50_bs16_50ep.yaml", (), 44.0),      # Table 1, Mask2Former R50
    ("coco/maps_R50_bs16_50ep.yaml", (), 45.9),             # Table 1, MAPS R50
    ("ade20k/maskformer2_R50_bs16_160k.yaml", EXTRA6, 45.6),  # Table 4, Mask2Former (6)
    ("ade20k/maskformer2_R50_bs16_160k.yaml", EXTRA9, 46.4),  # Table 4, Mask2Former (9)
    ("ade20k/maps_R50_bs16_160k.yaml", (), 45.9),           # Table 4, MAPS (6)
])
def test_parameter_count_matches_the_paper(config, opts, paper_millions):
    counts = _counts(config, *opts)
    assert counts["total"] == pytest.approx(paper_millions * 1e6, rel=0.02)
    assert counts["trainable"] == counts["total"]  # FrozenBN has buffers, not parameters


def test_memory_budget_is_two_projections_and_six_cross_attentions():
    plain = _counts("coco/maskformer2_R50_bs16_50ep.yaml")
    maps = _counts("coco/maps_R50_bs16_50ep.yaml")
    projection = 512 * 256 + 256  # Linear(512 -> 256), one per memory
    expected = 2 * projection + 6 * (MHA_256 + LAYER_NORM_256)
    assert expected == 2 * 131_328 + 6 * 263_680 == 1_844_736
    assert maps["memory"] == expected
    assert maps["total"] - plain["total"] == expected
    assert plain["memory"] == 0
    # everything but the decoder is shared with Mask2Former
    assert maps["backbone"] == plain["backbone"] and maps["pixel_decoder"] == plain["pixel_decoder"]


def test_extra_self_attention_layers_cost_one_attention_block_each():
    plain = _counts("ade20k/maskformer2_R50_bs16_160k.yaml")
    for opts, n in ((EXTRA6, 6), (EXTRA9, 9)):
        counts = _counts("ade20k/maskformer2_R50_bs16_160k.yaml", *opts)
        assert counts["extra_self_attention"] == n * (MHA_256 + LAYER_NORM_256)
        assert counts["total"] - plain["total"] == counts["extra_self_attention"]
        assert counts["memory"] == 0


def test_component_counts_by_hand():
    coco = _counts("coco/maskformer2_R50_bs16_50ep.yaml")
    # torchvision's R50 (25,557,032) minus the fc layer and the 53,120 BN affine parameters
    assert coco["backbone"] == 25_557_032 - (2048 * 1000 + 1000) - 53_120
    assert coco["pixel_decoder"] == 6_035_904  # see test_pixel_decoder for the breakdown
    assert coco["total"] == coco["backbone"] + coco["pixel_decoder"] + coco["transformer_decoder"]
    # ADE20K's 150 classes vs COCO's 133: only the class head Linear(256 -> C + 1) differs
    ade = _counts("ade20k/maskformer2_R50_bs16_160k.yaml")
    assert ade["total"] - coco["total"] == (150 - 133) * (256 + 1)
