"""The smallest Mask2Former / MAPS configuration the model tests build (width 16, 6 queries)."""
from maps.config import get_maps_cfg


def tiny_cfg(enabled: bool, **maps):
    """A tiny model config; ``maps`` sets ``MODEL.MAPS.<KEY>`` (``TEST_<KEY>``: ``MODEL.MAPS.TEST.<KEY>``)."""
    cfg = get_maps_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 5
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 16
    mf = cfg.MODEL.MASK_FORMER
    mf.HIDDEN_DIM, mf.NHEADS, mf.DIM_FEEDFORWARD, mf.NUM_OBJECT_QUERIES = 16, 2, 32, 6
    cfg.MODEL.MAPS.ENABLED = enabled
    cfg.MODEL.MAPS.SCENE_MEMORY_DIM = 8
    cfg.MODEL.MAPS.OBJECT_MEMORY_DIM = 8
    for key, value in maps.items():
        if key.startswith("TEST_"):
            setattr(cfg.MODEL.MAPS.TEST, key[5:], value)
        else:
            setattr(cfg.MODEL.MAPS, key, value)
    return cfg
