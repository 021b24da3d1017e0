"""Multi-scale deformable attention and the two pixel decoders."""
from __future__ import annotations

import math

import pytest
import torch
from detectron2.layers import ShapeSpec

from maps.modeling.pixel_decoder import (
    BasePixelDecoder,
    MSDeformAttn,
    MSDeformAttnPixelDecoder,
    ms_deform_attn_core_pytorch,
)
from maps.modeling.pixel_decoder.msdeformattn import MSDeformAttnTransformerEncoder


def _bilinear_reference(img, x, y):
    """Value of img (D, H, W) at normalised (x, y), pixel centres at (j + 0.5) / W, zeros
    outside: the grid_sample(align_corners=False, padding_mode='zeros') convention, by hand."""
    d, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(d, dtype=img.dtype)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * img[:, yy, xx]
    return out


def _core_reference(value, shapes, locations, weights):
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(n, lq, m * d, dtype=value.dtype)
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                acc = torch.zeros(d, dtype=value.dtype)
                for lvl, (h, w) in enumerate(shapes):
                    img = value[b, starts[lvl]:starts[lvl + 1], head].T.reshape(d, h, w)
                    for p in range(num_points):
                        x, y = locations[b, q, head, lvl, p].tolist()
                        acc += weights[b, q, head, lvl, p] * _bilinear_reference(img, x, y)
                out[b, q, head * d:(head + 1) * d] = acc
    return out


def test_core_matches_explicit_bilinear_loop():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    n, m, d, lq, p = 2, 2, 3, 5, 3
    value = torch.randn(n, sum(h * w for h, w in shapes), m, d, generator=g, dtype=torch.float64)
    # include points outside [0, 1] to exercise the zero padding
    locations = torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(n, lq, m, len(shapes), p, generator=g, dtype=torch.float64)
    fast = ms_deform_attn_core_pytorch(value, shapes, locations, weights)
    slow = _core_reference(value, shapes, locations, weights)
    assert fast.shape == (n, lq, m * d)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_core_at_pixel_centre_reads_that_pixel():
    # one level 2x2, one head, D=1: the centre of pixel (row 1, col 0) is (0.25, 0.75)
    value = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    loc = torch.tensor([0.25, 0.75]).view(1, 1, 1, 1, 1, 2)
    out = ms_deform_attn_core_pytorch(value, [(2, 2)], loc, torch.ones(1, 1, 1, 1, 1))
    assert out.item() == pytest.approx(3.0)
    # half way between the two pixels of the top row, scaled by a weight of 0.5
    loc = torch.tensor([0.5, 0.25]).view(1, 1, 1, 1, 1, 2)
    out = ms_deform_attn_core_pytorch(value, [(2, 2)], loc, torch.full((1, 1, 1, 1, 1), 0.5))
    assert out.item() == pytest.approx(0.5 * 1.5)


def test_core_gradients_flow_to_values_locations_and_weights():
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 4), (2, 2)]
    value = torch.randn(1, 20, 2, 4, generator=g, requires_grad=True)
    loc = (torch.rand(1, 3, 2, 2, 2, 2, generator=g) * 0.8 + 0.1).requires_grad_()
    w = torch.rand(1, 3, 2, 2, 2, generator=g, requires_grad=True)
    ms_deform_attn_core_pytorch(value, shapes, loc, w).square().sum().backward()
    for t in (value, loc, w):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_msdeformattn_init_puts_points_on_rings_around_the_reference():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # head 0 looks right (+x), head 1 down (+y) after normalising by max |component|;
    # point i sits at distance i+1, the same on every level
    torch.testing.assert_close(bias[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[1, 1], torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]]),
                               atol=1e-6, rtol=0)
    assert attn.sampling_offsets.weight.abs().sum() == 0
    assert attn.attention_weights.weight.abs().sum() == 0


def test_msdeformattn_forward_shape_and_all_parameters_learn():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2)
    shapes = torch.tensor([[4, 4], [2, 2]])
    src = torch.randn(2, 20, 8)
    ref = MSDeformAttnTransformerEncoder.get_reference_points(shapes, src.device).expand(2, -1, -1, -1)
    out = attn(src, ref, src, shapes)
    assert out.shape == (2, 20, 8)
    out.square().sum().backward()
    for name, p in attn.named_parameters():
        # sampling offsets/attention weights start at zero weight, but their grads are not zero
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="spatial shapes"):
        attn(src[:, :19], ref[:, :19], src[:, :19], shapes)


def test_reference_points_are_pixel_centres():
    ref = MSDeformAttnTransformerEncoder.get_reference_points(torch.tensor([[1, 2], [2, 1]]), "cpu")
    assert ref.shape == (1, 4, 2, 2)
    expected = torch.tensor([[0.25, 0.5], [0.75, 0.5], [0.5, 0.25], [0.5, 0.75]])
    torch.testing.assert_close(ref[0, :, 0], expected)
    torch.testing.assert_close(ref[0, :, 1], expected)  # same point for every level


