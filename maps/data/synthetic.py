"""A synthetic panoptic dataset whose scenes carry context, in COCO 2017 panoptic layout.

Why synthetic: no dataset can be downloaded here, yet every stage (memory build, retrieval,
training, PQ / AP / mIoU evaluation) must run on real files through the same code path COCO
takes. Why *context*: MAPS helps when retrieved images tell the model what kind of scene it is
looking at. So each image is one of a few scene types with its own stuff layout and its own
distribution over things, and two pairs of thing classes are drawn identically (``car`` /
``boat`` and ``dog`` / ``cat``): the pixels of such an object do not say which class it is,
the scene does. The ground cars and boats stand on is ambiguous too: ``road`` and ``water``
are painted alike (format version 2).

Format 3 makes streets and lakes *places* that look alike. A street and a lake are the same
picture: sky, a grass verge, then the look-alike ground with the look-alike hulls standing
wholly on it, among the same company (people, birds). There are 8 street places and 8 lake
places (:data:`_PLACES`); each has its own sky colour, grass colour and horizon, recurring in
all its images, and all 16 draw them from one distribution (the skies spread round the colour
wheel, dealt to streets and lakes at random). So the image says which *place* it is, not
what its ground and hulls are: a model without memory has to learn the 16 places from its
training images (or the rough colour rule the deal happened to leave, see _make_places).
Other pictures of the same place say it: in half of the street and lake images the hulls
give themselves away (a car's black wheels, a boat's white sail). Retrieval finds pictures
of the same place (its keys see the sky, the grass and the horizon), and their object tokens
carry the giveaways to the query image, whose own hulls may show none.

Layout written by :func:`generate_synthetic_dataset` (``<split>`` is ``train`` or ``val``)::

    DIR/<split>/<stem>.jpg              images
    DIR/panoptic_<split>.json           COCO panoptic JSON (+ "scene" in each images entry)
    DIR/panoptic_<split>/<stem>.png     segment id = R + 256 G + 256^2 B, 0 = void
    DIR/panoptic_semseg_<split>/<stem>.png   contiguous class ids, 255 = ignore
    DIR/instances_<split>.json          COCO detection JSON of thing segments (RLE masks)
    DIR/maps_synthetic.json             manifest (format version, seed, sizes); written last

Every image is drawn from its own RNG seeded by ``(seed, split, index)``, so the dataset is
the same bytes on every run and images could be drawn in any order or in parallel.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from maps.errors import DatasetError
from maps.io import MADE_MARKER, atomic_write_json, current_umask, made_by_maps, mark_made, remove_made

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "dataset_fingerprint",
    "SCENES",
    "SYNTHETIC_CATEGORIES",
    "SyntheticScene",
    "generate_synthetic_dataset",
    "render_scene",
    "image_rng",
    "read_manifest",
]

FORMAT_VERSION = 3  # 2: road and water painted alike; 3: streets and lakes are places alike
MANIFEST_NAME = "maps_synthetic.json"
SPLITS = ("train", "val")
# image ids of a split start here, so that train and val ids never collide whatever their sizes
_SPLIT_ID_OFFSET = {"train": 0, "val": 10_000_000}
_SPLIT_CODE = {"train": 0, "val": 1}

# --------------------------------------------------------------------------------------
# Categories. Ids are deliberately not contiguous (6 and 12-20 are unused) so that every
# consumer has to go through the metadata's dataset-id -> contiguous-id maps, as with COCO.
# Things come first, stuff after: the contiguous order is this list's order.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Thing:
    id: int
    name: str
    shape: str           # drawing routine; look-alike classes share it
    paint: Tuple[int, int, int]  # base colour of the drawing; look-alike classes share it
    color: Tuple[int, int, int]  # visualisation colour (distinct per class)
    supercategory: str
    place: str = "ground"  # "ground": stands on the lowest stuff band; "sky": flies in the top one
    aspect: float = 1.0    # width / height of the drawing's box
    #: what gives a look-alike away where a scene shows it (see _SceneType.reveal)
    giveaway: Optional[str] = None


_THINGS: Tuple[_Thing, ...] = (
    _Thing(1, "person", "person", (205, 150, 120), (220, 20, 60), "person", aspect=0.42),
    _Thing(2, "car", "hull", (190, 40, 45), (0, 0, 142), "vehicle", aspect=2.0, giveaway="wheels"),
    _Thing(3, "boat", "hull", (190, 40, 45), (0, 80, 100), "vehicle", aspect=2.0, giveaway="sail"),
    _Thing(4, "dog", "quadruped", (125, 85, 45), (255, 120, 0), "animal", aspect=1.5),
    _Thing(5, "cat", "quadruped", (125, 85, 45), (160, 90, 200), "animal", aspect=1.5),
    _Thing(7, "chair", "chair", (150, 100, 60), (200, 200, 0), "furniture", aspect=0.7),
    _Thing(8, "table", "table", (100, 60, 35), (120, 60, 0), "furniture", aspect=1.6),
    _Thing(9, "bottle", "bottle", (60, 160, 90), (0, 220, 160), "kitchen", aspect=0.35),
    _Thing(10, "tree", "tree", (35, 115, 35), (0, 140, 0), "plant", aspect=0.7),
    _Thing(11, "bird", "bird", (45, 45, 50), (90, 90, 255), "animal", place="sky", aspect=2.0),
)
_STUFF: Tuple[Tuple[int, str, Tuple[int, int, int]], ...] = (
    (21, "sky", (70, 130, 180)),
    (22, "wall", (102, 102, 156)),
    (23, "floor", (180, 165, 180)),
    (24, "road", (128, 64, 128)),
    (25, "water", (0, 60, 200)),
    (26, "grass", (107, 142, 35)),
)
# What a stuff class is painted with, where it differs from its visualisation colour: road
# and water are look-alike stuff (same paint, same ripple texture, see _stuff_texture), so
# that neither the ground under a car / boat nor the object itself gives its class away.
_LOOK_ALIKE_GROUND = (96, 84, 132)
_STUFF_PAINT: Dict[str, Tuple[int, int, int]] = {"road": _LOOK_ALIKE_GROUND,
                                                  "water": _LOOK_ALIKE_GROUND}

SYNTHETIC_CATEGORIES: List[Dict] = [
    {"id": t.id, "name": t.name, "isthing": 1, "color": list(t.color),
     "supercategory": t.supercategory} for t in _THINGS
] + [
    {"id": i, "name": n, "isthing": 0, "color": list(c), "supercategory": "stuff"}
    for i, n, c in _STUFF
]
_THING_BY_NAME = {t.name: t for t in _THINGS}
_STUFF_ID = {n: i for i, n, _ in _STUFF}
_CONTIGUOUS = {c["id"]: i for i, c in enumerate(SYNTHETIC_CATEGORIES)}

# --------------------------------------------------------------------------------------
# Scene types: stuff bands from top to bottom (name, where the band starts as a fraction of
# the height), the things that occur there (with weights), and how many.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SceneType:
    name: str
    bands: Tuple[Tuple[str, float], ...]
    things: Dict[str, float]
    count: Tuple[int, int]
    crowd_of: str  # class of the occasional iscrowd group
    weight: float = 1.0  # how often the scene is drawn, relative to the others
    #: ground things stand wholly inside the lowest band: nothing above the ground is near them
    grounded: bool = False
    #: the share of the scene's images whose look-alikes show what gives them away (a car's
    #: black wheels, a boat's white sail); in the others they are indistinguishable
    reveal: float = 0.0
    #: recurring places of this scene type (see _Place); 0: every image is a place of its own
    places: int = 0


_SCENE_TYPES: Tuple[_SceneType, ...] = (
    _SceneType("kitchen", (("wall", 0.0), ("floor", 0.58)),
               {"chair": 3, "table": 2.5, "bottle": 2.5, "cat": 2.5, "person": 0.5}, (3, 7), "bottle",
               weight=1.25),
    # street and lake are the same picture (format 3): sky, a grass verge, then the look-alike
    # ground (road / water) with look-alike hulls (car / boat) standing wholly on it, and the
    # same company (people, birds); each image is one of the type's places (its own sky,
    # grass and horizon, see _Place), and in half of them the hulls show their giveaways
    # (black wheels, white sails).
    _SceneType("street", (("sky", 0.0), ("grass", 0.3), ("road", 0.44)),
               {"car": 5, "person": 2, "bird": 1.5}, (2, 6), "person", weight=1.25,
               grounded=True, reveal=0.5, places=8),
    _SceneType("lake", (("sky", 0.0), ("grass", 0.3), ("water", 0.44)),
               {"boat": 5, "person": 2, "bird": 1.5}, (2, 6), "bird", weight=1.25,
               grounded=True, reveal=0.5, places=8),
    _SceneType("forest", (("sky", 0.0), ("grass", 0.32)),
               {"tree": 4, "bird": 2, "dog": 3, "person": 1}, (2, 7), "bird"),
)
SCENES: Tuple[str, ...] = tuple(s.name for s in _SCENE_TYPES)
_SCENE_BY_NAME = {s.name: s for s in _SCENE_TYPES}


@dataclass(frozen=True)
class _Place:
    """A place that recurs in many images: its own sky, grass and horizon in all of them.

    Street places and lake places draw these from one and the same distribution, so nothing
    about a place's looks says whether it is a street or a lake: a model has to remember
    each place, or look at other pictures of it."""

    scene: str
    index: int
    sky: Tuple[int, int, int]
    grass: Tuple[int, int, int]
    bands: Tuple[Tuple[str, float], ...]


def _hsv(h: float, s: float, v: float) -> Tuple[int, int, int]:
    import colorsys

    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _make_places(seed: int = 3) -> Dict[str, Tuple[_Place, ...]]:
    """The places of every scene type that has them, the same in every dataset. Their skies
    are spread evenly round the colour wheel and dealt to the types at random; grass colours
    and horizons are drawn alike for all. (The deal left lakes most of the yellow-to-cyan
    skies and streets most of the blue-to-pink ones, with 4 of the 16 places the other way
    round: a rough rule a model could learn, which Mask2Former does not within the demo's
    1000 iterations.)"""
    rng = np.random.default_rng(seed)
    kinds = [t for t in _SCENE_TYPES if t.places]
    total = sum(t.places for t in kinds)
    hues = rng.permutation(total) / total
    out: Dict[str, List[_Place]] = {t.name: [] for t in kinds}
    k = 0
    for t in kinds:
        for i in range(t.places):
            grass_top = float(rng.uniform(0.2, 0.36))
            bands = ((t.bands[0][0], 0.0), (t.bands[1][0], grass_top),
                     (t.bands[2][0], grass_top + float(rng.uniform(0.1, 0.16))))
            out[t.name].append(_Place(
                t.name, i, sky=_hsv(hues[k], rng.uniform(0.45, 0.7), rng.uniform(0.7, 0.92)),
                grass=_hsv(rng.uniform(0.17, 0.36), rng.uniform(0.45, 0.8), rng.uniform(0.4, 0.7)),
                bands=bands))
            k += 1
    return {name: tuple(places) for name, places in out.items()}


_PLACES = _make_places()
_SCENE_P = np.array([s.weight for s in _SCENE_TYPES], np.float64) / sum(s.weight for s in _SCENE_TYPES)

_CROWD_PROB = 0.08       # an image gets one iscrowd group with this probability
_VOID_LINE_PROB = 0.3    # an unlabeled "cable" across the image (void pixels)
_MIN_AREA_FRACTION = 0.0015  # segments smaller than this (after occlusion) become void
_NOISE_SIGMA = 6.0


@dataclass
class SyntheticScene:
    """One drawn image: pixels, panoptic ids (0 = void) and the COCO ``segments_info``."""

    scene: str
    image: np.ndarray                 # (H, W, 3) uint8 RGB
    panoptic: np.ndarray              # (H, W) int32 segment ids, 0 = void
    segments: List[Dict] = field(default_factory=list)  # id, category_id, iscrowd, bbox, area
    place: Optional[str] = None       # "<scene>-<k>" for an image of a recurring place


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The RNG of one image: a pure function of (seed, split, index)."""
    return np.random.default_rng([int(seed), _SPLIT_CODE[split], int(index)])


