"""MAPS memory fusion: retrieved memory tokens cross-attended by the object queries.

Paper section 3.3, Eq. 1::

    X_l = softmax(Q_l K_l^T) V_l + X_{l-1},   Q_l = f_Q(X_{l-1}),  K_l = f_K(M),  V_l = f_V(M)

with M the retrieved scene memory (CLS values of the k retrieved images) or object memory
(their pooled segment features). This module holds all of it:

* one input projection per memory, ``Linear(memory width -> hidden)``, applied once per
  forward (:meth:`MemoryFusion.prepare`) and shared by all layers of that memory;
* one :class:`MemoryCrossAttention` (multi-head f_Q, f_K, f_V + output projection,
  residual, LayerNorm) per decoder layer that receives a memory;
* the augmentations of Table 5 and the variants of Tables 7-8, as small functions on
  token masks (:func:`first_k_slots`, :func:`sample_slots`, :func:`drop_memory`, ...).

Every augmentation only *masks* tokens (marks them as padding); an image whose memory is
entirely masked in a layer gets no update there (``X_l = X_{l-1}``, exactly), so dropping
the memory of every image gives exactly Mask2Former's computation.
"""
from __future__ import annotations

from typing import Dict, Iterable, NamedTuple, Optional, Sequence, Set

import torch
from detectron2.config import configurable
from torch import Tensor, nn

from maps.errors import ConfigError
from maps.memory.tokens import MemoryTokens
from maps.modeling.attention import ResidualAttention

__all__ = [
    "SCENE",
    "OBJECT",
    "MemoryCrossAttention",
    "MemoryFusion",
    "ProjectedMemory",
    "valid_slots",
    "first_k_slots",
    "sample_slots",
    "tokens_of_slots",
    "drop_memory",
]

SCENE = "scene"
OBJECT = "object"


# --- augmentations: pure functions on masks --------------------------------------------------
def valid_slots(slot_of_token: Tensor, num_slots: int) -> Tensor:
    """(B, N) slot ids (-1 = padding) -> (B, num_slots) bool: slots owning at least one token."""
    batch = slot_of_token.shape[0]
    valid = torch.zeros(batch, num_slots + 1, dtype=torch.bool, device=slot_of_token.device)
    in_range = (slot_of_token >= 0) & (slot_of_token < num_slots)
    index = torch.where(in_range, slot_of_token, torch.full_like(slot_of_token, num_slots))
    valid.scatter_(1, index, True)
    return valid[:, :num_slots]


def first_k_slots(valid: Tensor, k: int) -> Tensor:
    """Keep the valid slots among the first ``k`` (slots are ordered most similar first)."""
    positions = torch.arange(valid.shape[1], device=valid.device)
    return valid & (positions < k)[None, :]


