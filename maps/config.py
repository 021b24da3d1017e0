"""Config keys of Mask2Former and MAPS on detectron2's CfgNode.

One place declares every key the library reads (detectron2 style): modules take plain
arguments through ``@configurable`` / ``from_config`` and never invent keys of their own.
Mask2Former's keys keep the names of the original implementation so its config files load
unchanged; MAPS's keys live under ``MODEL.MAPS``.

Config files are data: :func:`merge_config_file` reads a file and its ``_BASE_`` chain with
``yaml.safe_load`` only (detectron2's own ``merge_from_file`` defaults to an unsafe load, where
a ``!!python/object/apply`` tag runs code), and :func:`check_maps_values` holds the range
checks of the MAPS keys that the registry, the sweeps and ``maps train`` all apply.

detectron2 (and torch) are imported inside the functions: the registry imports this module
and must stay cheap for ``maps list``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Tuple

from maps.errors import ConfigError
from maps.io import load_yaml

if TYPE_CHECKING:
    from detectron2.config import CfgNode as CN

#: key encoders (CLS keys and scene values) and dense extractors (object values) of Table 6
KEY_ENCODERS = ("clip", "dino")
DENSE_EXTRACTORS = ("clip", "dino", "maskclip", "tiledclip")


def add_maskformer2_config(cfg: CN) -> None:
    """Mask2Former's keys, with the defaults of the original ``add_maskformer2_config``."""
    from detectron2.config import CfgNode as CN

    cfg.INPUT.DATASET_MAPPER_NAME = "coco_panoptic_lsj"
    cfg.INPUT.COLOR_AUG_SSD = False
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    cfg.INPUT.SIZE_DIVISIBILITY = -1
    # large-scale jitter (COCO recipe)
    cfg.INPUT.IMAGE_SIZE = 1024
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0

    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Mask2Former's "WarmupPolyLR" (Cityscapes recipe): lr * (1 - iter / max_iter) ** power
    cfg.SOLVER.POLY_LR_POWER = 0.9
    cfg.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0
    # learning-rate multiplier of the MAPS memory layers (parameters named *memory*)
    cfg.SOLVER.MEMORY_MULTIPLIER = 1.0

    cfg.MODEL.MASK_FORMER = CN()
    mf = cfg.MODEL.MASK_FORMER
    mf.DEEP_SUPERVISION = True
    mf.NO_OBJECT_WEIGHT = 0.1
    mf.CLASS_WEIGHT = 2.0
    mf.DICE_WEIGHT = 5.0
    mf.MASK_WEIGHT = 5.0
    mf.NHEADS = 8
    mf.DROPOUT = 0.0
    mf.DIM_FEEDFORWARD = 2048
    mf.ENC_LAYERS = 0
    # 9 decoder layers + the prediction on the learnable queries (see DESIGN.md traps)
    mf.DEC_LAYERS = 10
    mf.PRE_NORM = False
    mf.HIDDEN_DIM = 256
    mf.NUM_OBJECT_QUERIES = 100
    mf.TRANSFORMER_IN_FEATURE = "multi_scale_pixel_decoder"
    mf.ENFORCE_INPUT_PROJ = False
    mf.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    mf.SIZE_DIVISIBILITY = 32
    # point-sampled losses
    mf.TRAIN_NUM_POINTS = 112 * 112
    mf.OVERSAMPLE_RATIO = 3.0
    mf.IMPORTANCE_SAMPLE_RATIO = 0.75

    mf.TEST = CN()
    mf.TEST.SEMANTIC_ON = True
    mf.TEST.INSTANCE_ON = True
    mf.TEST.PANOPTIC_ON = True
    mf.TEST.OBJECT_MASK_THRESHOLD = 0.8
    mf.TEST.OVERLAP_THRESHOLD = 0.8
    mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False

    ssh = cfg.MODEL.SEM_SEG_HEAD
    ssh.MASK_DIM = 256
    ssh.TRANSFORMER_ENC_LAYERS = 6
    ssh.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    ssh.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    ssh.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    ssh.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8
    ssh.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD = 1024


