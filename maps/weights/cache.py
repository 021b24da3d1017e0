"""The cache on disk: the table of pretrained files (:data:`PRETRAINED`), where each one is
cached, its manifest, and resolving a config value (a cache name or a path) to a file.

A leaf of the package: it imports no model code, so the encoders and the checkpointer can
resolve names through it."""
from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from maps.errors import MapsError


logger = logging.getLogger(__name__)

WEIGHTS_ENV = "MAPS_WEIGHTS"
MANIFEST = "manifest.json"
MODEL_KEY = "MODEL.WEIGHTS"
MEMORY_KEY = "MODEL.MAPS.MEMORY.WEIGHTS"
DENSE_KEY = "MODEL.MAPS.MEMORY.DENSE_WEIGHTS"
#: torchvision's ImageNet normalisation in 0-255 RGB, what R-50.pkl was trained with
TORCHVISION_PIXEL_MEAN = (123.675, 116.280, 103.530)
TORCHVISION_PIXEL_STD = (58.395, 57.120, 57.375)
_SUFFIX = {"pickle": ".pkl", "torch": ".pt", "torchscript": ".pt", "safetensors": ".safetensors"}


class WeightsError(MapsError):
    """A pretrained file is missing, unreadable, or does not fit the architecture."""


@dataclass(frozen=True)
class PretrainedWeight:
    """One pretrained file: what it is, who publishes it, and what maps loads it into."""

    name: str
    title: str
    library: str                   # detectron2 | open_clip | timm: who fetches and defines it
    source: str                    # what that library is asked for
    kind: str                      # resnet | clip | dino: the backbone it initialises
    arch: str                      # the architecture maps verifies it in
    formats: Tuple[str, ...]       # file formats accepted (maps.weights.files.detect_format)
    hosts: Tuple[str, ...]         # where the library downloads from (for the offline check)
    used_for: str = ""
    activation: Optional[str] = None        # CLIP MLP activation the file was trained with
    other_archs: Tuple[str, ...] = ()      # further archs it fits (same tensors)
    #: config keys the architecture must have for these weights to mean what they meant
    requires: Dict[str, Any] = field(default_factory=dict)

    @property
    def archs(self) -> Tuple[str, ...]:
        return (self.arch,) + self.other_archs


PRETRAINED: Dict[str, PretrainedWeight] = {w.name: w for w in (
    PretrainedWeight(
        name="r50-imagenet",
        title="ResNet-50, ImageNet (torchvision weights in detectron2's pickle format)",
        library="detectron2",
        source="detectron2://ImageNetPretrained/torchvision/R-50.pkl",
        kind="resnet", arch="build_resnet_backbone:R50", formats=("pickle",),
        hosts=("dl.fbaipublicfiles.com",),
        used_for="MODEL.WEIGHTS of every R50 run: Mask2Former and MAPS start from it (section 4.2)",
        requires={"MODEL.RESNETS.STRIDE_IN_1X1": False, "INPUT.FORMAT": "RGB",
                  "MODEL.PIXEL_MEAN": list(TORCHVISION_PIXEL_MEAN),
                  "MODEL.PIXEL_STD": list(TORCHVISION_PIXEL_STD)}),
    PretrainedWeight(
        name="clip-vit-b16-openai",
        title="CLIP ViT-B/16, OpenAI (QuickGELU)",
        library="open_clip", source="ViT-B-16-quickgelu:openai",
        kind="clip", arch="ViT-B-16-quickgelu",
        formats=("torchscript", "torch", "safetensors"),
        hosts=("huggingface.co", "openaipublic.azureedge.net"), activation="quick_gelu",
        used_for="MODEL.MAPS.MEMORY.WEIGHTS: CLS keys and scene memory (all tables), and the "
                 "CLIP dense extractors of Table 6 (CLIP grid, MaskCLIP, TiledCLIP: the same "
                 "file, no other)"),
    PretrainedWeight(
        name="dino-vit-b16",
        title="DINO ViT-B/16 (self-supervised, timm's vit_base_patch16_224.dino)",
        library="timm", source="vit_base_patch16_224.dino",
        kind="dino", arch="vit_base_patch16_224", formats=("torch", "safetensors"),
        hosts=("huggingface.co",),
        used_for="Table 6: DINO-CLS keys (row 2, MODEL.MAPS.MEMORY.WEIGHTS) and DINO dense "
                 "object memory (row 4, MODEL.MAPS.MEMORY.DENSE_WEIGHTS): the same file"),
)}

