"""The cache of pretrained files the paper's experiments start from.

The table of contents is :data:`PRETRAINED` (timm style: one named entry per file): the
ImageNet ResNet-50 that Mask2Former and MAPS train from, OpenAI's CLIP ViT-B/16 (keys, scene
memory and every CLIP dense extractor of Table 6) and DINO's ViT-B/16 (Table 6 rows 2 and 4).
Configs name a file by its cache name (``MODEL.WEIGHTS: r50-imagenet``); the cache maps the
name to one verified file under ``$MAPS_WEIGHTS`` (default ``~/.cache/maps/weights``, XDG
aware), laid out as::

    <cache>/<name>/<name>.<pkl|pt|safetensors>   the file, as the library publishes it
    <cache>/<name>/manifest.json                  name, sha256, size, source, verified, time

Files get there by ``maps weights fetch`` (each library's own download: detectron2's
PathManager, open_clip's pretrained tags, timm's hub) or ``maps weights add NAME FILE`` (a
copy made elsewhere). Either way the file is hashed and loaded into the architecture maps
builds (keys, shapes, activation) before it is admitted; a file that fails is refused and
nothing is left behind. Files are read as data (:mod:`maps.weights.files`).

Modules: ``cache`` (this table, the files on disk, names to paths: a leaf, imported by the
encoders and the checkpointer), ``files`` (reading weight files as data), ``verify``
(admitting, re-verifying and fetching files: loads them into maps' architectures) and
``runs`` (what a run needs). The helpers for runs (:mod:`maps.weights.runs`): :func:`weights_needed`, :func:`check_weights` (one fix-it line per
missing file), :func:`resolve_weight`, :func:`resolve_config_weights` (MODEL.WEIGHTS as a
path for detectron2's checkpointer) and :func:`weights_record` (what a run started from).
"""
from maps.weights.cache import (
    PRETRAINED,
    CacheStatus,
    PretrainedWeight,
    WeightsError,
    cache_status,
    declared_activation,
    get_weight,
    is_weight_name,
    read_manifest,
    resolve_weight,
    weights_dir,
)

__all__ = ["PRETRAINED", "CacheStatus", "PretrainedWeight", "WeightsError", "cache_status",
           "declared_activation", "get_weight", "is_weight_name", "read_manifest", "resolve_weight",
           "weights_dir"]
