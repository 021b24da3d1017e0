"""Config keys of Mask2Former and MAPS on detectron2's CfgNode.

One place declares every key the library reads (detectron2 style): modules take plain
arguments through ``@configurable`` / ``from_config`` and never invent keys of their own.
Mask2Former's keys keep the names of the original implementation so its config files load
unchanged; MAPS's keys live under ``MODEL.MAPS``.
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN


def add_maskformer2_config(cfg: CN) -> None:
    """Mask2Former's keys, with the defaults of the original ``add_maskformer2_config``."""
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
    m.MEMORY.KEY_ARCH = "ViT-B-16"
    m.MEMORY.DENSE = "tiledclip"   # clip | dino | maskclip | tiledclip: object values
    m.MEMORY.WEIGHTS = ""         # local checkpoint; empty = random init from SEED
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


def config_from_yaml_text(text: str) -> CN:
    """A resolved config (as written to a run directory) back to a CfgNode.

    yacs parses it with ``yaml.safe_load``: a run's config.yaml is data, never code.
    """
    cfg = get_maps_cfg()
    cfg.merge_from_other_cfg(CN.load_cfg(text))
    return cfg