#: library URLs people may still write in a config, and the cache name that replaces them
_KNOWN_SOURCES = {"detectron2://ImageNetPretrained/torchvision/R-50.pkl": "r50-imagenet"}


def weights_dir() -> Path:
    """``$MAPS_WEIGHTS``, else the user cache folder (``$XDG_CACHE_HOME/maps/weights``,
    ``~/.cache/maps/weights`` on Linux)."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("maps")) / "weights"
    except ImportError:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        return Path(xdg).expanduser() / "maps" / "weights"


def get_weight(name: str) -> PretrainedWeight:
    try:
        return PRETRAINED[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(PRETRAINED), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise WeightsError(f"unknown pretrained weight '{name}'{hint}; known: "
                           f"{', '.join(PRETRAINED)}") from None


def is_weight_name(value: str) -> bool:
    return value in PRETRAINED


def _entry_dir(name: str) -> Path:
    return weights_dir() / name


def read_manifest(name: str) -> Optional[Dict[str, Any]]:
    """The manifest of ``name`` in the cache, or None when it is not there (or unreadable)."""
    import json

    path = _entry_dir(name) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("name") == name else None


@dataclass(frozen=True)
class CacheStatus:
    name: str
    path: Optional[Path]     # the cached file (None when there is none)
    present: bool
    verified: bool
    problem: str = ""        # why it is not usable, when it is not
    sha256: Optional[str] = None


def cache_status(name: str) -> CacheStatus:
    """Whether ``name`` is cached and still the file that was verified (size and mtime as
    recorded: a cheap check; ``maps weights verify`` re-hashes)."""
    get_weight(name)
    manifest = read_manifest(name)
    if manifest is None:
        return CacheStatus(name, None, False, False, "not in the cache")
    path = _entry_dir(name) / str(manifest.get("file", ""))
    try:
        st = path.stat()
    except OSError:
        return CacheStatus(name, path, False, False, f"{path} is missing")
    changed = st.st_size != manifest.get("size") or st.st_mtime_ns != manifest.get("mtime_ns")
    if not manifest.get("verified"):
        return CacheStatus(name, path, True, False, "not verified", manifest.get("sha256"))
    if changed:
        return CacheStatus(name, path, True, False, f"{path} changed since it was verified",
                           manifest.get("sha256"))
    return CacheStatus(name, path, True, True, "", manifest.get("sha256"))


def _fix_hint(name: str) -> str:
    return f"run `maps weights fetch {name}`, or `maps weights add {name} FILE` with a copy"


def resolve_weight(value: Optional[str]) -> Optional[str]:
    """A weights value of a config as a file: a cache name -> its verified file, an existing
    path -> itself, empty -> None (random initialisation).

    Raises:
        WeightsError: a name not (verified) in the cache, or a path that does not exist.
    """
    if not value:
        return None
    value = str(value)
    if is_weight_name(value):
        status = cache_status(value)
        if not status.verified:
            raise WeightsError(f"pretrained weight {value}: {status.problem} "
                               f"({weights_dir()}); {_fix_hint(value)}")
        return str(status.path)
    if os.path.isfile(value):
        return value
    raise WeightsError(f"weights {value}: no such file and no cached weight of that name "
                       f"(known: {', '.join(PRETRAINED)})")


def declared_activation(value: Optional[str]) -> Optional[str]:
    """The activation a cache name's file was trained with (None for paths and empties)."""
    return PRETRAINED[value].activation if value and is_weight_name(str(value)) else None


