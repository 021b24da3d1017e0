"""The residual attention block that Mask2Former's decoder layers and MAPS' memory layer share.

Attention, dropout, residual, LayerNorm: post-norm unless ``normalize_before`` (pre-norm).
Subclasses keep Mask2Former's parameter names (``self_attn`` for self-attention,
``multihead_attn`` for cross-attention), so its released checkpoints load unchanged.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

__all__ = ["ResidualAttention", "with_pos", "xavier_init"]


def with_pos(tensor: Tensor, pos: Optional[Tensor]) -> Tensor:
    return tensor if pos is None else tensor + pos


def xavier_init(module: nn.Module) -> None:
    """Mask2Former's initialisation of its decoder layers: xavier-uniform on every matrix."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class ResidualAttention(nn.Module):
    """``out = norm(tgt + dropout(attend(tgt)))``, or ``tgt + dropout(attend(norm(tgt)))``
    with ``normalize_before``. Subclasses define ``forward`` around :meth:`_normed` (what the
    attention reads) and :meth:`_residual` (what it returns)."""

    attn_name = "multihead_attn"

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False) -> None:
        super().__init__()
        # registered first, then the norm: the parameter order (and so the initialisation
        # drawn from the RNG, and the state dict) is Mask2Former's
        setattr(self, self.attn_name, nn.MultiheadAttention(d_model, nhead, dropout=dropout))
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        xavier_init(self)

    @property
    def attention(self) -> nn.MultiheadAttention:
        return getattr(self, self.attn_name)

    def _normed(self, tgt: Tensor) -> Tensor:
        return self.norm(tgt) if self.normalize_before else tgt

    def _residual(self, tgt: Tensor, update: Tensor) -> Tensor:
        tgt = tgt + self.dropout(update)
        return tgt if self.normalize_before else self.norm(tgt)