# ------------------------------------- drawing ----------------------------------------

class _Canvas:
    """Coordinate grids of an image, shared by all shape routines of one scene."""

    def __init__(self, size: int):
        self.size = size
        self.y, self.x = np.ogrid[0:size, 0:size]
        self.yf = self.y.astype(np.float32)
        self.xf = self.x.astype(np.float32)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((self.xf - cx) / max(rx, 0.5)) ** 2 + ((self.yf - cy) / max(ry, 0.5)) ** 2 <= 1.0

    def rect(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        return (self.xf >= x0) & (self.xf < x1) & (self.yf >= y0) & (self.yf < y1)

    def triangle(self, apex: Tuple[float, float], y_base: float, half_width: float) -> np.ndarray:
        """Isosceles triangle pointing up (half_width > 0) from apex to a horizontal base."""
        ax, ay = apex
        t = (self.yf - ay) / max(y_base - ay, 1e-3)  # 0 at apex, 1 at base
        return (t >= 0) & (t <= 1) & (np.abs(self.xf - ax) <= t * half_width)


def _shape_mask(cv: _Canvas, shape: str, x0: float, y0: float, w: float, h: float,
                flip: bool) -> np.ndarray:
    """Union of primitives drawing ``shape`` in the box (x0, y0, w, h)."""
    cx = x0 + w / 2
    if shape == "hull":  # car / boat: a body and a cabin
        m = cv.rect(x0, y0 + 0.45 * h, x0 + w, y0 + 0.9 * h)
        m |= cv.ellipse(cx, y0 + 0.45 * h, 0.28 * w, 0.42 * h)
        m |= cv.ellipse(x0 + 0.22 * w, y0 + 0.88 * h, 0.1 * w, 0.12 * h)
        m |= cv.ellipse(x0 + 0.78 * w, y0 + 0.88 * h, 0.1 * w, 0.12 * h)
        return m
    if shape == "person":
        m = cv.ellipse(cx, y0 + 0.12 * h, 0.3 * w, 0.12 * h)
        m |= cv.ellipse(cx, y0 + 0.45 * h, 0.5 * w, 0.24 * h)
        m |= cv.rect(cx - 0.35 * w, y0 + 0.6 * h, cx - 0.05 * w, y0 + h)
        m |= cv.rect(cx + 0.05 * w, y0 + 0.6 * h, cx + 0.35 * w, y0 + h)
        return m
    if shape == "quadruped":  # dog / cat
        hx = x0 + (0.12 * w if flip else 0.88 * w)
        m = cv.ellipse(cx, y0 + 0.5 * h, 0.4 * w, 0.25 * h)
        m |= cv.ellipse(hx, y0 + 0.28 * h, 0.14 * w, 0.2 * h)
        for fx in (0.22, 0.38, 0.62, 0.78):
            m |= cv.rect(x0 + (fx - 0.06) * w, y0 + 0.6 * h, x0 + (fx + 0.06) * w, y0 + h)
        return m
    if shape == "chair":
        bx = (x0, x0 + 0.28 * w) if flip else (x0 + 0.72 * w, x0 + w)
        m = cv.rect(bx[0], y0, bx[1], y0 + 0.6 * h)
        m |= cv.rect(x0, y0 + 0.48 * h, x0 + w, y0 + 0.64 * h)
        m |= cv.rect(x0, y0 + 0.6 * h, x0 + 0.22 * w, y0 + h)
        m |= cv.rect(x0 + 0.78 * w, y0 + 0.6 * h, x0 + w, y0 + h)
        return m
    if shape == "table":
        m = cv.rect(x0, y0, x0 + w, y0 + 0.26 * h)
        m |= cv.rect(x0 + 0.06 * w, y0, x0 + 0.2 * w, y0 + h)
        m |= cv.rect(x0 + 0.8 * w, y0, x0 + 0.94 * w, y0 + h)
        return m
    if shape == "bottle":
        m = cv.rect(x0, y0 + 0.35 * h, x0 + w, y0 + h)
        m |= cv.ellipse(cx, y0 + 0.35 * h, 0.5 * w, 0.12 * h)
        m |= cv.rect(cx - 0.18 * w, y0, cx + 0.18 * w, y0 + 0.3 * h)
        return m
    if shape == "tree":
        m = cv.triangle((cx, y0), y0 + 0.78 * h, 0.5 * w)
        m |= cv.rect(cx - 0.09 * w, y0 + 0.7 * h, cx + 0.09 * w, y0 + h)
        return m
    if shape == "bird":
        m = cv.ellipse(cx, y0 + 0.6 * h, 0.3 * w, 0.22 * h)
        m |= cv.ellipse(cx - 0.25 * w, y0 + 0.3 * h, 0.22 * w, 0.12 * h)
        m |= cv.ellipse(cx + 0.25 * w, y0 + 0.3 * h, 0.22 * w, 0.12 * h)
        return m
    raise ValueError(f"unknown shape {shape!r}")


def _giveaway(cv: _Canvas, giveaway: str, x0: float, y0: float, w: float, h: float
              ) -> Tuple[np.ndarray, Tuple[np.ndarray, Tuple[int, int, int]]]:
    """What tells a look-alike apart, for the box (x0, y0, w, h) of its drawing: (pixels added
    to its silhouette, (its part painted otherwise, that paint)). A car's wheels are black; a
    boat carries a white sail above its cabin."""
    if giveaway == "wheels":
        wheels = cv.ellipse(x0 + 0.22 * w, y0 + 0.88 * h, 0.11 * w, 0.14 * h)
        wheels |= cv.ellipse(x0 + 0.78 * w, y0 + 0.88 * h, 0.11 * w, 0.14 * h)
        return wheels, (wheels, (25, 25, 30))
    if giveaway == "sail":
        sail = cv.triangle((x0 + 0.5 * w, y0 - 0.6 * h), y0 + 0.2 * h, 0.22 * w)
        return sail, (sail, (235, 235, 225))
    raise ValueError(f"unknown giveaway {giveaway!r}")


def _stuff_texture(cv: _Canvas, scene: str, stuff: str, rng: np.random.Generator,
                   paint: Optional[Tuple[int, int, int]] = None) -> np.ndarray:
    """(H, W, 3) float colour field of one stuff class, with a scene-specific texture."""
    s = cv.size
    y, x = cv.yf / s, cv.xf / s
    base = np.array(paint or _STUFF_PAINT.get(stuff) or dict((n, c) for _, n, c in _STUFF)[stuff],
                    np.float32)
    shade = np.zeros((s, s), np.float32)
    if stuff == "sky":
        shade = shade + 60.0 * (0.5 - y)  # lighter towards the horizon
    elif stuff == "wall" and scene == "kitchen":  # tiles
        shade = shade + 35.0 * ((np.mod(cv.xf, 16) < 1.5) | (np.mod(cv.yf, 16) < 1.5))
    elif stuff == "wall":  # facades with windows
        shade = shade - 45.0 * ((np.mod(cv.xf + 5, 20) < 8) & (np.mod(cv.yf, 18) < 9))
    elif stuff == "floor":  # checkerboard
        shade = shade + 30.0 * ((np.floor(cv.xf / 12) + np.floor(cv.yf / 12)) % 2 - 0.5)
    elif stuff in ("road", "water"):  # look-alike ground: the same ripples on both
        phase = rng.uniform(0, 2 * np.pi)
        shade = shade + 25.0 * np.sin(2 * np.pi * 9 * y + phase + 3 * np.sin(2 * np.pi * x))
    elif stuff == "grass":
        shade = shade + 12.0 * np.sin(2 * np.pi * 23 * x) * np.cos(2 * np.pi * 17 * y)
        if scene == "forest":
            shade = shade - 25.0
    return base[None, None, :] + shade[..., None]


def _band_starts(bands: Sequence[Tuple[str, float]], size: int, rng: np.random.Generator,
                 jitter: float = 0.05) -> List[np.ndarray]:
    """Per band, the first row of the band at each column (wavy, jittered boundaries)."""
    xs = np.arange(size, dtype=np.float32) / size
    starts = []
    for i, (_, frac) in enumerate(bands):
        if i == 0:
            starts.append(np.zeros(size, np.float32))
            continue
        base = frac + rng.uniform(-jitter, jitter)
        amp = rng.uniform(0.0, 0.03)
        wave = amp * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * xs + rng.uniform(0, 2 * np.pi))
        starts.append((base + wave) * size)
    return starts


