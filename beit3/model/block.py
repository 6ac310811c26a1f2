"""The Multiway Transformer block (BEiT-3 paper, section 2.1).

    x = x + attn(x)                      shared self-attention (paper) / per-modality (released)
    x = x + FFN_expert(x)                V-FFN for image tokens, L-FFN for text tokens,
                                         VL-FFN for every token of an image-text input in the top
                                         ``vl_layers`` layers (paper layout)

Pre-LayerNorm with Sub-LN inside attention and FFN, no layer scale.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from beit3.model.config import BEiT3Config
from beit3.model.attention import MultiwayAttention
from beit3.model.ffn import FFN
from beit3.model.multiway import Multiway, Streams


def _drop_path_scale(xs: Streams, p: float, training: bool) -> Optional[Tensor]:
    """Per-sample keep/scale factor (B, 1, 1) shared by both streams, so a dropped sample drops its
    image and its text residual branch together (as on the joined sequence)."""
    if p == 0.0 or not training:
        return None
    x = xs[0] if xs[0] is not None else xs[1]
    keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1.0 - p)
    return keep.div_(1.0 - p)


def _residual(xs: Streams, ys: Streams, scale: Optional[Tensor]) -> Streams:
    if scale is None:
        return tuple(None if x is None else x + y for x, y in zip(xs, ys))  # type: ignore[return-value]
    return tuple(None if x is None else x + y * scale for x, y in zip(xs, ys))  # type: ignore[return-value]


class MultiwayBlock(nn.Module):
    def __init__(self, cfg: BEiT3Config, index: int, drop_path: float = 0.0):
        super().__init__()
        d, eps = cfg.embed_dim, cfg.layer_norm_eps
        self.drop_path = drop_path
        self.attn = MultiwayAttention(d, cfg.num_heads, shared=cfg.layout == "paper", eps=eps,
                                      attn_dropout=cfg.attn_dropout)
        self.ffn = Multiway(lambda: FFN(d, cfg.ffn_dim, eps))  # A = V-FFN, B = L-FFN
        self.ffn_vl = FFN(d, cfg.ffn_dim, eps) if index >= cfg.first_vl_layer else None

    def forward(self, xs: Streams, mask: Optional[Tensor], fusion: bool,
                kv_cache: Optional[dict] = None) -> Streams:
        """fusion: the input is an image-text pair (routes every token to the VL-FFN here)."""
        xs = _residual(xs, self.attn(xs, mask, kv_cache), _drop_path_scale(xs, self.drop_path, self.training))
        if fusion and self.ffn_vl is not None:
            ys = tuple(None if x is None else self.ffn_vl(x) for x in xs)
        else:
            ys = self.ffn(xs)
        return _residual(xs, ys, _drop_path_scale(xs, self.drop_path, self.training))
