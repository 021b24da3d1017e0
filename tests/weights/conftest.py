"""Pretrained files in each library's published format, built here from random weights.

Nothing is downloaded: each fixture makes the file its library would publish (same keys,
same layout), so the cache, the loaders and the architectures are checked against the
libraries' own models without the real weights.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty weights cache of this test only ($MAPS_WEIGHTS)."""
    root = tmp_path / "weights-cache"
    monkeypatch.setenv("MAPS_WEIGHTS", str(root))
    return root


def torchvision_to_detectron2(state: dict) -> dict:
    """detectron2's tools/convert-torchvision-to-d2.py, in short: torchvision names to
    detectron2's (stem, res2-res5, convN.norm, shortcut), tensors to numpy arrays."""
    out = {}
    for key, value in state.items():
        k = key if "layer" in key else "stem." + key
        for t in (1, 2, 3, 4):
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[k] = value.detach().numpy()
    return {"model": out, "__author__": "torchvision", "matching_heuristics": True}


@pytest.fixture(scope="session")
def torchvision_r50():
    """A random torchvision ResNet-50 in eval mode, with non-trivial BN statistics."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.0)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def r50_pkl(torchvision_r50, tmp_path_factory) -> Path:
    """That ResNet-50 as detectron2's R-50.pkl (a plain pickle of numpy arrays)."""
    path = tmp_path_factory.mktemp("r50") / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump(torchvision_to_detectron2(torchvision_r50.state_dict()), f)
    return path


@pytest.fixture(scope="session")
def openai_clip_file(tmp_path_factory) -> Path:
    """A random open_clip ViT-B-16-quickgelu saved as OpenAI's released state dict (open_clip
    keeps OpenAI's key names; OpenAI's tensors are float16)."""
    import open_clip

    torch.manual_seed(1)
    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
    path = tmp_path_factory.mktemp("clip") / "ViT-B-16.pt"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return path


@pytest.fixture(scope="session")
def dino_file(tmp_path_factory) -> Path:
    """A random timm vit_base_patch16_224.dino, its state dict saved as timm's hub holds it."""
    import timm

    torch.manual_seed(2)
    model = timm.create_model("vit_base_patch16_224.dino", pretrained=False)
    path = tmp_path_factory.mktemp("dino") / "dino_vitbase16.pth"
    torch.save(model.state_dict(), path)
    return path


def _tiny_clip(quick_gelu: bool):
    from open_clip.model import CLIP

    torch.manual_seed(3)
    vision = {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16}
    text = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}
    return CLIP(embed_dim=64, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu).eval()


@pytest.fixture
def tiny_clip():
    """``tiny_clip(quick_gelu)``: a whole open_clip CLIP (vision and text towers) at toy
    width, in OpenAI's layout (maps' ``ViT-Tiny-16[-quickgelu]`` is its vision tower)."""
    return _tiny_clip
