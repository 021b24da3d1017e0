"""Frozen image encoders of the memory (paper section 3.2, Table 6).

Two kinds, one registry each (timm style, the registry is the table of contents):

* key encoders (``build_key_encoder``): one L2-normalised CLS embedding per image. It is
  the key of both memories and the value of the scene memory.
* dense encoders (``build_dense_encoder``): one feature map per image, aligned with the
  whole image, from which object tokens are pooled under segment masks.

Weights come from a local file or a name of the pretrained cache (:mod:`maps.weights`,
e.g. ``clip-vit-b16-openai``), read as data (:mod:`maps.weights.files`: no pickle code, no
TorchScript run); without weights an encoder starts from a random initialisation drawn
from a seed (same seed, same weights). OpenAI's CLIP was trained with QuickGELU: its
architecture is open_clip's ``ViT-B-16-quickgelu``, and a checkpoint whose activation differs
from the architecture's is refused (plain ``ViT-B-16`` is GELU).
What an encoder *is* (architecture, weights hash or seed, preprocessing, mode, width) is a
small JSON-able dict, :attr:`identity`, stored with everything the encoder produces, so a
bank built with one encoder is refused by a model configured with another.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maps.io import file_sha256
from maps.errors import ConfigError, MapsError

__all__ = [
    "KEY_ENCODERS",
    "DENSE_ENCODERS",
    "EncoderSpec",
    "KeyEncoder",
    "DenseEncoder",
    "build_key_encoder",
    "build_dense_encoder",
    "same_identity",
    "describe_identity",
    "tile_layout",
    "tiled_size",
]

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# the paper's encoders: OpenAI's CLIP ViT-B/16 (QuickGELU, open_clip's name) and DINO ViT-B/16
DEFAULT_ARCH = {"clip": "ViT-B-16-quickgelu", "dino": "vit_base_patch16_224"}
QUICK_GELU, GELU = "quick_gelu", "gelu"
# keys every OpenAI CLIP state dict has (open_clip keeps OpenAI's names): vision tower, text
# tower and the joint projections of one model
OPENAI_CLIP_KEYS = frozenset({"visual.conv1.weight", "visual.class_embedding",
                              "positional_embedding", "text_projection",
                              "token_embedding.weight", "logit_scale"})

# Small vision towers for tests and the CPU demo (open_clip has no ViT-T config). Same code
# path as ViT-B-16, a few ms per image.
EXTRA_CLIP_CONFIGS: Dict[str, dict] = {
    "ViT-Tiny-16": {"embed_dim": 64, "vision_cfg": {
        "image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16}},
    "ViT-Tiny-32": {"embed_dim": 64, "vision_cfg": {
        "image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32}},
    # QuickGELU twin (open_clip's "-quickgelu" naming), for OpenAI-format test checkpoints
    "ViT-Tiny-16-quickgelu": {"embed_dim": 64, "quick_gelu": True, "vision_cfg": {
        "image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16}},
}
# timm name -> (timm model, overrides)
EXTRA_DINO_CONFIGS: Dict[str, Tuple[str, dict]] = {
    "vit_tiny2_patch16_224": ("vit_tiny_patch16_224", {"depth": 2}),
}

_warned_random: set = set()
_sha_cache: Dict[Tuple[str, float, int], str] = {}


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to rebuild an encoder in another process (a shard job)."""

    name: str                   # key: clip | dino; dense: clip | dino | maskclip | tiledclip
    arch: Optional[str] = None  # None: the paper default of the backbone
    weights: Optional[str] = None
    seed: int = 0