def add_maps_memory_config(cfg: CN) -> None:
    """MAPS's keys (paper sections 3.2, 3.3 and the ablations of Tables 4-8)."""
    from detectron2.config import CfgNode as CN

    cfg.MODEL.MAPS = CN()
    m = cfg.MODEL.MAPS
    m.ENABLED = False
    # widths of the retrieved tokens as stored in the bank (CLIP ViT-B/16 joint space: 512;
    # DINO ViT-B: 768); one linear projection per memory maps them to HIDDEN_DIM
    m.SCENE_MEMORY_DIM = 512
    m.OBJECT_MEMORY_DIM = 512
    # 0-based indices of the 9 masked-attention decoder layers that get memory
    # cross-attention (Eq. 1). Paper: scene memory in layers 1-3, object memory in 4-6.
    m.SCENE_LAYERS = [0, 1, 2]
    m.OBJECT_LAYERS = [3, 4, 5]
    # Table 5 "Swapped": object memory in the scene layers and vice versa
    m.SWAPPED = False
    # k retrieved memory images per query image (Table 8)
    m.NUM_RETRIEVED = 5
    # Random-Sampling: draw k of a retrieved pool of POOL_SIZE each training iteration
    m.RANDOM_SAMPLING = False
    m.POOL_SIZE = 5
    # Input-Masking: drop the memory tokens once per forward with this probability
    m.INPUT_MASKING_PROB = 0.0
    # Layer-Masking: drop the memory tokens independently in each memory layer
    m.LAYER_MASKING_PROB = 0.0
    # MAPS-Aug-CLS: append the current image's own CLS token to the scene memory
    m.APPEND_QUERY_CLS = False
    # Table 4 "Mask2Former (N)": extra plain self-attention layers (0-based decoder layers)
    # in place of memory; used with ENABLED = False
    m.EXTRA_SELF_ATTN_LAYERS = []

    # Table 7: switch a memory off at inference only
    m.TEST = CN()
    m.TEST.SCENE_MEMORY = True
    m.TEST.OBJECT_MEMORY = True

    # Where the memory comes from (paper section 3.2, Table 6)
    m.MEMORY = CN()
    m.MEMORY.BANK = ""            # bank directory (maps memory build)
    m.MEMORY.NEIGHBORS = ""       # neighbour cache, JSON lines (maps memory neighbors)
    m.MEMORY.KEY_ENCODER = "clip"  # clip | dino: CLS keys and scene values
    # OpenAI's CLIP ViT-B/16 (the paper's) was trained with QuickGELU: open_clip's
    # "ViT-B-16-quickgelu"; plain "ViT-B-16" is GELU and refuses OpenAI checkpoints
    m.MEMORY.KEY_ARCH = "ViT-B-16-quickgelu"
    m.MEMORY.DENSE = "tiledclip"   # clip | dino | maskclip | tiledclip: object values
    # a name of the pretrained cache (maps weights list: clip-vit-b16-openai, dino-vit-b16)
    # or a local checkpoint; empty = random init from SEED
    m.MEMORY.WEIGHTS = ""
    # dense extractor's own backbone when it differs from the key encoder's (e.g. DINO dense
    # features with CLIP keys); empty = that extractor's default architecture / random init
    m.MEMORY.DENSE_ARCH = ""
    m.MEMORY.DENSE_WEIGHTS = ""
    m.MEMORY.INDEX = "hnsw"       # hnsw | flat: the bank's FAISS index (paper: HNSW)
    m.MEMORY.SEED = 0
    m.MEMORY.ONLINE = False       # encode queries in the loop instead of the cache


def add_maps_config(cfg: CN) -> None:
    """Add every key this library reads to a detectron2 config (call once)."""
    add_maskformer2_config(cfg)
    add_maps_memory_config(cfg)


