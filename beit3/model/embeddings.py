"""Token embeddings: conv patches + CLS + mask token for images, a plain table for text.

Each modality has its own absolute position table in fairseq's layout, which the official
checkpoints use: positions start at row 2 (rows 0 and 1 are never read). The vision table holds
2 + 1 (CLS) + num_patches rows, the text table ``max_text_positions`` rows.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POS_OFFSET = 2  # fairseq's padding_idx + 1


def resize_vision_pos_embed(pos: Tensor, num_patches: int) -> Tensor:
    """Bicubic interpolation of the patch rows of a (3 + N_old, D) table to (3 + num_patches, D);
    the two unused rows and the CLS row are kept as they are."""
    head, grid = pos[:POS_OFFSET + 1], pos[POS_OFFSET + 1:]
    old, new = math.isqrt(grid.shape[0]), math.isqrt(num_patches)
    if old * old != grid.shape[0] or new * new != num_patches:
        raise ValueError(f"vision position table with {grid.shape[0]} patch rows is not a square grid")
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new * new, -1).to(pos.dtype)
    return torch.cat([head, grid], dim=0)


class VisionEmbedding(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.img_size, self.in_chans = img_size, in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(POS_OFFSET + 1 + self.num_patches, dim))

    def forward(self, image: Tensor, mask: Tensor | None = None) -> Tensor:
        """image: (B, C, H, W); mask: (B, N) bool, True = replace the patch by the mask token.
        Returns (B, 1 + N, D)."""
        x = self.proj(image).flatten(2).transpose(1, 2)  # (B, N, D)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed[POS_OFFSET:]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A model built for 384 or 480 px loads weights trained at 224: interpolate the patch rows.
        key = prefix + "pos_embed"
        pos = state_dict.get(key)
        if pos is not None and pos.shape != self.pos_embed.shape and pos.shape[-1] == self.pos_embed.shape[-1]:
            state_dict[key] = resize_vision_pos_embed(pos, self.num_patches)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class TextEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int, max_positions: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.tokens = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(max_positions, dim))

    def forward(self, ids: Tensor, start: int = 0) -> Tensor:
        """ids: (B, L) long; start: position of ids[:, 0] (incremental decoding). Returns (B, L, D)."""
        first = POS_OFFSET + start
        return self.tokens(ids) + self.pos_embed[first:first + ids.shape[1]]
