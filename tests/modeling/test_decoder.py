"""The masked-attention decoder: Mask2Former's behaviour, parameter budget, MAPS on/off."""
from __future__ import annotations

import math

import pytest
import torch
from maps_tiny_model import tiny_cfg as shared_tiny_cfg

from maps.config import get_maps_cfg
from maps.errors import ConfigError
from maps.memory.tokens import MemoryTokens
from maps.modeling.position_encoding import PositionEmbeddingSine
from maps.modeling.transformer_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    MultiScaleMaskedTransformerDecoder,
    build_transformer_decoder,
)

# per-layer budget of a hidden-256, 8-head, FFN-2048 decoder (hand-computed)
MHA_256 = 4 * 256 * 256 + 4 * 256          # in_proj (3 x 256x256 + bias) + out_proj = 263,168
LAYER_NORM_256 = 2 * 256                   # 512
ATTN_LAYER_256 = MHA_256 + LAYER_NORM_256  # 263,680
FFN_256 = 256 * 2048 + 2048 + 2048 * 256 + 256 + LAYER_NORM_256  # 1,051,392
PROJ_512 = 512 * 256 + 256                 # 131,328


def full_cfg():
    cfg = get_maps_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 133
    return cfg


def tiny_cfg(enabled: bool = False, **maps):
    return shared_tiny_cfg(enabled, **maps)


def build(cfg, seed: int = 0, in_channels: int = 16):
    torch.manual_seed(seed)
    return build_transformer_decoder(cfg, in_channels)


def inputs(batch: int = 2, channels: int = 16, mask_dim: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(batch, channels, s, s, generator=g) for s in (2, 4, 8)]
    return x, torch.randn(batch, mask_dim, 16, 16, generator=g)


def memory(batch: int = 2, dim: int = 8, seed: int = 2, all_padding: bool = False) -> MemoryTokens:
    g = torch.Generator().manual_seed(seed)
    per_image = [
        {
            "scene": torch.randn(5 - i, dim, generator=g),
            "object": torch.randn(4 + i, dim, generator=g),
            "object_slot": torch.arange(4 + i) % (5 - i),
        }
        for i in range(batch)
    ]
    mem = MemoryTokens.collate(per_image)
    if all_padding:
        mem.scene_mask[:] = True
        mem.object_mask[:] = True
    return mem


def num_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- position encoding --------------------------------------------------------------------
def test_position_encoding_matches_hand_computed_values():
    pe = PositionEmbeddingSine(num_pos_feats=4, temperature=10000)
    pos = pe(torch.zeros(1, 3, 2, 3))
    assert pos.shape == (1, 8, 2, 3)
    # pixel (row 1, col 2): y = 2, x = 3 (cumulative counts); dim_t = [1, 1, 100, 100]
    y, x = 2.0, 3.0
    expected = [math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100),
                math.sin(x), math.cos(x), math.sin(x / 100), math.cos(x / 100)]
    assert torch.allclose(pos[0, :, 1, 2], torch.tensor(expected), atol=1e-6)


def test_position_encoding_normalized_uses_pixel_centres():
    pe = PositionEmbeddingSine(num_pos_feats=2, normalize=True)
    pos = pe(torch.zeros(1, 1, 4, 2))
    # row 0 of 4: (1 - 0.5) / 4 * 2pi; column 1 of 2: (2 - 0.5) / 2 * 2pi
    y, x = 0.5 / 4 * 2 * math.pi, 1.5 / 2 * 2 * math.pi
    expected = torch.tensor([math.sin(y), math.cos(y), math.sin(x), math.cos(x)])
    assert torch.allclose(pos[0, :, 0, 1], expected, atol=1e-5)
    # a padded column is not counted
    mask = torch.zeros(1, 4, 2, dtype=torch.bool)
    mask[..., 1] = True
    assert torch.allclose(pe(torch.zeros(1, 1, 4, 2), mask)[0, 2, 0, 0], torch.tensor(math.sin(0.5 * 2 * math.pi)), atol=1e-5)


def test_position_encoding_rejects_scale_without_normalize():
    with pytest.raises(ValueError, match="normalize"):
        PositionEmbeddingSine(8, scale=1.0)