def _features(batch=2, size=64, channels=(8, 16, 32, 64)):
    g = torch.Generator().manual_seed(3)
    names = ["res2", "res3", "res4", "res5"]
    strides = [4, 8, 16, 32]
    feats = {n: torch.randn(batch, c, size // s, size // s, generator=g)
             for n, c, s in zip(names, channels, strides)}
    shapes = {n: ShapeSpec(channels=c, stride=s) for n, c, s in zip(names, channels, strides)}
    return feats, shapes


def test_msdeformattn_pixel_decoder_outputs_and_gradients():
    torch.manual_seed(0)
    feats, shapes = _features()
    dec = MSDeformAttnPixelDecoder(
        shapes, transformer_dropout=0.0, transformer_nheads=4, transformer_dim_feedforward=64,
        transformer_enc_layers=2, transformer_n_points=2, conv_dim=32, mask_dim=24, norm="GN",
        transformer_in_features=["res3", "res4", "res5"], common_stride=4)
    assert dec.num_fpn_levels == 1 and dec.transformer_in_features == ["res3", "res4", "res5"]
    for t in feats.values():
        t.requires_grad_()
    mask_features, enc, multi = dec.forward_features(feats)
    assert mask_features.shape == (2, 24, 16, 16)
    # lowest resolution first: res5 (2x2), res4 (4x4), res3 (8x8)
    assert [tuple(f.shape) for f in multi] == [(2, 32, 2, 2), (2, 32, 4, 4), (2, 32, 8, 8)]
    assert enc is multi[0]
    (mask_features.sum() + sum(f.sum() for f in multi)).backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert feats["res2"].grad.abs().sum() > 0 and feats["res5"].grad.abs().sum() > 0


def test_msdeformattn_pixel_decoder_rejects_unknown_encoder_feature():
    _, shapes = _features()
    with pytest.raises(ValueError, match="res6"):
        MSDeformAttnPixelDecoder(
            shapes, transformer_dropout=0.0, transformer_nheads=4, transformer_dim_feedforward=64,
            transformer_enc_layers=1, transformer_n_points=2, conv_dim=32, mask_dim=32, norm="GN",
            transformer_in_features=["res4", "res5", "res6"], common_stride=4)


def test_msdeformattn_pixel_decoder_r50_parameter_count():
    """Mask2Former's R50 pixel decoder, counted by hand (GN: 2*256 params each)."""
    shapes = {"res2": ShapeSpec(channels=256, stride=4), "res3": ShapeSpec(channels=512, stride=8),
              "res4": ShapeSpec(channels=1024, stride=16), "res5": ShapeSpec(channels=2048, stride=32)}
    dec = MSDeformAttnPixelDecoder(
        shapes, transformer_dropout=0.0, transformer_nheads=8, transformer_dim_feedforward=1024,
        transformer_enc_layers=6, transformer_n_points=4, conv_dim=256, mask_dim=256, norm="GN",
        transformer_in_features=["res3", "res4", "res5"], common_stride=4)
    input_proj = sum(c * 256 + 256 + 512 for c in (512, 1024, 2048))
    attn = (256 * 192 + 192) + (256 * 96 + 96) + 2 * (256 * 256 + 256)
    ffn = (256 * 1024 + 1024) + (1024 * 256 + 256)
    encoder = 6 * (attn + ffn + 2 * 512) + 3 * 256  # + level embeddings
    fpn = (256 * 256 + 512) + (9 * 256 * 256 + 512)  # adapter_1, layer_1 (no bias, GN)
    mask_features = 256 * 256 + 256
    expected = input_proj + encoder + fpn + mask_features
    assert expected == 6_035_904
    assert sum(p.numel() for p in dec.parameters()) == expected


def test_fpn_pixel_decoder_outputs_and_gradients():
    torch.manual_seed(0)
    feats, shapes = _features()
    dec = BasePixelDecoder(shapes, conv_dim=32, mask_dim=16, norm="GN")
    mask_features, enc, multi = dec.forward_features(feats)
    assert enc is None
    assert mask_features.shape == (2, 16, 16, 16)
    assert [tuple(f.shape) for f in multi] == [(2, 32, 2, 2), (2, 32, 4, 4), (2, 32, 8, 8)]
    mask_features.sum().backward()
    # the coarsest level reaches the mask features through the top-down path
    assert dec.layer_4.weight.grad.abs().sum() > 0
    assert set(dict(dec.named_children())) >= {"adapter_1", "layer_1", "layer_4", "mask_features"}
    assert not hasattr(dec, "adapter_4")  # the coarsest level has no lateral conv


def test_deformable_pixel_decoder_runs_in_fp32_under_autocast():
    """AMP (SOLVER.AMP) must not reach the deformable attention (Mask2Former disables it)."""
    torch.manual_seed(0)
    feats, shapes = _features(batch=1, size=64)
    dec = MSDeformAttnPixelDecoder(
        shapes, transformer_dropout=0.0, transformer_nheads=4, transformer_dim_feedforward=64,
        transformer_enc_layers=1, transformer_n_points=2, conv_dim=32, mask_dim=32, norm="GN",
        transformer_in_features=["res3", "res4", "res5"], common_stride=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.linear(torch.ones(1, 2), torch.ones(2, 2)).dtype == torch.bfloat16
        mask_features, _, multi = dec.forward_features({k: v.bfloat16() for k, v in feats.items()})
    assert mask_features.dtype == torch.float32 and all(f.dtype == torch.float32 for f in multi)
    ref_mask, _, _ = dec.forward_features({k: v.bfloat16().float() for k, v in feats.items()})
    torch.testing.assert_close(mask_features, ref_mask)