def sample_slots(valid: Tensor, k: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Random-Sampling: per image, ``k`` of its valid slots uniformly without replacement.

    An image with fewer than ``k`` valid slots keeps all of them. Random numbers are drawn
    on the CPU (from ``generator``, else the global RNG) so a seed gives the same draw on
    every device.
    """
    batch, num_slots = valid.shape
    if num_slots == 0 or k <= 0:
        return torch.zeros_like(valid)
    scores = torch.rand(batch, num_slots, generator=generator).to(valid.device)
    scores = scores.masked_fill(~valid, -1.0)  # invalid slots rank last
    chosen = scores.topk(min(k, num_slots), dim=1).indices
    keep = torch.zeros_like(valid).scatter_(1, chosen, True)
    return keep & valid


def tokens_of_slots(slot_of_token: Tensor, keep_slots: Tensor) -> Tensor:
    """(B, N) slot ids, (B, S) kept slots -> (B, N) bool: the tokens of kept slots."""
    num_slots = keep_slots.shape[1]
    in_range = (slot_of_token >= 0) & (slot_of_token < num_slots)
    if num_slots == 0:
        return in_range
    kept = keep_slots.gather(1, slot_of_token.clamp(0, num_slots - 1))
    return kept & in_range


def drop_memory(
    batch_size: int,
    prob: float,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> Tensor:
    """Input- / Layer-Masking: (B,) bool, True where an image's memory is dropped (prob ``prob``)."""
    if prob <= 0:
        return torch.zeros(batch_size, dtype=torch.bool, device=device)
    if prob >= 1:
        return torch.ones(batch_size, dtype=torch.bool, device=device)
    return (torch.rand(batch_size, generator=generator) < prob).to(device)


# --- the layer -----------------------------------------------------------------------------
class MemoryCrossAttention(ResidualAttention):
    """Eq. 1: multi-head cross-attention of the queries to memory tokens, residual, LayerNorm.

    Built like Mask2Former's ``CrossAttentionLayer`` (post-norm unless ``normalize_before``)
    so the new layer behaves like the decoder's own. Padding tokens are excluded from the
    softmax by ``key_padding_mask``. A query row whose image has no valid token would get an
    all ``-inf`` softmax (NaN); instead such rows are passed through unchanged (exactly).
    """

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Tensor,
        query_pos: Optional[Tensor] = None,
    ) -> Tensor:
        """``tgt`` (Q, B, C) queries; ``memory`` (N, B, C) projected tokens;
        ``memory_key_padding_mask`` (B, N) bool, True = ignore; ``query_pos`` (Q, B, C)."""
        if memory.shape[0] == 0:  # no token in the whole batch: one padding token stands in
            memory = memory.new_zeros(1, memory.shape[1], memory.shape[2])
            memory_key_padding_mask = memory_key_padding_mask.new_ones(memory.shape[1], 1)
        has_memory = ~memory_key_padding_mask.all(dim=1)  # (B,)
        # Nothing to attend: inference skips the work. Training still runs the layer, with a
        # zero effect, so that its parameters are in the graph, as DistributedDataParallel
        # requires when Input-/Layer-Masking drops the memory of every image of a batch.
        if not self.training and not bool(has_memory.any()):
            return tgt
        # rows without any valid token attend to everything (finite) and are discarded below
        key_padding_mask = memory_key_padding_mask & has_memory[:, None]
        update = self._attend(self._normed(tgt), memory, key_padding_mask, query_pos)
        out = self._residual(tgt, update)
        return torch.where(has_memory[None, :, None], out, tgt)

    def _attend(self, query: Tensor, memory: Tensor, key_padding_mask: Tensor, query_pos: Optional[Tensor]) -> Tensor:
        # Mask2Former adds the query positional embedding to the queries of every attention of
        # its decoder, where its paper also writes Q = f_Q(X_{l-1}); we do the same here.
        q = query if query_pos is None else query + query_pos
        return self.multihead_attn(
            q, memory, memory, key_padding_mask=key_padding_mask, need_weights=False
        )[0]


class ProjectedMemory(NamedTuple):
    """One memory, projected to the decoder width, for one forward pass."""

    tokens: Tensor   # (N, B, hidden), sequence first like the decoder
    padding: Tensor  # (B, N) bool, True = not attended


def _check_layers(name: str, layers: Iterable[int], num_layers: int) -> None:
    bad = [i for i in layers if not 0 <= int(i) < num_layers]
    if bad:
        raise ConfigError(
            f"{name} = {list(layers)}: layers {bad} do not exist; the decoder has {num_layers} layers "
            f"(0-based 0..{num_layers - 1}, MODEL.MASK_FORMER.DEC_LAYERS = {num_layers + 1})"
        )