# --- Mask2Former decoder --------------------------------------------------------------------
def test_registry_and_output_shapes():
    assert "MultiScaleMaskedTransformerDecoder" in TRANSFORMER_DECODER_REGISTRY
    decoder = build(tiny_cfg())
    assert isinstance(decoder, MultiScaleMaskedTransformerDecoder)
    assert decoder.num_layers == 9  # DEC_LAYERS 10 = 9 layers + prediction on the queries
    x, mask_features = inputs()
    out = decoder(x, mask_features)
    assert out["pred_logits"].shape == (2, 6, 6)
    assert out["pred_masks"].shape == (2, 6, 16, 16)
    assert len(out["aux_outputs"]) == 9
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 6, 6) and aux["pred_masks"].shape == (2, 6, 16, 16)
    # the first aux output is the prediction on the learnable queries: same for every image
    first = out["aux_outputs"][0]["pred_logits"]
    assert torch.allclose(first[0], first[1])


def test_input_projection_only_when_widths_differ():
    assert num_params(build(tiny_cfg(), in_channels=16).input_proj) == 0
    assert num_params(build(tiny_cfg(), in_channels=24).input_proj) == 3 * (24 * 16 + 16)
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ = True
    assert num_params(build(cfg).input_proj) == 3 * (16 * 16 + 16)


def test_attention_mask_is_prediction_below_half_per_head():
    decoder = build(tiny_cfg())
    with torch.no_grad():  # mask embedding := e_0, so every predicted mask = mask_features[:, 0]
        for layer in decoder.mask_embed.layers:
            layer.weight.zero_()
            layer.bias.zero_()
        decoder.mask_embed.layers[-1].bias[0] = 1.0
    mask_features = torch.zeros(2, 16, 4, 4)
    mask_features[:, 0, :, :2] = 3.0   # left half foreground
    mask_features[:, 0, :, 2:] = -3.0  # right half background
    output = torch.zeros(6, 2, 16)
    _, masks, attn_mask = decoder.forward_prediction_heads(output, mask_features, (2, 2))
    assert torch.equal(masks[:, :, 0, 0], torch.full((2, 6), 3.0))
    assert attn_mask.shape == (2 * 2, 6, 4)  # (B * heads, Q, h * w)
    expected = torch.tensor([False, True, False, True])  # 2x2 level, row-major: right column masked
    assert torch.equal(attn_mask, expected.expand(4, 6, 4))


def test_fully_masked_query_attends_everywhere():
    """A query whose predicted mask is empty must not produce NaN (rows unmasked)."""
    decoder = build(tiny_cfg())
    with torch.no_grad():
        for layer in decoder.mask_embed.layers:
            layer.weight.zero_()
            layer.bias.zero_()
        decoder.mask_embed.layers[-1].bias[0] = 1.0
    x, _ = inputs()
    mask_features = torch.full((2, 16, 16, 16), -5.0)  # every mask empty everywhere
    out = decoder(x, mask_features)
    assert torch.isfinite(out["pred_logits"]).all()


def test_unknown_decoder_name_is_a_config_error():
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "Nope"
    with pytest.raises(ConfigError, match="TRANSFORMER_DECODER_NAME"):
        build_transformer_decoder(cfg, 16)


def test_extra_layer_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="EXTRA_SELF_ATTN_LAYERS"):
        build(tiny_cfg(EXTRA_SELF_ATTN_LAYERS=[9]))


# --- parameter budget (paper Tables 1 and 4) ----------------------------------------------
def test_mask2former_decoder_parameter_count():
    decoder = build(full_cfg(), in_channels=256)
    layers = 9 * (2 * ATTN_LAYER_256 + FFN_256)
    heads = LAYER_NORM_256 + (256 * 134 + 134) + 3 * (256 * 256 + 256)  # decoder_norm, class, mask MLP
    embeddings = 2 * 100 * 256 + 3 * 256  # query feat + pos, level embed
    assert num_params(decoder) == layers + heads + embeddings == 14_493_062


def test_maps_adds_two_projections_and_six_memory_layers():
    base = num_params(build(full_cfg(), in_channels=256))
    cfg = full_cfg()
    cfg.MODEL.MAPS.ENABLED = True
    maps = build(cfg, in_channels=256)
    assert num_params(maps) - base == 2 * PROJ_512 + 6 * ATTN_LAYER_256 == 1_844_736
    assert num_params(maps.memory_fusion.scene_proj) == PROJ_512
    assert num_params(maps.memory_fusion.layers["0"]) == ATTN_LAYER_256


@pytest.mark.parametrize("layers", [list(range(6)), list(range(9))])
def test_extra_self_attention_budget(layers):
    base = num_params(build(full_cfg(), in_channels=256))
    cfg = full_cfg()
    cfg.MODEL.MAPS.EXTRA_SELF_ATTN_LAYERS = layers
    assert num_params(build(cfg, in_channels=256)) - base == len(layers) * ATTN_LAYER_256


