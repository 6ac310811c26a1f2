"""Feed-forward expert with Sub-LN (Magneto / BEiT-3): LN -> fc1 -> GELU -> LN -> fc2."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class FFN(nn.Module):
    """One modality expert. ``norm`` is the pre-FFN LayerNorm (torchscale's ``final_layer_norm``),
    ``ffn_layernorm`` the Sub-LN before fc2."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, L, D) -> (B, L, D)
        return self.fc2(self.ffn_layernorm(F.gelu(self.fc1(self.norm(x)))))