def render_scene(rng: np.random.Generator, size: int, scene: Optional[str] = None) -> SyntheticScene:
    """Draw one image of a random (or the given) scene type with its panoptic labels."""
    if scene is None:
        stype = _SCENE_TYPES[int(rng.choice(len(_SCENE_TYPES), p=_SCENE_P))]
    else:
        stype = _SCENE_BY_NAME[scene]
    place = None
    if stype.places:
        place = _PLACES[stype.name][int(rng.integers(stype.places))]
    canvas = _Scene(size, rng)
    ground_top, sky_bottom = canvas.draw_stuff(stype, place)
    canvas.draw_things(stype, ground_top, sky_bottom)
    if rng.random() < _VOID_LINE_PROB:
        canvas.draw_cable()
    noise = rng.standard_normal(canvas.image.shape, dtype=np.float32) * np.float32(_NOISE_SIGMA)
    image = canvas.image + noise
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    min_area = max(8, int(_MIN_AREA_FRACTION * size * size))
    segments = _segments_after_occlusion(canvas.pan, canvas.info, min_area)
    return SyntheticScene(stype.name, image, canvas.pan, segments,
                          None if place is None else f"{place.scene}-{place.index}")


class _Scene:
    """The image and panoptic ids being drawn; later drawings occlude earlier ones."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng, self.cv = size, rng, _Canvas(size)
        self.image = np.zeros((size, size, 3), np.float32)
        self.pan = np.zeros((size, size), np.int32)
        self.info: Dict[int, Tuple[int, int]] = {}  # segment id -> (category id, iscrowd)
        self._instances: Dict[int, int] = {}

    def draw_stuff(self, stype: _SceneType, place: Optional[_Place] = None) -> Tuple[float, float]:
        """Stuff bands, each overwriting the rows below its wavy start (a place's own bands,
        sky and grass, barely jittered); returns where the lowest band begins at its highest
        and where the second band begins at its lowest."""
        bands = place.bands if place is not None else stype.bands
        starts = _band_starts(bands, self.size, self.rng, jitter=0.015 if place is not None else 0.05)
        paints = {"sky": place.sky, "grass": place.grass} if place is not None else {}
        for (stuff, _), start in zip(bands, starts):
            m = self.cv.yf >= start[None, :]
            texture = _stuff_texture(self.cv, stype.name, stuff, self.rng, paints.get(stuff))
            np.copyto(self.image, texture, where=m[..., None])
            sid = _STUFF_ID[stuff] * 1000
            self.pan[m] = sid
            self.info[sid] = (_STUFF_ID[stuff], 0)
        return float(starts[-1].max()), float(starts[1].min())

    def draw_things(self, stype: _SceneType, ground_top: float, sky_bottom: float) -> None:
        """The scene's things; with probability ``_CROWD_PROB`` one crowd group among them."""
        rng = self.rng
        names = list(stype.things)
        p = np.array([stype.things[n] for n in names], np.float64)
        p /= p.sum()
        n_things = int(rng.integers(stype.count[0], stype.count[1] + 1))
        crowd_at = int(rng.integers(0, n_things + 1)) if rng.random() < _CROWD_PROB else -1
        reveal = bool(rng.random() < stype.reveal) if stype.reveal > 0 else False
        for k in range(n_things + 1):
            if k == crowd_at:  # several small instances of one class, annotated as one segment
                thing = _THING_BY_NAME[stype.crowd_of]
                mask = np.zeros((self.size, self.size), bool)
                for _ in range(int(rng.integers(4, 8))):
                    box = self._place(thing, (0.07, 0.12), ground_top, sky_bottom, stype.grounded)
                    mask |= _shape_mask(self.cv, thing.shape, *box, flip=bool(rng.integers(2)))
                self._paint(mask, thing, iscrowd=1)
            elif k < n_things:
                thing = _THING_BY_NAME[names[int(rng.choice(len(names), p=p))]]
                scale = (0.06, 0.12) if thing.place == "sky" else (0.15, 0.38)
                box = self._place(thing, scale, ground_top, sky_bottom, stype.grounded)
                mask = _shape_mask(self.cv, thing.shape, *box, flip=bool(rng.integers(2)))
                detail = None
                if reveal and thing.giveaway:
                    extra, detail = _giveaway(self.cv, thing.giveaway, *box)
                    mask |= extra
                self._paint(mask, thing, iscrowd=0, detail=detail)

    def draw_cable(self) -> None:
        """An unlabeled dark line across the image: void pixels."""
        rng, size, cv = self.rng, self.size, self.cv
        y_at = rng.uniform(0.1, 0.9) * size + rng.uniform(-0.15, 0.15) * size * (cv.xf / size - 0.5)
        cable = np.abs(cv.yf - y_at) < rng.uniform(0.6, 1.4)
        np.copyto(self.image, np.float32(20.0), where=cable[..., None])
        self.pan[cable] = 0

    def _place(self, thing: _Thing, scale: Tuple[float, float], ground_top: float,
               sky_bottom: float, grounded: bool = False) -> Tuple[float, float, float, float]:
        """Box (x0, y0, w, h): birds in the sky; others stand in the lowest band, bigger when
        lower in the image (closer); ``grounded``: wholly inside that band."""
        rng, size = self.rng, self.size
        h = rng.uniform(*scale) * size
        if thing.place == "sky":
            y0 = rng.uniform(0, max(sky_bottom - h, 1.0))
        else:
            y1 = rng.uniform(ground_top + 0.15 * (size - ground_top), size + 0.1 * h)
            h *= 0.7 + 0.6 * (y1 / size)
            if grounded:  # the top stays below the band's highest point
                h = min(h, y1 - ground_top - 1)
            y0 = y1 - h
        w = thing.aspect * h
        return rng.uniform(-0.2 * w, size - 0.8 * w), y0, w, h

    def _paint(self, mask: np.ndarray, thing: _Thing, iscrowd: int,
               detail: Optional[Tuple[np.ndarray, Tuple[int, int, int]]] = None) -> None:
        if not mask.any():
            return
        colour = np.array(thing.paint, np.float32) + self.rng.uniform(-12, 12, 3).astype(np.float32)
        shade = 18.0 * (self.cv.yf - self.size / 2) / self.size  # slight vertical shading, (H, 1)
        np.copyto(self.image, colour[None, None, :] + shade[..., None], where=mask[..., None])
        if detail is not None:  # the giveaway, painted over its part of the object
            part, paint = detail
            np.copyto(self.image, np.array(paint, np.float32)[None, None, :] + shade[..., None],
                      where=(part & mask)[..., None])
        self._instances[thing.id] = self._instances.get(thing.id, 0) + 1
        sid = thing.id * 1000 + self._instances[thing.id]
        self.pan[mask] = sid
        self.info[sid] = (thing.id, iscrowd)


