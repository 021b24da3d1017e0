"""Through the cache, maps' backbones compute what each library's own model computes.

Each file is built here in its library's published format (conftest.py); it goes into the
cache with ``add_weight`` (hashed, verified), configs name it, and maps' builder loads it.
The reference is the library's own model loaded with the library's own loader.
"""
from __future__ import annotations

import pytest
import torch

from maps.errors import ConfigError
from maps.weights.runs import resolve_config_weights
from maps.weights.verify import add_weight

ATOL = 1e-5


def test_r50_through_detectron2_checkpointer_matches_torchvision(cache, r50_pkl, torchvision_r50,
                                                                  tmp_path):
    """Paper config -> MODEL.WEIGHTS r50-imagenet -> a path -> the trainer's detectron2
    checkpointer -> the R50 of the MAPS model gives torchvision's layer4 features (stride in
    the 3x3, FrozenBN)."""
    from maps.engine.checkpoint import RunCheckpointer
    from maps.modeling.build import build_model, load_config

    add_weight("r50-imagenet", r50_pkl)
    cfg = load_config("experiments/configs/coco/maskformer2_R50_bs16_50ep.yaml",
                      ["MODEL.DEVICE", "cpu"])
    assert cfg.MODEL.WEIGHTS == "r50-imagenet"
    cfg = resolve_config_weights(cfg)
    assert cfg.MODEL.WEIGHTS == str(cache / "r50-imagenet" / "r50-imagenet.pkl")
    model = build_model(cfg).eval()
    RunCheckpointer(model, str(tmp_path), save_to_disk=False).load(cfg.MODEL.WEIGHTS)

    tv = torchvision_r50
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.backbone(x)["res5"]
        ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    # a random R50 (what an empty MODEL.WEIGHTS gives) is not that function
    fresh = build_model(cfg).eval()
    with torch.no_grad():
        assert (fresh.backbone(x)["res5"] - ref).abs().max() > 1e-2


def test_openai_clip_through_the_cache_matches_open_clip(cache, openai_clip_file):
    """MEMORY.WEIGHTS clip-vit-b16-openai with KEY_ARCH ViT-B-16-quickgelu: maps' key encoder
    gives open_clip's ``create_model('ViT-B-16-quickgelu', pretrained=FILE)`` image embedding."""
    import open_clip

    from maps.memory.encoders import build_dense_encoder, build_key_encoder

    add_weight("clip-vit-b16-openai", openai_clip_file)
    key = build_key_encoder("clip", "ViT-B-16-quickgelu", weights="clip-vit-b16-openai",
                            device="cpu")
    assert key.backbone.activation == "quick_gelu"
    reference = open_clip.create_model("ViT-B-16-quickgelu", pretrained=str(openai_clip_file))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = key.backbone.cls_and_grid(x)[0]
        ref = reference.eval().encode_image(x)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    # TiledCLIP (Table 6) reuses the same file: one backbone, no other download
    dense = build_dense_encoder("tiledclip", "ViT-B-16-quickgelu", weights="clip-vit-b16-openai",
                                device="cpu")
    assert dense.backbone is key.backbone


def test_openai_checkpoint_is_refused_by_a_gelu_architecture(cache, openai_clip_file):
    """OpenAI's CLIP was trained with QuickGELU: loading it into open_clip's GELU ViT-B-16
    gives no missing key and wrong features, so it is refused -- by file and by name."""
    from maps.memory.encoders import ClipBackbone, build_key_encoder

    with pytest.raises(ConfigError, match=r"trained with quick_gelu but CLIP 'ViT-B-16' uses "
                                          r"gelu.*'ViT-B-16-quickgelu'"):
        ClipBackbone("ViT-B-16", str(openai_clip_file), seed=0)
    add_weight("clip-vit-b16-openai", openai_clip_file)
    with pytest.raises(ConfigError, match="quick_gelu"):
        build_key_encoder("clip", "ViT-B-16", weights="clip-vit-b16-openai", device="cpu")


def test_torchscript_openai_archive_loads_and_gelu_refuses_it(tmp_path, tiny_clip):
    """OpenAI's TorchScript release form, read without running it: the tiny QuickGELU twin
    matches the traced model; the GELU architecture refuses it."""
    from maps.memory.encoders import ClipBackbone

    model = tiny_clip(quick_gelu=True)
    path = tmp_path / "tiny-openai.pt"
    torch.jit.trace(model, (torch.randn(1, 3, 224, 224), torch.randint(0, 100, (1, 77))),
                    check_trace=False).save(str(path))
    bb = ClipBackbone("ViT-Tiny-16-quickgelu", str(path), seed=0).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(bb.cls_and_grid(x)[0], model.encode_image(x), atol=ATOL, rtol=0)
    with pytest.raises(ConfigError, match="trained with quick_gelu but CLIP 'ViT-Tiny-16'"):
        ClipBackbone("ViT-Tiny-16", str(path), seed=0)


def test_dino_through_the_cache_matches_timm(cache, dino_file):
    """DENSE_WEIGHTS / WEIGHTS dino-vit-b16: maps' DINO backbone (timm vit_base_patch16_224)
    gives timm's vit_base_patch16_224.dino forward_features."""
    import timm

    from maps.memory.encoders import build_dense_encoder, build_key_encoder

    add_weight("dino-vit-b16", dino_file)
    key = build_key_encoder("dino", "vit_base_patch16_224", weights="dino-vit-b16", device="cpu")
    reference = timm.create_model("vit_base_patch16_224.dino", pretrained=False)
    reference.load_state_dict(torch.load(dino_file, weights_only=True))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = key.backbone.model.forward_features(x)
        ref = reference.eval().forward_features(x)
        cls, _ = key.backbone.cls_and_grid(x)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(cls, ref[:, 0], atol=ATOL, rtol=0)
    # DINO dense features (Table 6 row 4) reuse the same file
    dense = build_dense_encoder("dino", None, weights="dino-vit-b16", device="cpu")
    assert dense.backbone is key.backbone
