"""Self-attention over the joined image+text sequence, with Sub-LN before the output projection.

Projections and LayerNorms are ``Multiway``: shared by both streams in the paper layout, one per
modality in the released layout. q, k and v are one fused projection (one matmul instead of three);
the official checkpoint converter splits and joins them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from beit3.model.multiway import Multiway, Streams, join, split


class MultiwayAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, shared: bool, eps: float = 1e-5,
                 attn_dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dropout = attn_dropout
        self.norm = Multiway(lambda: nn.LayerNorm(dim, eps=eps), shared)  # self_attn_layer_norm
        self.qkv = Multiway(lambda: nn.Linear(dim, 3 * dim), shared)
        self.inner_norm = Multiway(lambda: nn.LayerNorm(dim, eps=eps), shared)  # inner_attn_ln
        self.proj = Multiway(lambda: nn.Linear(dim, dim), shared)  # out_proj

    def forward(self, xs: Streams, mask: Optional[Tensor] = None,
                kv_cache: Optional[dict] = None) -> Streams:
        """xs: streams of (B, L*, D). mask: bool, broadcastable to (B, H, L, Lk), True = may attend.

        kv_cache: for incremental decoding; holds "k", "v" (B, H, Lpast, hd) and is extended in place.
        """
        qkv = join(self.qkv(self.norm(xs)))  # (B, L, 3D)
        B, L, _ = qkv.shape
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if kv_cache is not None:  # (B, H, L, hd) each
            if "k" in kv_cache:
                k = torch.cat([kv_cache["k"], k], dim=2)
                v = torch.cat([kv_cache["v"], v], dim=2)
            kv_cache["k"], kv_cache["v"] = k, v
        p = self.attn_dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, L, hd)
        o = o.transpose(1, 2).reshape(B, L, -1)  # (B, L, D)
        return self.proj(self.inner_norm(split(o, xs)))
