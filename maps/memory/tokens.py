"""Retrieved memory tokens: the one interface between the memory and the model.

A dataset mapper puts, for each image, a dict under ``dataset_dict["memory"]``::

    {
      "scene":       FloatTensor (P, Ds)   CLS value of each retrieved image, most similar first
      "object":      FloatTensor (O, Do)  object tokens of those images, all concatenated
      "object_slot": LongTensor  (O,)     which retrieved image (0..P-1) each object token is from
      "query_cls":   FloatTensor (Ds,)    optional: the image's own CLS (MAPS-Aug-CLS)
    }

P is the retrieved pool (k, or the larger Random-Sampling pool). The model batches those
with :meth:`MemoryTokens.collate`; padding is marked True in the masks, as in
``nn.MultiheadAttention``'s ``key_padding_mask``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor


@dataclass
class MemoryTokens:
    scene: Tensor          # (B, P, Ds)
    scene_mask: Tensor     # (B, P) bool, True = padding
    object: Tensor         # (B, O, Do)
    object_mask: Tensor    # (B, O) bool, True = padding
    object_slot: Tensor    # (B, O) long, retrieved-image slot of each object token, -1 = padding
    query_cls: Optional[Tensor] = None  # (B, Ds)

    @property
    def scene_slot(self) -> Tensor:
        """(B, P) slot of each scene token (its position), -1 for padding."""
        B, P = self.scene_mask.shape
        slots = torch.arange(P, device=self.scene.device).expand(B, P).clone()
        slots[self.scene_mask] = -1
        return slots

    def to(self, device) -> "MemoryTokens":
        return MemoryTokens(
            *(t.to(device) for t in (self.scene, self.scene_mask, self.object,
                                      self.object_mask, self.object_slot)),
            query_cls=None if self.query_cls is None else self.query_cls.to(device),
        )

    @classmethod
    def collate(cls, per_image: Sequence[Mapping[str, Tensor]]) -> "MemoryTokens":
        """Pad each image's tokens to the longest in the batch."""
        if not per_image:
            raise ValueError("MemoryTokens.collate needs at least one image")
        sdim = per_image[0]["scene"].shape[-1]
        odim = per_image[0]["object"].shape[-1]
        B = len(per_image)
        P = max(int(m["scene"].shape[0]) for m in per_image)
        O = max(int(m["object"].shape[0]) for m in per_image)
        ref = per_image[0]["scene"]
        scene = ref.new_zeros(B, P, sdim)
        scene_mask = torch.ones(B, P, dtype=torch.bool, device=ref.device)
        obj = ref.new_zeros(B, O, odim)
        obj_mask = torch.ones(B, O, dtype=torch.bool, device=ref.device)
        obj_slot = torch.full((B, O), -1, dtype=torch.long, device=ref.device)
        for i, m in enumerate(per_image):
            for name, t, dim in (("scene", m["scene"], sdim), ("object", m["object"], odim)):
                if t.ndim != 2 or t.shape[-1] != dim:
                    raise ValueError(
                        f"memory[{name!r}] of image {i} has shape {tuple(t.shape)}; "
                        f"expected (N, {dim})")
            p, o = m["scene"].shape[0], m["object"].shape[0]
            scene[i, :p] = m["scene"]
            scene_mask[i, :p] = False
            obj[i, :o] = m["object"]
            obj_mask[i, :o] = False
            obj_slot[i, :o] = m["object_slot"]
        query_cls = None
        if all("query_cls" in m for m in per_image):
            query_cls = torch.stack([m["query_cls"] for m in per_image])
        return cls(scene, scene_mask, obj, obj_mask, obj_slot, query_cls)
