"""SSD colour jitter: each parameter does what it says, on hand-computed pixels."""
from __future__ import annotations

import numpy as np
import pytest

from maps.data.augmentations import ColorAugSSD, ColorJitterTransform


def _jitter(img, fmt="RGB", **kw):
    params = dict(brightness_delta=0.0, contrast_alpha=1.0, saturation_alpha=1.0, hue_delta=0.0,
                  contrast_first=True, image_format=fmt) | kw
    return ColorJitterTransform(**params).apply_image(np.asarray(img, np.uint8).reshape(1, 1, 3))[0, 0]


def test_neutral_parameters_are_the_identity():
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    t = ColorJitterTransform(0.0, 1.0, 1.0, 0.0, True, "RGB")
    np.testing.assert_array_equal(t.apply_image(img), img)


def test_brightness_and_contrast():
    assert _jitter([100, 250, 0], brightness_delta=10).tolist() == [110, 255, 10]
    assert _jitter([100, 200, 10], contrast_alpha=2.0).tolist() == [200, 255, 20]
    # contrast before or after the brightness shift: (100 + 10) * 2 either way here
    assert _jitter([100, 0, 0], brightness_delta=10, contrast_alpha=2.0).tolist() == [220, 20, 20]


def test_saturation_zero_gives_grey_at_the_value():
    assert _jitter([200, 100, 50], saturation_alpha=0.0).tolist() == [200, 200, 200]


@pytest.mark.parametrize("fmt, red, green", [("RGB", [255, 0, 0], [0, 255, 0]),
                                              ("BGR", [0, 0, 255], [0, 255, 0])])
def test_hue_shift_of_120_degrees_turns_red_into_green(fmt, red, green):
    assert _jitter(red, fmt, hue_delta=120.0).tolist() == green


def test_augmentation_leaves_geometry_and_labels_alone():
    np.random.seed(0)
    img = np.random.randint(0, 256, (16, 16, 3)).astype(np.uint8)
    seg = np.arange(256, dtype=np.int64).reshape(16, 16)
    changed = 0
    for _ in range(20):
        t = ColorAugSSD("RGB").get_transform(img)
        out = t.apply_image(img)
        assert out.shape == img.shape and out.dtype == np.uint8
        np.testing.assert_array_equal(t.apply_segmentation(seg), seg)
        changed += int(not np.array_equal(out, img))
    assert changed >= 15  # each of 4 changes at p=1/2: identity 1 time in 16
