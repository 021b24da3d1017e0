"""SSD-style photometric augmentation (``INPUT.COLOR_AUG_SSD`` of Mask2Former's ADE20K and
Cityscapes recipes), without OpenCV.

The augmentation draws its parameters once per image and returns a deterministic
:class:`ColorJitterTransform`, so detectron2's ``TransformList`` can apply it (pixels only:
geometry and labels are left unchanged).
"""
from __future__ import annotations

import numpy as np
from detectron2.data import transforms as T
from fvcore.transforms.transform import NoOpTransform, Transform
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

__all__ = ["ColorAugSSD", "ColorJitterTransform"]


class ColorJitterTransform(Transform):
    """Brightness shift, contrast scale, saturation scale and hue shift of an image.

    Each parameter at its neutral value (0, 1, 1, 0) leaves that aspect unchanged; contrast
    is applied before or after the HSV changes (``contrast_first``), as in SSD.
    """

    def __init__(self, brightness_delta: float, contrast_alpha: float, saturation_alpha: float,
                 hue_delta: float, contrast_first: bool, image_format: str):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        bgr = self.image_format == "BGR"
        x = img[..., ::-1] if bgr else img
        x = x.astype(np.float32) + self.brightness_delta
        if self.contrast_first:
            x = x * self.contrast_alpha
        if self.saturation_alpha != 1.0 or self.hue_delta != 0.0:
            hsv = rgb_to_hsv(np.clip(x, 0, 255) / 255.0)
            hsv[..., 0] = np.mod(hsv[..., 0] + self.hue_delta / 360.0, 1.0)
            hsv[..., 1] = np.clip(hsv[..., 1] * self.saturation_alpha, 0, 1)
            x = hsv_to_rgb(hsv) * 255.0
        if not self.contrast_first:
            x = x * self.contrast_alpha
        x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(x[..., ::-1] if bgr else x)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation

    def inverse(self) -> Transform:
        return NoOpTransform()  # photometric: nothing to undo geometrically


class ColorAugSSD(T.Augmentation):
    """Each photometric change happens with probability 1/2, with SSD's ranges:
    brightness +-32, contrast and saturation x[0.5, 1.5], hue +-18 degrees (OpenCV's 0-180
    hue scale, i.e. +-36 degrees of a 360 degree circle)."""

    def __init__(self, image_format: str, brightness_delta: float = 32,
                 contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta: float = 36):
        super().__init__()
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"ColorAugSSD supports RGB or BGR images, not {image_format!r}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        def maybe(sample, neutral):
            return sample() if np.random.rand() < 0.5 else neutral

        return ColorJitterTransform(
            brightness_delta=maybe(
                lambda: np.random.uniform(-self.brightness_delta, self.brightness_delta), 0.0),
            contrast_alpha=maybe(lambda: np.random.uniform(*self.contrast_range), 1.0),
            saturation_alpha=maybe(lambda: np.random.uniform(*self.saturation_range), 1.0),
            hue_delta=maybe(lambda: np.random.uniform(-self.hue_delta, self.hue_delta), 0.0),
            contrast_first=bool(np.random.rand() < 0.5),
            image_format=self.image_format,
        )