class MemoryFusion(nn.Module):
    """Scene and object memory fused into the decoder's queries (MAPS, Sec. 3.3 and Table 5).

    The decoder calls :meth:`prepare` once per forward (projections, slot selection,
    Input-Masking, MAPS-Aug-CLS) and then ``self(layer, queries, prepared, query_pos)`` in
    every layer; layers without memory return the queries untouched without any work.
    Augmentations act only in training (``self.training``); ``generator`` (default: the
    global RNG) makes them reproducible.
    """

    @configurable
    def __init__(
        self,
        *,
        hidden_dim: int,
        nheads: int,
        num_layers: int,
        scene_dim: int = 512,
        object_dim: int = 512,
        scene_layers: Sequence[int] = (0, 1, 2),
        object_layers: Sequence[int] = (3, 4, 5),
        swapped: bool = False,
        num_retrieved: int = 5,
        random_sampling: bool = False,
        pool_size: int = 5,
        input_masking_prob: float = 0.0,
        layer_masking_prob: float = 0.0,
        append_query_cls: bool = False,
        test_scene_memory: bool = True,
        test_object_memory: bool = True,
        pre_norm: bool = False,
    ) -> None:
        super().__init__()
        _check_layers("MODEL.MAPS.SCENE_LAYERS", scene_layers, num_layers)
        _check_layers("MODEL.MAPS.OBJECT_LAYERS", object_layers, num_layers)
        shared = sorted(set(scene_layers) & set(object_layers))
        if shared:
            raise ConfigError(
                f"MODEL.MAPS.SCENE_LAYERS and MODEL.MAPS.OBJECT_LAYERS share layers {shared}; "
                "a decoder layer takes at most one memory"
            )
        if num_retrieved < 1:
            raise ConfigError(f"MODEL.MAPS.NUM_RETRIEVED must be >= 1, got {num_retrieved}")
        if random_sampling and pool_size < num_retrieved:
            raise ConfigError(
                f"MODEL.MAPS.POOL_SIZE ({pool_size}) must be >= MODEL.MAPS.NUM_RETRIEVED "
                f"({num_retrieved}) with MODEL.MAPS.RANDOM_SAMPLING"
            )
        for key, prob in (("INPUT_MASKING_PROB", input_masking_prob), ("LAYER_MASKING_PROB", layer_masking_prob)):
            if not 0.0 <= prob <= 1.0:
                raise ConfigError(f"MODEL.MAPS.{key} must be in [0, 1], got {prob}")

        # Table 5 "Swapped": the layers keep their place, the memories trade places
        in_scene_layers, in_object_layers = (OBJECT, SCENE) if swapped else (SCENE, OBJECT)
        self.layer_memory: Dict[int, str] = {int(i): in_scene_layers for i in scene_layers}
        self.layer_memory.update({int(i): in_object_layers for i in object_layers})
        used = set(self.layer_memory.values())

        self.hidden_dim = hidden_dim
        self.scene_dim = scene_dim
        self.object_dim = object_dim
        self.num_retrieved = num_retrieved
        self.random_sampling = random_sampling
        self.pool_size = pool_size
        self.input_masking_prob = input_masking_prob
        self.layer_masking_prob = layer_masking_prob
        self.append_query_cls = append_query_cls
        self.test_memories = {SCENE: test_scene_memory, OBJECT: test_object_memory}
        self.generator: Optional[torch.Generator] = None

        # f_K / f_V act on these projections; one per memory, shared by its layers
        self.scene_proj = nn.Linear(scene_dim, hidden_dim) if SCENE in used else None
        self.object_proj = nn.Linear(object_dim, hidden_dim) if OBJECT in used else None
        self.layers = nn.ModuleDict(
            {
                str(i): MemoryCrossAttention(hidden_dim, nheads, dropout=0.0, normalize_before=pre_norm)
                for i in sorted(self.layer_memory)
            }
        )

    @classmethod
    def from_config(cls, cfg) -> Dict[str, object]:
        m, mf = cfg.MODEL.MAPS, cfg.MODEL.MASK_FORMER
        return {
            "hidden_dim": mf.HIDDEN_DIM,
            "nheads": mf.NHEADS,
            "num_layers": mf.DEC_LAYERS - 1,
            "scene_dim": m.SCENE_MEMORY_DIM,
            "object_dim": m.OBJECT_MEMORY_DIM,
            "scene_layers": list(m.SCENE_LAYERS),
            "object_layers": list(m.OBJECT_LAYERS),
            "swapped": m.SWAPPED,
            "num_retrieved": m.NUM_RETRIEVED,
            "random_sampling": m.RANDOM_SAMPLING,
            "pool_size": m.POOL_SIZE,
            "input_masking_prob": m.INPUT_MASKING_PROB,
            "layer_masking_prob": m.LAYER_MASKING_PROB,
            "append_query_cls": m.APPEND_QUERY_CLS,
            "test_scene_memory": m.TEST.SCENE_MEMORY,
            "test_object_memory": m.TEST.OBJECT_MEMORY,
            "pre_norm": mf.PRE_NORM,
        }

    # --- which memory goes where ---------------------------------------------------------
    def active_memories(self) -> Set[str]:
        """Memories used in this pass: all placed ones, minus those switched off at test (Table 7)."""
        placed = set(self.layer_memory.values())
        if self.training:
            return placed
        return {kind for kind in placed if self.test_memories[kind]}

    def memory_of_layer(self, layer: int) -> Optional[str]:
        """The memory (``SCENE``, ``OBJECT``) decoder layer ``layer`` (0-based) attends to in
        this mode, or None."""
        kind = self.layer_memory.get(layer)
        return kind if kind in self.active_memories() else None

    # --- once per forward ----------------------------------------------------------------
    def select_slots(self, memory: MemoryTokens) -> Tensor:
        """(B, S) retrieved images to use: the first k, or k drawn from the pool in training."""
        num_slots = memory.scene.shape[1]
        if memory.object_slot.numel():
            num_slots = max(num_slots, int(memory.object_slot.max()) + 1)
        valid = valid_slots(memory.scene_slot, num_slots) | valid_slots(memory.object_slot, num_slots)
        if self.training and self.random_sampling:
            pool = first_k_slots(valid, self.pool_size)
            return sample_slots(pool, self.num_retrieved, self.generator)
        return first_k_slots(valid, self.num_retrieved)

    def prepare(self, memory: Optional[MemoryTokens]) -> Dict[str, ProjectedMemory]:
        """Project the memories used in this pass and apply the per-forward augmentations.

        ``memory=None`` means no memory (every layer passes its queries through).
        """
        active = self.active_memories()
        if memory is None or not active:
            return {}
        self._check_widths(memory)
        batch = memory.scene.shape[0]
        device = memory.scene.device
        keep_slots = self.select_slots(memory)
        dropped = drop_memory(batch, self.input_masking_prob if self.training else 0.0, self.generator, device)

        prepared: Dict[str, ProjectedMemory] = {}
        if SCENE in active:
            tokens = memory.scene
            padding = memory.scene_mask | ~tokens_of_slots(memory.scene_slot, keep_slots)
            if self.append_query_cls:  # MAPS-Aug-CLS: no slot selection drops the image's own CLS
                tokens = torch.cat([tokens, memory.query_cls[:, None].to(tokens)], dim=1)
                padding = torch.cat([padding, padding.new_zeros(batch, 1)], dim=1)
            prepared[SCENE] = self._project(self.scene_proj, tokens, padding | dropped[:, None])
        if OBJECT in active:
            padding = memory.object_mask | ~tokens_of_slots(memory.object_slot, keep_slots)
            prepared[OBJECT] = self._project(self.object_proj, memory.object, padding | dropped[:, None])
        return prepared

    @staticmethod
    def _project(proj: nn.Module, tokens: Tensor, padding: Tensor) -> ProjectedMemory:
        return ProjectedMemory(proj(tokens).transpose(0, 1), padding)

    def _check_widths(self, memory: MemoryTokens) -> None:
        active = self.active_memories()
        checks = []
        if SCENE in active:
            checks.append(("MODEL.MAPS.SCENE_MEMORY_DIM", self.scene_dim, "scene", memory.scene))
        if OBJECT in active:
            checks.append(("MODEL.MAPS.OBJECT_MEMORY_DIM", self.object_dim, "object", memory.object))
        if self.append_query_cls and SCENE in active:
            if memory.query_cls is None:
                raise ConfigError(
                    "MODEL.MAPS.APPEND_QUERY_CLS is on but the memory has no 'query_cls': the dataset "
                    "mapper must put the image's own CLS under dataset_dict['memory']['query_cls']"
                )
            checks.append(("MODEL.MAPS.SCENE_MEMORY_DIM", self.scene_dim, "query_cls", memory.query_cls))
        for key, expected, name, tensor in checks:
            if tensor.shape[-1] != expected:
                raise ConfigError(
                    f"{key} is {expected} but the retrieved {name} tokens have width {tensor.shape[-1]} "
                    "(memory bank built with another encoder?)"
                )

    # --- once per memory layer -----------------------------------------------------------
    def forward(
        self,
        layer: int,
        tgt: Tensor,
        prepared: Dict[str, ProjectedMemory],
        query_pos: Optional[Tensor] = None,
    ) -> Tensor:
        """Fuse this layer's memory (if any) into ``tgt`` (Q, B, C); Layer-Masking in training."""
        kind = self.memory_of_layer(layer)
        if kind is None or kind not in prepared:
            return tgt
        tokens, padding = prepared[kind]
        if self.training and self.layer_masking_prob > 0:
            layer_dropped = drop_memory(tgt.shape[1], self.layer_masking_prob, self.generator, padding.device)
            padding = padding | layer_dropped[:, None]
        return self.layers[str(layer)](tgt, tokens, padding, query_pos)

    def extra_repr(self) -> str:
        placement = ", ".join(f"{i}:{k}" for i, k in sorted(self.layer_memory.items()))
        return (
            f"layers={{{placement}}}, k={self.num_retrieved}, random_sampling={self.random_sampling} "
            f"(pool {self.pool_size}), input_masking={self.input_masking_prob}, "
            f"layer_masking={self.layer_masking_prob}, append_query_cls={self.append_query_cls}"
        )