def get_maps_cfg() -> CN:
    """A fresh detectron2 default config with the Mask2Former and MAPS keys added."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_maps_config(cfg)
    return cfg


def config_from_yaml_text(text: str, source: str = "run config") -> CN:
    """A resolved config (as written to a run directory) back to a CfgNode.

    Parsed with ``yaml.safe_load``: a run's config.yaml is data, never code. ``source`` (the
    file it came from) names the culprit of a :class:`ConfigError`.
    """
    from detectron2.config import CfgNode as CN

    data = load_yaml(source, text=text)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
    cfg = get_maps_cfg()
    try:
        cfg.merge_from_other_cfg(CN(data))
    except KeyError as e:
        raise ConfigError(f"{source}: {_yacs_message(e)}") from None
    except (ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"{source}: {_yacs_message(e)}") from None
    return cfg


# ---------------------------------------------------------------------------------------------
# Config files, read as data
# ---------------------------------------------------------------------------------------------
BASE_KEY = "_BASE_"


def load_config_yaml(path: "str | os.PathLike") -> Dict[str, Any]:
    """A detectron2 config file merged over its ``_BASE_`` chain, as one mapping.

    What fvcore's ``CfgNode.load_yaml_with_base`` does, but safely: ``yaml.safe_load`` only
    (never the unsafe load detectron2 allows by default), local files only (fvcore would fetch
    an ``https://`` base), a cycle of bases refused, and every problem a :class:`ConfigError`
    naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    return _load_with_base(path, (path.resolve(),))


def _load_with_base(path: Path, chain: Tuple[Path, ...]) -> Dict[str, Any]:
    data = load_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of config keys, got {type(data).__name__}")
    if BASE_KEY not in data:
        return data
    bases = data.pop(BASE_KEY)
    merged: Dict[str, Any] = {}
    for base in bases if isinstance(bases, list) else [bases]:
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"config file {path}: {BASE_KEY} must be a file path or a list of them, got {base!r}")
        if "://" in base:
            raise ConfigError(f"config file {path}: {BASE_KEY} {base!r}: only local files are read")
        base_path = Path(os.path.expanduser(base))
        if not base_path.is_absolute():
            base_path = path.parent / base_path  # relative to the file that names it
        if not base_path.is_file():
            raise ConfigError(f"config file {path}: {BASE_KEY} {base_path} does not exist")
        resolved = base_path.resolve()
        if resolved in chain:
            raise ConfigError(f"config file {path}: {BASE_KEY} {base_path} is a cycle of bases")
        _merge_into(_load_with_base(base_path, chain + (resolved,)), merged, base_path, "")
    _merge_into(data, merged, path, "")
    return merged


def _merge_into(a: Dict[str, Any], b: Dict[str, Any], path: Path, prefix: str) -> None:
    """Merge ``a`` into ``b`` (``a`` wins), as fvcore merges a file over its base."""
    for key, value in a.items():
        if isinstance(value, dict) and key in b:
            if not isinstance(b[key], dict):
                raise ConfigError(f"config file {path}: key '{prefix}{key}' is a group here but a "
                                  "value in its base")
            _merge_into(value, b[key], path, f"{prefix}{key}.")
        else:
            b[key] = value


def _yacs_message(err: BaseException) -> str:
    msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(msg).split())


def merge_config_file(cfg: CN, path: "str | os.PathLike") -> None:
    """Merge a config file (and its ``_BASE_`` chain) into ``cfg``, reading it as data.

    Replaces detectron2's ``cfg.merge_from_file`` (unsafe YAML by default), with its version
    handling: a file of an older config version is upgraded as detectron2 does.

    Raises:
        ConfigError: naming the file: missing, not valid YAML, a tag that asks for a Python
            object, an unknown key or a value of the wrong type.
    """
    from detectron2.config import CfgNode as CN
    from detectron2.config.compat import downgrade_config, guess_version, upgrade_config

    loaded = load_config_yaml(path)
    try:
        loaded_cfg = CN(loaded)
        version = loaded_cfg.get("VERSION", None)
        if version is None:
            version = guess_version(loaded_cfg, str(path))
        if version > cfg.VERSION:
            raise ConfigError(f"config file {path}: VERSION {version} is newer than this "
                              f"detectron2's {cfg.VERSION}")
        if version == cfg.VERSION:
            cfg.merge_from_other_cfg(loaded_cfg)
        else:
            old = downgrade_config(cfg, to_version=version)
            old.merge_from_other_cfg(loaded_cfg)
            new = upgrade_config(old)
            cfg.clear()
            cfg.update(new)
    except ConfigError:
        raise
    except (KeyError, ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"config file {path}: {_yacs_message(e)}") from None


