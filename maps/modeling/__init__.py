"""Mask2Former and MAPS on detectron2.

Importing this package registers everything a config can name: the small ResNet backbone
(``BACKBONE_REGISTRY``), the pixel decoders and ``MaskFormerHead``
(``SEM_SEG_HEADS_REGISTRY``), the masked-attention decoder (``TRANSFORMER_DECODER_REGISTRY``)
and the ``MAPS`` meta-architecture (``META_ARCH_REGISTRY``).
"""
from maps.modeling import backbone as _backbone  # noqa: F401  (registers the small ResNet)
from maps.modeling.build import build_model, count_parameters, load_config
from maps.modeling.criterion import SetCriterion
from maps.modeling.heads import MaskFormerHead
from maps.modeling.matcher import HungarianMatcher
from maps.modeling.meta_arch import MAPS
from maps.modeling.pixel_decoder import (
    BasePixelDecoder,
    MSDeformAttnPixelDecoder,
    build_pixel_decoder,
)
from maps.modeling.position_encoding import PositionEmbeddingSine
from maps.modeling.transformer_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    MultiScaleMaskedTransformerDecoder,
    build_transformer_decoder,
)

__all__ = [
    "MAPS",
    "BasePixelDecoder",
    "HungarianMatcher",
    "MSDeformAttnPixelDecoder",
    "MaskFormerHead",
    "MultiScaleMaskedTransformerDecoder",
    "PositionEmbeddingSine",
    "SetCriterion",
    "TRANSFORMER_DECODER_REGISTRY",
    "build_model",
    "build_pixel_decoder",
    "build_transformer_decoder",
    "count_parameters",
    "load_config",
]