# --- memory disabled is exactly Mask2Former --------------------------------------------------
def test_enabled_and_disabled_share_initialisation():
    plain = dict(build(tiny_cfg(enabled=False), seed=3).named_parameters())
    maps = dict(build(tiny_cfg(enabled=True), seed=3).named_parameters())
    assert set(plain) < set(maps)
    assert all(name.startswith("memory_fusion.") for name in set(maps) - set(plain))
    for name, value in plain.items():
        assert torch.equal(value, maps[name]), name


@pytest.mark.parametrize("train", [False, True])
def test_all_padding_memory_gives_exactly_mask2former(train):
    plain = build(tiny_cfg(enabled=False)).train(train)
    maps = build(tiny_cfg(enabled=True)).train(train)
    x, mask_features = inputs()
    expected = plain(x, mask_features)
    got = maps(x, mask_features, memory=memory(all_padding=True))
    assert torch.isfinite(got["pred_masks"]).all()
    assert torch.equal(got["pred_logits"], expected["pred_logits"])
    assert torch.equal(got["pred_masks"], expected["pred_masks"])
    assert torch.equal(maps(x, mask_features, memory=None)["pred_masks"], expected["pred_masks"])
    # and real memory does change the prediction (so the equality above is not vacuous)
    with_memory = maps(x, mask_features, memory=memory())
    assert not torch.allclose(with_memory["pred_logits"], expected["pred_logits"])


def test_extra_self_attention_runs_in_its_layers_only():
    decoder = build(tiny_cfg(EXTRA_SELF_ATTN_LAYERS=[1, 4])).eval()
    assert sorted(decoder.extra_self_attention) == ["1", "4"]
    calls = []
    for name, layer in decoder.extra_self_attention.items():
        layer.register_forward_hook(lambda *_, name=name: calls.append(name))
    x, mask_features = inputs()
    out = decoder(x, mask_features)
    assert calls == ["1", "4"]
    # extra layers come after Mask2Former's modules: same shared init, different output
    plain = build(tiny_cfg()).eval()
    assert torch.equal(plain.query_feat.weight, decoder.query_feat.weight)
    assert not torch.allclose(plain(x, mask_features)["pred_logits"], out["pred_logits"])


def test_gradients_reach_memory_layers():
    decoder = build(tiny_cfg(enabled=True)).train()
    x, mask_features = inputs()
    out = decoder(x, mask_features, memory=memory())
    (out["pred_logits"].sum() + out["pred_masks"].mean()).backward()
    fusion = decoder.memory_fusion
    for module in (fusion.scene_proj, fusion.object_proj, fusion.layers["0"], fusion.layers["5"]):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.slow
def test_paper_size_decoder_and_criterion_train_with_every_augmentation():
    from maps.modeling.criterion import SetCriterion

    cfg = full_cfg()
    maps_cfg = cfg.MODEL.MAPS
    maps_cfg.ENABLED, maps_cfg.RANDOM_SAMPLING, maps_cfg.POOL_SIZE = True, True, 8
    maps_cfg.INPUT_MASKING_PROB, maps_cfg.LAYER_MASKING_PROB, maps_cfg.APPEND_QUERY_CLS = 0.5, 0.2, True
    decoder = build(cfg, in_channels=256).train()
    criterion = SetCriterion(cfg)
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(2, 256, s, s, generator=g) for s in (8, 16, 32)]
    mask_features = torch.randn(2, 256, 64, 64, generator=g)
    per_image = [
        {"scene": torch.randn(8, 512, generator=g), "object": torch.randn(30, 512, generator=g),
         "object_slot": torch.randint(0, 8, (30,), generator=g), "query_cls": torch.randn(512, generator=g)}
        for _ in range(2)
    ]
    targets = [
        {"labels": torch.randint(0, 133, (n,), generator=g), "masks": torch.rand(n, 256, 256, generator=g) > 0.7}
        for n in (3, 5)
    ]
    out = decoder(x, mask_features, memory=MemoryTokens.collate(per_image))
    losses = criterion(out, targets)
    assert len(losses) == 30
    total = sum(criterion.weight_dict[k] * v for k, v in losses.items())
    assert torch.isfinite(total)
    total.backward()
    assert decoder.memory_fusion.scene_proj.weight.grad is not None
    assert all(torch.isfinite(p.grad).all() for p in decoder.parameters() if p.grad is not None)
