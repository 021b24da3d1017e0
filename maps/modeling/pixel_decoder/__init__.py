"""Pixel decoders, registered in detectron2's ``SEM_SEG_HEADS_REGISTRY`` as Mask2Former does.

Each has ``forward_features(features) -> (mask_features, transformer_encoder_features,
multi_scale_features)``; pick one with ``MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME``.
"""
from maps.modeling.pixel_decoder.fpn import BasePixelDecoder
from maps.modeling.pixel_decoder.ms_deform_attn import MSDeformAttn, ms_deform_attn_core_pytorch
from maps.modeling.pixel_decoder.msdeformattn import MSDeformAttnPixelDecoder


def build_pixel_decoder(cfg, input_shape):
    """Build the pixel decoder named by ``MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME``."""
    from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

    from maps.errors import ConfigError

    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    try:
        cls = SEM_SEG_HEADS_REGISTRY.get(name)
    except KeyError:
        raise ConfigError(
            f"MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME {name!r} is not a registered pixel decoder "
            "(MSDeformAttnPixelDecoder, BasePixelDecoder)") from None
    model = cls(cfg, input_shape)
    if not callable(getattr(model, "forward_features", None)):
        raise ConfigError(
            f"MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME {name!r} has no forward_features(); "
            "it is not a pixel decoder")
    return model


__all__ = [
    "BasePixelDecoder",
    "MSDeformAttn",
    "MSDeformAttnPixelDecoder",
    "build_pixel_decoder",
    "ms_deform_attn_core_pytorch",
]