def _weights_sha256(path: str) -> str:
    """sha256 of a weights file, cached by (path, mtime, size): hashing 600 MB takes seconds."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime, st.st_size)
    if key not in _sha_cache:
        _sha_cache[key] = file_sha256(path)
    return _sha_cache[key]


def same_identity(a: Optional[dict], b: Optional[dict]) -> bool:
    """Whether two encoder identities describe the same function of the image."""
    if a is None or b is None:
        return a is b
    return _canon(a) == _canon(b)


def _canon(d: dict) -> dict:
    # JSON round trips turn tuples into lists; compare on lists
    return {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in d.items()}


def describe_identity(d: Optional[dict]) -> str:
    """One-line description of an identity, for error messages."""
    if d is None:
        return "<none>"
    w = f"weights sha256 {d['weights_sha256'][:12]}" if d.get("weights_sha256") \
        else f"random init seed {d.get('seed')}"
    extra = f", dense {d['mode']}" if d.get("mode") else ""
    return f"{d.get('backbone')} {d.get('arch')} ({w}{extra}, dim {d.get('dim')})"


# --------------------------------------------------------------------------------------
# Backbones: the frozen networks, with the three read-outs the memory needs
# --------------------------------------------------------------------------------------


def _seeded_init(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _warn_random(what: str, seed: int) -> None:
    if (what, seed) not in _warned_random:
        _warned_random.add((what, seed))
        logger.warning("%s: no weights file given, random initialisation from seed %d "
                       "(retrievals will not be semantically meaningful)", what, seed)


class ClipBackbone(nn.Module):
    """open_clip's vision tower (only: the text tower is not needed). Its activation is the
    architecture's (``-quickgelu`` names: QuickGELU, as OpenAI trained CLIP; others GELU), and
    a checkpoint trained with the other one is refused: it would load without a missing key
    and quietly compute something else."""

    backbone = "clip"
    mean, std = CLIP_MEAN, CLIP_STD

    def __init__(self, arch: str, weights: Optional[str], seed: int,
                 declared_activation: Optional[str] = None):
        super().__init__()
        import open_clip
        from open_clip.model import _build_vision_tower

        if arch in EXTRA_CLIP_CONFIGS:
            cfg = EXTRA_CLIP_CONFIGS[arch]
        else:
            cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise ConfigError(
                f"unknown CLIP architecture {arch!r} (MODEL.MAPS.MEMORY.KEY_ARCH / --arch); "
                f"open_clip names such as 'ViT-B-16-quickgelu' (OpenAI's CLIP) or 'ViT-B-16' "
                f"(GELU), or {sorted(EXTRA_CLIP_CONFIGS)}")
        quick_gelu = bool(cfg.get("quick_gelu", False))
        self.activation = QUICK_GELU if quick_gelu else GELU
        self.visual = _seeded_init(
            seed, lambda: _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu))
        if weights:
            state, fmt = _read_weights(weights)
            found = declared_activation or _clip_file_activation(state, fmt)
            if found is not None and found != self.activation:
                want = f"{arch}-quickgelu" if found == QUICK_GELU else \
                    arch.replace("-quickgelu", "")
                raise ConfigError(
                    f"encoder weights {weights} were trained with {found} but CLIP {arch!r} "
                    f"uses {self.activation}: refused (OpenAI's CLIP is QuickGELU); use an "
                    f"architecture with {found}, e.g. {want!r} (MODEL.MAPS.MEMORY.KEY_ARCH)")
            _load_state(self.visual, state, weights, prefix="visual.")
        else:
            _warn_random(f"CLIP {arch}", seed)
        self.patch = int(self.visual.patch_size[0])
        self.size = int(self.visual.image_size[0])
        self.dim = int(cfg["embed_dim"])
        self.width = int(cfg["vision_cfg"]["width"])

    def _blocks(self, x: Tensor, upto_last: bool) -> Tensor:
        v = self.visual
        x = v._embeds(x)
        blocks = v.transformer.resblocks
        for blk in (blocks[:-1] if upto_last else blocks):
            x = blk(x)
        return x

    def _grid(self, tokens: Tensor) -> Tensor:
        B, N, D = tokens.shape
        g = self.size // self.patch
        return tokens.transpose(1, 2).reshape(B, D, g, g)

    def cls_and_grid(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """CLS embedding (B, dim) and patch grid projected to the joint space (B, dim, g, g)."""
        v = self.visual
        x = v.ln_post(self._blocks(x, upto_last=False))
        x = x @ v.proj
        return x[:, 0], self._grid(x[:, 1:])

    def maskclip_grid(self, x: Tensor) -> Tensor:
        """MaskCLIP (Zhou et al. 2022): the value path of the last attention block.

        The last block's query-key attention pools every patch towards the CLS token and so
        blurs locality; its value projection followed by the output projection keeps each
        patch's own content in the joint space. Residual and MLP are skipped, ln_post and
        proj applied, as in MaskCLIP.
        """
        v = self.visual
        x = self._blocks(x, upto_last=True)
        last = v.transformer.resblocks[-1]
        attn = last.attn
        if not isinstance(attn, nn.MultiheadAttention):
            raise ConfigError("maskclip needs open_clip's default attention block")
        D = x.shape[-1]
        y = last.ln_1(x)
        w_v = attn.in_proj_weight[2 * D:]
        b_v = attn.in_proj_bias[2 * D:] if attn.in_proj_bias is not None else None
        y = F.linear(y, w_v, b_v)
        y = attn.out_proj(y)
        y = v.ln_post(y) @ v.proj
        return self._grid(y[:, 1:])


class DinoBackbone(nn.Module):
    """A timm ViT (DINO weights from a local checkpoint file)."""

    backbone = "dino"
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, arch: str, weights: Optional[str], seed: int,
                 declared_activation: Optional[str] = None):
        super().__init__()
        import timm

        name, overrides = EXTRA_DINO_CONFIGS.get(arch, (arch, {}))
        if not timm.is_model(name):
            raise ConfigError(
                f"unknown DINO (timm) architecture {arch!r} (--arch / KEY_ARCH); e.g. "
                f"'vit_base_patch16_224', 'vit_small_patch16_224' or {sorted(EXTRA_DINO_CONFIGS)}")
        # DINO's ViTs have no classifier: num_classes=0
        self.model = _seeded_init(
            seed, lambda: timm.create_model(name, pretrained=False, num_classes=0, **overrides))
        if weights:
            _load_state(self.model, _read_weights(weights)[0], weights, prefix="")
        else:
            _warn_random(f"DINO {arch}", seed)
        self.patch = int(self.model.patch_embed.patch_size[0])
        self.size = int(self.model.patch_embed.img_size[0])
        self.dim = int(self.model.embed_dim)
        self.width = self.dim

    def cls_and_grid(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x = self.model.forward_features(x)
        n = self.model.num_prefix_tokens
        g = self.size // self.patch
        grid = x[:, n:].transpose(1, 2).reshape(x.shape[0], self.dim, g, g)
        return x[:, 0], grid

    def maskclip_grid(self, x: Tensor) -> Tensor:  # pragma: no cover - guarded by the registry
        raise ConfigError("maskclip is a CLIP read-out")


def _read_weights(path: str):
    """(state, format) of a local weights file, read as data: torch.load(weights_only=True),
    safetensors, or the tensors of a TorchScript archive (OpenAI's release) without running
    its code (:mod:`maps.weights.files`)."""
    from maps.weights.files import load_weights_file

    if not os.path.isfile(path):
        raise ConfigError(f"encoder weights file not found: {path}")
    try:
        return load_weights_file(path)
    except ConfigError as e:
        raise ConfigError(f"cannot read encoder weights: {e}") from None


def _clip_file_activation(state, fmt: str) -> Optional[str]:
    """The activation a CLIP checkpoint was trained with, where its form tells: OpenAI
    publishes CLIP as TorchScript archives and as state dicts in its own layout (vision and
    text towers under OpenAI's names), all QuickGELU. Anything else (a vision tower alone,
    a training checkpoint) does not say: None."""
    if fmt == "torchscript":
        return QUICK_GELU
    if isinstance(state, dict) and OPENAI_CLIP_KEYS <= set(state):
        return QUICK_GELU
    return None


def _load_state(module: nn.Module, state, path: str, prefix: str) -> None:
    """Load a checkpoint's tensors: a full model (keys under ``prefix``) or the tower itself;
    every tensor of ``module`` must be there, with its shape."""
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"encoder weights {path}: expected a state dict, got "
                          f"{type(state).__name__}")
    if prefix and any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = module.state_dict()
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
             if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        k, have, want = wrong[0]
        raise ConfigError(f"encoder weights {path} do not fit the architecture: {len(wrong)} "
                          f"tensors of another shape, e.g. {k} {have} != {want}")
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing:
        raise ConfigError(f"encoder weights {path} do not fit the architecture: "
                          f"{len(missing)} missing keys, e.g. {missing[:3]}")
    if unexpected:
        logger.info("encoder weights %s: ignored %d unexpected keys", path, len(unexpected))


_BACKBONES = {"clip": ClipBackbone, "dino": DinoBackbone}
_backbone_cache: Dict[Tuple, nn.Module] = {}


def _backbone(kind: str, arch: Optional[str], weights: Optional[str], seed: int,
              device: Optional[torch.device]) -> nn.Module:
    from maps.weights import declared_activation, resolve_weight

    arch = arch or DEFAULT_ARCH[kind]
    device = torch.device(device) if device is not None else _default_device()
    activation = declared_activation(weights)
    try:
        weights = resolve_weight(weights)  # a cache name -> its verified file
    except MapsError as e:
        raise ConfigError(str(e)) from None
    key = (kind, arch, os.path.abspath(weights) if weights else None, seed, str(device))
    if key not in _backbone_cache:
        bb = _BACKBONES[kind](arch, weights or None, seed, declared_activation=activation)
        bb = bb.eval().requires_grad_(False)
        bb.arch = arch
        bb.weights_sha256 = _weights_sha256(weights) if weights else None
        bb.seed = None if weights else int(seed)
        _backbone_cache[key] = bb.to(device)
    return _backbone_cache[key]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _base_identity(bb: nn.Module) -> dict:
    return {"backbone": bb.backbone, "arch": bb.arch, "weights_sha256": bb.weights_sha256,
            "seed": bb.seed, "mean": list(bb.mean), "std": list(bb.std), "size": bb.size,
            "patch": bb.patch, "dim": bb.dim}


def _to_tensor(image: np.ndarray) -> Tensor:
    """uint8 RGB (H, W, 3) -> float (3, H, W) in [0, 1]."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def _resize(x: Tensor, size: Tuple[int, int]) -> Tensor:
    return F.interpolate(x[None], size=size, mode="bicubic", align_corners=False,
                         antialias=True)[0].clamp_(0.0, 1.0)


class _Encoder:
    def __init__(self, backbone: nn.Module, batch_tiles: int = 64):
        self.backbone = backbone
        self.device = next(backbone.parameters()).device
        self.batch_tiles = batch_tiles
        self._mean = torch.tensor(backbone.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(backbone.std, device=self.device).view(1, 3, 1, 1)

    def _normalise(self, x: Tensor) -> Tensor:
        return (x.to(self.device) - self._mean) / self._std

    @property
    def dim(self) -> int:
        return self.backbone.dim


class KeyEncoder(_Encoder):
    """CLS key of each image: short side resized to the model size, centre crop (CLIP's own
    preprocessing), L2-normalised."""

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.identity = dict(_base_identity(backbone), role="key", preprocess="resize-short+center-crop")

    def preprocess(self, image: np.ndarray) -> Tensor:
        x = _to_tensor(image)
        s = self.backbone.size
        H, W = x.shape[1:]
        scale = s / min(H, W)
        h, w = max(s, round(H * scale)), max(s, round(W * scale))
        x = _resize(x, (h, w))
        top, left = (h - s) // 2, (w - s) // 2
        return x[:, top:top + s, left:left + s]

    @torch.no_grad()
    def encode(self, images: Sequence[np.ndarray]) -> Tensor:
        """(B, dim) float32 on the CPU, unit norm; all images in one forward."""
        if len(images) == 0:
            return torch.zeros(0, self.dim)
        x = self._normalise(torch.stack([self.preprocess(im) for im in images]))
        cls, _ = self.backbone.cls_and_grid(x)
        return F.normalize(cls.float(), dim=-1).cpu()


class DenseEncoder(_Encoder):
    """A feature map per image covering the whole image (no crop), shape (dim, h, w)."""

    mode = ""

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.identity = dict(_base_identity(backbone), role="dense", mode=self.mode)

    def _forward(self, x: Tensor) -> Tensor:
        return self.backbone.cls_and_grid(x)[1]

    def _forward_chunked(self, x: Tensor) -> Tensor:
        return torch.cat([self._forward(self._normalise(c)) for c in x.split(self.batch_tiles)])

    @torch.no_grad()
    def encode(self, images: Sequence[np.ndarray]) -> List[Tensor]:
        s = self.backbone.size
        x = torch.stack([_resize(_to_tensor(im), (s, s)) for im in images])
        return [g.float().cpu() for g in self._forward_chunked(x)]


class ClipGridEncoder(DenseEncoder):
    """CLIP grid: the 14x14 patch tokens of the 224x224 image, projected by visual.proj."""

    mode = "clip"


class DinoGridEncoder(DenseEncoder):
    mode = "dino"


class MaskClipEncoder(DenseEncoder):
    mode = "maskclip"

    def _forward(self, x: Tensor) -> Tensor:
        return self.backbone.maskclip_grid(x)


def tiled_size(height: int, width: int, short: int = 448, patch: int = 16) -> Tuple[int, int]:
    """TiledCLIP resize: short side to ``short``, long side to the nearest multiple of the
    patch size (at least ``short``)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if height <= width:
        long = max(short, int(round(width * short / height / patch)) * patch)
        return short, long
    long = max(short, int(round(height * short / width / patch)) * patch)
    return long, short


def _starts(length: int, tile: int) -> List[int]:
    starts = list(range(0, length - tile + 1, tile))
    if starts[-1] + tile < length:
        starts.append(length - tile)  # overlapping tile for the remainder
    return starts


def tile_layout(height: int, width: int, tile: int = 224, patch: int = 16
                ) -> List[Tuple[int, int, int, int]]:
    """Tiles of a resized image as (top, left, keep_top, keep_left), in pixels.

    Tiles are ``tile`` x ``tile`` on a regular grid; where the side is not a multiple of
    ``tile`` one more tile, flush with the far edge, overlaps its neighbour. Only the part
    of it that no earlier tile covered (from ``keep_*`` on, in image coordinates) is written
    to the stitched map, so every grid cell comes from exactly one tile.
    """
    if height < tile or width < tile or height % patch or width % patch:
        raise ValueError(f"cannot tile {height}x{width} with {tile}px tiles of {patch}px patches")
    out = []
    rows, cols = _starts(height, tile), _starts(width, tile)
    for i, top in enumerate(rows):
        keep_top = rows[i - 1] + tile if i else 0
        for j, left in enumerate(cols):
            keep_left = cols[j - 1] + tile if j else 0
            out.append((top, left, max(top, keep_top), max(left, keep_left)))
    return out


class TiledClipEncoder(DenseEncoder):
    """TiledCLIP (paper section 3.2): 224x224 tiles of the image resized to short side 448,
    each tile's CLIP grid stitched into a map of (H'/p, W'/p). All tiles of all images of a
    call go through the encoder together."""

    mode = "tiledclip"
    short = 448

    @torch.no_grad()
    def encode(self, images: Sequence[np.ndarray]) -> List[Tensor]:
        s, p = self.backbone.size, self.backbone.patch
        tiles, plan = [], []
        for im in images:
            H, W = tiled_size(im.shape[0], im.shape[1], self.short, p)
            x = _resize(_to_tensor(im), (H, W))
            layout = tile_layout(H, W, s, p)
            plan.append((H, W, layout, len(tiles)))
            tiles.extend(x[:, t:t + s, l:l + s] for t, l, _, _ in layout)
        feats = self._forward_chunked(torch.stack(tiles)).float().cpu()
        out = []
        for H, W, layout, first in plan:
            fmap = feats.new_zeros(self.dim, H // p, W // p)
            for n, (t, l, kt, kl) in enumerate(layout):
                g = feats[first + n]
                fmap[:, kt // p:(t + s) // p, kl // p:(l + s) // p] = \
                    g[:, (kt - t) // p:, (kl - l) // p:]
            out.append(fmap)
        return out


KEY_ENCODERS: Dict[str, str] = {"clip": "clip", "dino": "dino"}
DENSE_ENCODERS: Dict[str, Tuple[str, type]] = {
    "clip": ("clip", ClipGridEncoder),
    "dino": ("dino", DinoGridEncoder),
    "maskclip": ("clip", MaskClipEncoder),
    "tiledclip": ("clip", TiledClipEncoder),
}


def build_key_encoder(name: str = "clip", arch: Optional[str] = None,
                      weights: Optional[str] = None, seed: int = 0,
                      device: Optional[torch.device] = None) -> KeyEncoder:
    """The CLS key encoder ``name`` (clip | dino)."""
    if name not in KEY_ENCODERS:
        raise ConfigError(f"unknown key encoder {name!r} (MODEL.MAPS.MEMORY.KEY_ENCODER / "
                          f"--encoder); choose from {sorted(KEY_ENCODERS)}")
    return KeyEncoder(_backbone(KEY_ENCODERS[name], arch, weights, seed, device))


def build_dense_encoder(name: str = "tiledclip", arch: Optional[str] = None,
                        weights: Optional[str] = None, seed: int = 0,
                        device: Optional[torch.device] = None) -> DenseEncoder:
    """The dense feature extractor ``name`` (clip | dino | maskclip | tiledclip)."""
    if name not in DENSE_ENCODERS:
        raise ConfigError(f"unknown dense encoder {name!r} (MODEL.MAPS.MEMORY.DENSE / "
                          f"--dense); choose from {sorted(DENSE_ENCODERS)}")
    kind, cls = DENSE_ENCODERS[name]
    return cls(_backbone(kind, arch, weights, seed, device))


def build_from_spec(spec: EncoderSpec, role: str, device=None):
    fn = build_key_encoder if role == "key" else build_dense_encoder
    return fn(spec.name, spec.arch, spec.weights, spec.seed, device)
