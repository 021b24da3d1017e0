"""Encoders (tile layout, shapes, determinism) and mask pooling against hand-computed values."""
import numpy as np
import pytest
import torch

from maps.errors import ConfigError
from maps.memory.encoders import (build_dense_encoder, build_key_encoder, same_identity,
                                  tile_layout, tiled_size)
from maps.memory.pooling import mask_pool, pool_segments


@pytest.mark.parametrize("hw, resized, rows, cols", [
    ((300, 517), (448, 768), [0, 224], [0, 224, 448, 544]),
    ((448, 448), (448, 448), [0, 224], [0, 224]),
    ((200, 1000), (448, 2240), [0, 224], [0, 224, 448, 672, 896, 1120, 1344, 1568, 1792, 2016]),
])
def test_tiledclip_layout(hw, resized, rows, cols):
    H, W = tiled_size(*hw)
    assert (H, W) == resized
    layout = tile_layout(H, W)
    assert sorted({t for t, _, _, _ in layout}) == rows
    assert sorted({l for _, l, _, _ in layout}) == cols
    # the kept parts of the tiles cover every grid cell exactly once
    cover = np.zeros((H // 16, W // 16), int)
    for t, l, kt, kl in layout:
        assert t <= kt < t + 224 and l <= kl < l + 224
        cover[kt // 16:(t + 224) // 16, kl // 16:(l + 224) // 16] += 1
    assert (cover == 1).all()


def test_tiled_size_tall_image():
    assert tiled_size(1000, 200) == (2240, 448)
    assert tiled_size(450, 400) == (512, 448)  # 504 rounds to the nearest multiple of 16


def test_dense_encoder_shapes_and_stitching():
    images = [np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)
              for i, (h, w) in enumerate([(300, 517), (448, 448), (200, 1000)])]
    enc = build_dense_encoder("tiledclip", "ViT-Tiny-16", seed=1)
    maps = enc.encode(images)
    assert [tuple(m.shape) for m in maps] == [(64, 28, 48), (64, 28, 28), (64, 28, 140)]
    # a 448x448 image is exactly 4 tiles: its map is the 4 tile grids side by side
    x = images[1]
    tiles = [x[t:t + 224, l:l + 224] for t in (0, 224) for l in (0, 224)]
    grid = build_dense_encoder("clip", "ViT-Tiny-16", seed=1).encode(tiles)
    torch.testing.assert_close(maps[1][:, :14, 14:], grid[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(maps[1][:, 14:, :14], grid[2], atol=1e-4, rtol=1e-4)
    for name in ("clip", "maskclip"):
        assert tuple(build_dense_encoder(name, "ViT-Tiny-16").encode(images)[0].shape) == (64, 14, 14)
    assert tuple(build_dense_encoder("dino", "vit_tiny2_patch16_224").encode(images[:1])[0].shape) \
        == (192, 14, 14)


def test_key_encoder_unit_norm_deterministic_and_identity():
    im = [np.random.default_rng(0).integers(0, 255, (120, 90, 3), dtype=np.uint8)]
    a = build_key_encoder("clip", "ViT-Tiny-32", seed=5)
    k1 = a.encode(im)
    assert k1.shape == (1, 64)
    torch.testing.assert_close(k1.norm(dim=1), torch.ones(1))
    # same seed -> same weights (a fresh backbone, not the cached one)
    from maps.memory import encoders
    encoders._backbone_cache.clear()
    b = build_key_encoder("clip", "ViT-Tiny-32", seed=5)
    torch.testing.assert_close(b.encode(im), k1)
    c = build_key_encoder("clip", "ViT-Tiny-32", seed=6)
    assert not torch.allclose(c.encode(im), k1)
    assert same_identity(a.identity, b.identity) and not same_identity(a.identity, c.identity)
    assert c.identity["seed"] == 6 and c.identity["weights_sha256"] is None


def test_key_encoder_loads_local_weights(tmp_path):
    a = build_key_encoder("clip", "ViT-Tiny-32", seed=11)
    path = tmp_path / "w.pt"
    torch.save({"visual." + k: v for k, v in a.backbone.visual.state_dict().items()}, path)
    b = build_key_encoder("clip", "ViT-Tiny-32", weights=str(path), seed=0)
    im = [np.full((64, 64, 3), 100, np.uint8)]
    torch.testing.assert_close(b.encode(im), a.encode(im))
    assert len(b.identity["weights_sha256"]) == 64 and b.identity["seed"] is None


def test_unknown_encoder_names_fail_clearly():
    with pytest.raises(ConfigError, match="unknown dense encoder 'nope'"):
        build_dense_encoder("nope")
    with pytest.raises(ConfigError, match="unknown CLIP architecture 'ViT-Q-99'"):
        build_key_encoder("clip", "ViT-Q-99")


def test_mask_pool_hand_computed():
    # bilinear 2x2 -> 4x4 (align_corners=False) samples rows/cols at 0, .25, .75, 1,
    # so the upsampled value at (y, x) of F = [[0, 1], [2, 3]] is 2 ry + rx.
    f = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    m = torch.zeros(2, 4, 4, dtype=torch.bool)
    m[0, :2, :2] = True          # values 0, .25, .5, .75 -> mean .375
    m[1, 3, :] = True            # bottom row: 2 + {0, .25, .75, 1} -> mean 2.5
    torch.testing.assert_close(mask_pool(f, m), torch.tensor([[0.375], [2.5]]))


def test_pool_segments_against_naive_resize():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(6, 5, 7, generator=g)
    seg = np.random.default_rng(0).integers(1, 4, (33, 41))
    tokens, areas = pool_segments(f, seg, [1, 3, 9])
    up = torch.nn.functional.interpolate(f[None], size=(33, 41), mode="bilinear",
                                         align_corners=False)[0]
    for i, sid in enumerate([1, 3]):
        m = torch.from_numpy(seg == sid)
        torch.testing.assert_close(tokens[i], up[:, m].mean(1), atol=1e-5, rtol=1e-5)
        assert areas[i] == (seg == sid).sum()
    assert areas[2] == 0 and torch.equal(tokens[2], torch.zeros(6))