def _segments_after_occlusion(pan: np.ndarray, info: Dict[int, Tuple[int, int]],
                              min_area: int) -> List[Dict]:
    """COCO ``segments_info`` of what is visible; segments under ``min_area`` become void (0).

    Mutates ``pan`` in place for the removed segments.
    """
    ids, counts = np.unique(pan, return_counts=True)
    segments = []
    for sid, area in zip(ids.tolist(), counts.tolist()):
        if sid == 0:
            continue
        if area < min_area:
            pan[pan == sid] = 0
            continue
        m = pan == sid
        ys, xs = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        x0, y0 = int(xs[0]), int(ys[0])
        cat, iscrowd = info[sid]
        segments.append({
            "id": int(sid), "category_id": int(cat), "iscrowd": int(iscrowd),
            "bbox": [x0, y0, int(xs[-1]) - x0 + 1, int(ys[-1]) - y0 + 1], "area": int(area),
        })
    return segments


# ------------------------------------- writing ----------------------------------------

def _id2rgb(pan: np.ndarray) -> np.ndarray:
    rgb = np.empty(pan.shape + (3,), np.uint8)
    rgb[..., 0] = pan % 256
    rgb[..., 1] = (pan // 256) % 256
    rgb[..., 2] = (pan // (256 * 256)) % 256
    return rgb


def _semantic(pan: np.ndarray, segments: Sequence[Dict]) -> np.ndarray:
    """Contiguous class ids, 255 = void (crowd segments keep their class, as in Mask2Former)."""
    sem = np.full(pan.shape, 255, np.uint8)
    for s in segments:
        sem[pan == s["id"]] = _CONTIGUOUS[s["category_id"]]
    return sem


def _encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _write_image(root: Path, split: str, index: int, seed: int, size: int) -> Dict:
    """Draw and write the files of one image; return its JSON entries (no file is shared)."""
    from pycocotools import mask as mask_util

    s = render_scene(image_rng(seed, split, index), size)
    image_id = _SPLIT_ID_OFFSET[split] + index + 1
    stem = f"{image_id:012d}"
    (root / split / f"{stem}.jpg").write_bytes(_encode(s.image, "JPEG", quality=92))
    (root / f"panoptic_{split}" / f"{stem}.png").write_bytes(_encode(_id2rgb(s.panoptic), "PNG"))
    (root / f"panoptic_semseg_{split}" / f"{stem}.png").write_bytes(
        _encode(_semantic(s.panoptic, s.segments), "PNG"))
    instances = []
    for seg in s.segments:
        if seg["category_id"] not in _THING_IDS:
            continue
        rle = mask_util.encode(np.asfortranarray((s.panoptic == seg["id"]).astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        instances.append({"image_id": image_id, "category_id": seg["category_id"],
                          "segmentation": rle, "area": seg["area"], "bbox": list(seg["bbox"]),
                          "iscrowd": seg["iscrowd"]})
    return {
        "image": {"id": image_id, "file_name": f"{stem}.jpg", "height": size, "width": size,
                  "scene": s.scene, **({"place": s.place} if s.place else {})},
        "annotation": {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": s.segments},
        "instances": instances,
    }


_THING_IDS = frozenset(t.id for t in _THINGS)


def _write_split(root: Path, split: str, n: int, seed: int, size: int, workers: int,
                 progress: Callable[[Iterator], Iterator]) -> Dict[str, int]:
    for d in (split, f"panoptic_{split}", f"panoptic_semseg_{split}"):
        (root / d).mkdir(parents=True, exist_ok=True)
    jobs = range(n)
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            entries = list(progress(pool.map(_write_image, [root] * n, [split] * n, jobs,
                                             [seed] * n, [size] * n, chunksize=16)))
    else:
        entries = [_write_image(root, split, i, seed, size) for i in progress(iter(jobs))]

    info = {"description": f"maps synthetic scenes, {split} split", "version": str(FORMAT_VERSION),
            "seed": seed}
    cats = [dict(c) for c in SYNTHETIC_CATEGORIES]
    panoptic = {"info": info, "licenses": [], "scenes": list(SCENES),
                "images": [e["image"] for e in entries],
                "annotations": [e["annotation"] for e in entries], "categories": cats}
    instances = [a for e in entries for a in e["instances"]]
    for i, a in enumerate(instances):
        a["id"] = i + 1
    detection = {"info": info, "licenses": [], "images": [e["image"] for e in entries],
                 "annotations": instances,
                 "categories": [{k: c[k] for k in ("id", "name", "supercategory")}
                                for c in cats if c["isthing"]]}
    atomic_write_json(root / f"panoptic_{split}.json", panoptic, indent=None)
    atomic_write_json(root / f"instances_{split}.json", detection, indent=None)
    return {"images": n, "segments": sum(len(e["annotation"]["segments_info"]) for e in entries)}


def generate_synthetic_dataset(
    out: Union[str, os.PathLike],
    num_train: int = 1000,
    num_val: int = 200,
    size: int = 128,
    seed: int = 0,
    *,
    overwrite: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Write the dataset to ``out`` atomically and return its path.

    The files are built in a temporary sibling directory which is renamed to ``out`` only
    when complete (manifest last), so a crash never leaves a dataset that looks whole. An
    existing ``out`` is refused unless ``overwrite``; it is then replaced in one rename, and
    only if it is a dataset maps wrote (its ``.maps-made.json`` marker) or an empty folder:
    anything else at ``out`` is never deleted. The new folder is marked as a ``dataset`` with
    its :func:`dataset_fingerprint`.
    """
    out = Path(out).expanduser().absolute()
    if num_train < 1 or num_val < 1:
        raise DatasetError(f"{out}: --train and --val must be at least 1 (got {num_train}, {num_val})")
    if size < 32:
        raise DatasetError(f"{out}: --size must be at least 32 pixels (got {size})")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise DatasetError(f"{out}: already exists; pass --overwrite to replace it")
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    mark_made(tmp, "dataset")  # so that a failure below removes it through remove_made
    try:
        counts = {}
        for split, n in (("train", num_train), ("val", num_val)):
            counts[split] = _write_split(tmp, split, n, seed, size, workers,
                                         _progress(progress, n, f"synthetic {split}"))
        manifest = {
            "format": "maps-synthetic-panoptic", "version": FORMAT_VERSION, "seed": seed,
            "size": size, "splits": counts, "scenes": list(SCENES),
            "categories": SYNTHETIC_CATEGORIES,
        }
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
        mark_made(tmp, "dataset", fingerprint=_fingerprint_of(manifest))
        _grant_umask_permissions(tmp)
        if out.is_dir() and made_by_maps(out, "dataset") is None:
            os.rmdir(out)  # the empty folder _check_replaceable allowed (rmdir refuses any other)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
            os.replace(out, old / "d")
            os.replace(tmp, out)
            remove_made(old / "d", "dataset")
            os.rmdir(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        if tmp.exists():
            remove_made(tmp, "dataset")
        raise
    return out


def _check_replaceable(out: Path) -> None:
    """Refuse, before any work, to replace what maps did not write at ``out``."""
    if out.is_symlink():
        raise DatasetError(f"{out} is a symbolic link: not replacing it")
    if not out.exists():
        return
    if not out.is_dir():
        raise DatasetError(f"{out} is a file, not a dataset folder: not replacing it")
    if made_by_maps(out, "dataset") is None and any(out.iterdir()):
        raise DatasetError(f"{out} has no maps dataset marker ({MADE_MARKER}): not deleting it; "
                           "remove it yourself if it is stale, or choose another --out")


def _fingerprint_of(manifest: Dict) -> str:
    import hashlib

    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def dataset_fingerprint(root: Union[str, os.PathLike]) -> str:
    """What identifies a synthetic dataset's content: a hash of its manifest (the generator
    draws the same bytes from the same manifest). Products built from a dataset (memory,
    runs) record it, so that they can be told stale when the dataset is regenerated."""
    return _fingerprint_of(read_manifest(root))


def _grant_umask_permissions(root: Path) -> None:
    """Give ``root`` and its JSONs the umask's usual modes.

    ``mkdtemp`` / ``mkstemp`` create 0700 / 0600 entries; a dataset is shared between users
    and Slurm jobs, so it gets the modes a plain ``mkdir`` / ``open`` would have given.
    """
    umask = current_umask()
    os.chmod(root, 0o777 & ~umask)
    for path in root.glob("*.json"):
        os.chmod(path, 0o666 & ~umask)


def _progress(enabled: bool, total: int, desc: str) -> Callable[[Iterator], Iterator]:
    if not enabled:
        return lambda it: it
    from tqdm import tqdm

    return lambda it: tqdm(it, total=total, desc=desc, unit="img", dynamic_ncols=True)


def read_manifest(root: Union[str, os.PathLike]) -> Dict:
    """The manifest of a synthetic dataset, checked for format and version."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise DatasetError(f"{path}: manifest not found; expected a dataset written by "
                           f"`maps data synth --out {root}`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable manifest ({e})") from None
    if manifest.get("format") != "maps-synthetic-panoptic" or manifest.get("version") != FORMAT_VERSION:
        raise DatasetError(f"{path}: expected format maps-synthetic-panoptic version {FORMAT_VERSION}, "
                           f"found {manifest.get('format')!r} version {manifest.get('version')!r}")
    return manifest
