"""Modality experts and the two token streams they act on.

A BEiT-3 sequence is ``[image tokens | text tokens]``. Rather than concatenating the sequence and
splitting it again around every expert (what torchscale's ``MultiwayNetwork`` does for each linear
and LayerNorm), the hidden state is kept as two streams, ``(image, text)``, either of which may be
``None``. Experts apply to their own stream; only attention needs the joined sequence. Routing is
therefore a property of the inputs of each call, never module state, so activation checkpointing
recomputes it identically and ``torch.compile`` can trace it.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

Streams = Tuple[Optional[Tensor], Optional[Tensor]]  # (image (B, Li, D), text (B, Lt, D))


def join(xs: Streams) -> Tensor:
    """Concatenate the present streams along the sequence: (B, Li + Lt, D)."""
    img, txt = xs
    if img is None:
        return txt
    if txt is None:
        return img
    return torch.cat([img, txt], dim=1)


def split(x: Tensor, like: Streams) -> Streams:
    """Views of ``x`` (B, L, ...) with the stream lengths of ``like``: no copy."""
    img, txt = like
    if img is None:
        return None, x
    if txt is None:
        return x, None
    n = img.shape[1]
    return x[:, :n], x[:, n:]


class Multiway(nn.Module):
    """A module per modality (``A`` = vision, ``B`` = language, as torchscale names them) or one
    module shared by both streams (``shared``)."""

    def __init__(self, make: Callable[[], nn.Module], shared: bool = False):
        super().__init__()
        if shared:
            self.shared = make()
        else:
            self.A = make()
            self.B = make()

    @property
    def experts(self) -> tuple[nn.Module, nn.Module]:
        if hasattr(self, "shared"):
            return self.shared, self.shared
        return self.A, self.B

    def forward(self, xs: Streams) -> Streams:
        a, b = self.experts
        img, txt = xs
        return (None if img is None else a(img), None if txt is None else b(txt))
