"""Semantic segmentation with BEiT-3's vision path: four layers' patch tokens, the multi-scale adapter,
UperNet and an auxiliary FCN head (``upernet.py``), as BEiT / BEiT v2 fine-tune on ADE20K.

    model = SegmentationModel(cfg, num_classes=150, channels=768)
    logits = model(image)                           (B, classes, H/4, W/4), image at cfg.img_size
    out = model(image, aux=True)                    {"logits": ..., "aux": (B, classes, H/16, W/16)}
    full = slide_logits(model, image, crop, stride) (1, classes, H, W) for an image of any size

The layers read are ``default_out_indices(depth)``, BEiT's choice (3, 5, 7, 11 of 12; 7, 11, 15, 23
of 24), before the final norm. The loss (``segmentation_loss``) is per-pixel cross entropy of the
logits upsampled to the targets, over the scored pixels only; the auxiliary head's weighs 0.4.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import convert_sync_batchnorm
from torch import Tensor, nn

from beit3.model.config import BEiT3Config
from beit3.model.heads import TaskModel, _example_image
from beit3.model.upernet import FCNHead, MultiScaleAdapter, UPerHead, init_seg_head, resize

IGNORE_INDEX = 255
AUX_WEIGHT = 0.4  # mmseg's auxiliary FCNHead loss_weight in BEiT's configs


def default_out_indices(depth: int) -> list[int]:
    """Four layers, a third, a half and two thirds of the way up and the top one: BEiT's [3, 5, 7, 11]
    of 12 and [7, 11, 15, 23] of 24; [12, 19, 26, 39] of 40, [0, 1, 2, 3] of 4 (repeats below 4)."""
    return [max(0, round(depth * f) - 1) for f in (1 / 3, 1 / 2, 2 / 3)] + [depth - 1]


class SegmentationModel(TaskModel):
    """BEiT-3 vision path + ``MultiScaleAdapter`` + ``UPerHead`` (+ ``FCNHead`` on the stride-16 map)."""

    task = "segmentation"
    final_norm = False  # BEiT's dense heads read the layers before the final norm

    def __init__(self, cfg: BEiT3Config, num_classes: int, channels: int = 512, aux_channels: int = 256,
                 out_indices: Optional[Sequence[int]] = None, aux_index: int = 2, dropout: float = 0.1):
        out_indices = list(out_indices) if out_indices is not None else default_out_indices(cfg.depth)
        if len(out_indices) != 4 or not all(0 <= i < cfg.depth for i in out_indices):
            raise ValueError(f"out_indices {out_indices}: expected 4 layers in [0, {cfg.depth})")
        if not 0 <= aux_index < 4:
            raise ValueError(f"aux_index {aux_index}: expected one of the 4 maps (0..3)")
        super().__init__(cfg, num_classes=num_classes, channels=channels, aux_channels=aux_channels,
                         out_indices=out_indices, aux_index=aux_index, dropout=dropout)
        d = cfg.embed_dim
        self.out_indices, self.aux_index, self.num_classes = out_indices, aux_index, num_classes
        self.adapter = MultiScaleAdapter(d, cfg.patch_size)
        self.decode_head = UPerHead(d, channels, num_classes, dropout)
        self.aux_head = FCNHead(d, aux_channels, num_classes, dropout) if aux_channels else None
        init_seg_head(*(h for h in (self.decode_head, self.aux_head) if h is not None))

    def pyramid(self, image: Tensor) -> list[Tensor]:
        """The adapter's four maps (B, D, H/s, W/s), s = 4, 8, 16, 32."""
        layers = sorted(set(self.out_indices))  # a layer read twice (a model of few layers) is run once
        maps = dict(zip(layers, self.beit3.forward_intermediates(image, layers, intermediates_only=True)))
        return self.adapter([maps[i] for i in self.out_indices])

    def forward(self, image: Tensor, aux: bool = False):
        """image (B, C, S, S) -> logits (B, classes, S/4, S/4); with ``aux`` (training) a dict that
        also holds the auxiliary head's logits."""
        maps = self.pyramid(image)
        logits = self.decode_head(maps)
        if not aux or self.aux_head is None:
            return {"logits": logits} if aux else logits
        return {"logits": logits, "aux": self.aux_head(maps[self.aux_index])}

    def example_inputs(self, batch_size: int = 2) -> dict:
        return {"image": _example_image(self.cfg, batch_size), "aux": True}


def segmentation_loss(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Cross entropy of ``logits`` (B, C, h, w), upsampled to ``target`` (B, H, W), averaged over the
    scored pixels (0 when a batch has none, rather than nan)."""
    logits = resize(logits.float(), target.shape[-2:])
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return total / (target != ignore_index).sum().clamp(min=1)


def window_boxes(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of mmseg's sliding windows: a grid of ``stride`` steps, the last window of a
    row or column moved back to end at the border."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * stride + crop, height), min(c * stride + crop, width)
            boxes.append((max(y1 - crop, 0), y1, max(x1 - crop, 0), x1))
    return boxes


@torch.no_grad()
def slide_logits(model: nn.Module, image: Tensor, crop: int, stride: int) -> Tensor:
    """mmseg's ``slide`` inference: logits (B, C, H, W) of an image (B, 3, H, W) of any size, the mean
    over the windows covering each pixel of each window's logits upsampled to the window. All windows
    go through the model in one call, so every rank makes the same calls (ZeRO-3 gathers per call).
    A side shorter than ``crop`` is padded with zeros (the mean colour) and cut off again."""
    B, _, H, W = image.shape
    padded = F.pad(image, (0, max(crop - W, 0), 0, max(crop - H, 0)))
    Hp, Wp = padded.shape[-2:]
    boxes = window_boxes(Hp, Wp, crop, stride)
    windows = torch.cat([padded[:, :, y0:y1, x0:x1] for y0, y1, x0, x1 in boxes])  # (n * B, 3, crop, crop)
    logits = resize(model(image=windows).float(), (crop, crop))
    total = logits.new_zeros(B, logits.shape[1], Hp, Wp)
    count = logits.new_zeros(1, 1, Hp, Wp)
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        total[:, :, y0:y1, x0:x1] += logits[k * B:(k + 1) * B]
        count[:, :, y0:y1, x0:x1] += 1
    return (total / count)[:, :, :H, :W]


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """The heads' BatchNorms as SyncBatchNorm (the reference's), for training on several CUDA ranks
    (timm's conversion also handles its ``BatchNormAct2d``)."""
    return convert_sync_batchnorm(model)


__all__ = ["AUX_WEIGHT", "IGNORE_INDEX", "SegmentationModel", "default_out_indices", "segmentation_loss",
           "slide_logits", "sync_batchnorm", "window_boxes"]