# ---------------------------------------------------------------------------------------------
# Values a type check cannot catch
# ---------------------------------------------------------------------------------------------
def check_maps_values(cfg: CN) -> List[Tuple[str, str]]:
    """Range checks of the MAPS keys a type check cannot catch: ``[(key, problem), ...]``.

    Layer indices are 0-based decoder layers: ``DEC_LAYERS - 1`` of them (9 for the paper).
    ``POOL_SIZE >= NUM_RETRIEVED`` is required only when Random-Sampling draws from the pool.
    The registry, the sweeps and ``maps train`` (:func:`maps.engine.train.validate_config`)
    all apply these checks.
    """
    problems: List[Tuple[str, str]] = []
    m = cfg.MODEL.MAPS
    n_layers = int(cfg.MODEL.MASK_FORMER.DEC_LAYERS) - 1
    for key in ("SCENE_LAYERS", "OBJECT_LAYERS", "EXTRA_SELF_ATTN_LAYERS"):
        layers = list(m[key])
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int)
               or not 0 <= i < n_layers]
        if bad:
            problems.append((f"MODEL.MAPS.{key}", f"layer index {bad[0]!r} outside 0..{n_layers - 1} "
                             f"(the decoder has {n_layers} layers: DEC_LAYERS - 1)"))
        elif len(set(layers)) != len(layers):
            problems.append((f"MODEL.MAPS.{key}", f"repeated layer index in {layers}"))
    shared = sorted(set(m.SCENE_LAYERS) & set(m.OBJECT_LAYERS))
    if m.ENABLED and shared:
        # the decoder refuses it too, but only when the model is built (in a job)
        problems.append(("MODEL.MAPS.SCENE_LAYERS", f"layers {shared} are also in OBJECT_LAYERS "
                         f"{list(m.OBJECT_LAYERS)}: a decoder layer takes at most one memory"))
    for key in ("INPUT_MASKING_PROB", "LAYER_MASKING_PROB"):
        p = m[key]
        if not 0.0 <= p <= 1.0:
            problems.append((f"MODEL.MAPS.{key}", f"{p!r} is not a probability in [0, 1]"))
    if m.NUM_RETRIEVED < 1:
        problems.append(("MODEL.MAPS.NUM_RETRIEVED", f"k must be >= 1, got {m.NUM_RETRIEVED}"))
    if m.POOL_SIZE < 1:
        problems.append(("MODEL.MAPS.POOL_SIZE", f"pool must be >= 1, got {m.POOL_SIZE}"))
    elif m.RANDOM_SAMPLING and m.POOL_SIZE < m.NUM_RETRIEVED:
        problems.append(("MODEL.MAPS.POOL_SIZE", f"pool {m.POOL_SIZE} < k {m.NUM_RETRIEVED}: "
                         "Random-Sampling draws k of the pool"))
    for key in ("SCENE_MEMORY_DIM", "OBJECT_MEMORY_DIM"):
        if m[key] < 1:
            problems.append((f"MODEL.MAPS.{key}", f"must be >= 1, got {m[key]}"))
    if m.MEMORY.KEY_ENCODER not in KEY_ENCODERS:
        problems.append(("MODEL.MAPS.MEMORY.KEY_ENCODER", f"{m.MEMORY.KEY_ENCODER!r} is not one "
                         f"of {', '.join(KEY_ENCODERS)}"))
    if m.MEMORY.DENSE not in DENSE_EXTRACTORS:
        problems.append(("MODEL.MAPS.MEMORY.DENSE", f"{m.MEMORY.DENSE!r} is not one of "
                         f"{', '.join(DENSE_EXTRACTORS)}"))
    if cfg.SOLVER.MAX_ITER < 1:
        problems.append(("SOLVER.MAX_ITER", f"must be >= 1, got {cfg.SOLVER.MAX_ITER}"))
    return problems
