"""UperNet on a plain ViT, as BEiT's semantic segmentation builds it, in torch and timm layers.

    maps = adapter(features)       4 layers' (B, D, h, w) maps -> strides 4, 8, 16, 32 of the image
    logits = decode_head(maps)     UPerHead: (B, classes, H/4, W/4)
    aux = aux_head(maps[2])        FCNHead on the stride-16 map: (B, classes, H/16, W/16)

``MultiScaleAdapter`` is unilm beit/semantic_segmentation's ``fpn1..fpn4``: from a patch-16 grid,
two 2x2 transposed convolutions with a norm and GELU between them (x4), one transposed convolution
(x2), the grid itself, and 2x2 max pooling (/2); from a patch-8 grid the same shifted by one octave.
Between the two convolutions sits a BatchNorm, as unilm's (SyncBatchNorm there: ``sync_batchnorm``
converts it with the heads' on several GPUs).

``UPerHead`` and ``FCNHead`` follow mmsegmentation (``uper_head.py``, ``psp_head.py``,
``fcn_head.py``): every convolution is conv (no bias) + BatchNorm + ReLU (timm ``ConvNormAct``; the
reference's SyncBatchNorm: ``sync_batchnorm`` converts them for several GPUs), the pyramid pooling
module pools the stride-32 map to 1, 2, 3 and 6 cells, lateral 1x1 and output 3x3 convolutions make
the FPN, the four levels are upsampled to stride 4 and fused by a 3x3 convolution, then dropout 0.1
and a 1x1 classifier. Resizing is bilinear with ``align_corners=False`` as there. Initialisation as
mmcv's: convolutions Kaiming-normal (fan out, ReLU), norms 1 / 0, the classifier normal(0, 0.01).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import Tensor, nn

STRIDES = (4, 8, 16, 32)
POOL_SCALES = (1, 2, 3, 6)
CLASSIFIER_STD = 0.01


def resize(x: Tensor, size) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _rescale(dim: int, octaves: int) -> nn.Module:
    """Up by 2 ** octaves (2x2 transposed convs, BatchNorm + GELU between two), down by max pooling."""
    if octaves == 0:
        return nn.Identity()
    if octaves < 0:  # ceil: a grid that does not divide still gives a map (probe models have 2 x 2 grids)
        return nn.MaxPool2d(kernel_size=2 ** -octaves, stride=2 ** -octaves, ceil_mode=True)
    layers: list[nn.Module] = [nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)]
    for _ in range(octaves - 1):
        layers += [nn.BatchNorm2d(dim), nn.GELU(), nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)]
    return nn.Sequential(*layers)


class MultiScaleAdapter(nn.Module):
    """Four same-width maps of the patch grid -> maps at strides 4, 8, 16, 32 (``fpn1..fpn4``)."""

    def __init__(self, dim: int, patch_size: int):
        super().__init__()
        # patch 16 (or 14): x4, x2, x1, /2; patch 8: x2, x1, /2, /4
        octaves = [round(math.log2(patch_size / s)) for s in STRIDES]
        self.fpn1, self.fpn2, self.fpn3, self.fpn4 = (_rescale(dim, k) for k in octaves)

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        if len(maps) != 4:
            raise ValueError(f"the adapter takes 4 maps (one per stride), got {len(maps)}")
        return [op(x) for op, x in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps)]


def conv_bn_relu(cin: int, cout: int, kernel: int) -> ConvNormAct:
    return ConvNormAct(cin, cout, kernel, padding=kernel // 2)


class PyramidPooling(nn.Module):
    """PSPNet's pooling pyramid: the map, and its average over 1x1, 2x2, 3x3, 6x6 cells (each through
    a 1x1 conv), upsampled back and concatenated, fused by a 3x3 conv (mmseg UPerHead's ``psp``)."""

    def __init__(self, cin: int, channels: int, scales: Sequence[int] = POOL_SCALES):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(cin, channels, 1))
                                    for s in scales)
        self.bottleneck = conv_bn_relu(cin + len(scales) * channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        pooled = [resize(stage(x), x.shape[2:]) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class SegClassifier(nn.Module):
    """Dropout2d then a 1x1 conv to class logits (mmseg ``cls_seg``)."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.dropout(x))


class UPerHead(nn.Module):
    """UperNet: pyramid pooling on the coarsest map, a top-down FPN over the others, all four levels
    fused at the finest stride. maps: 4 x (B, cin, h_i, w_i), finest first -> (B, classes, h_0, w_0)."""

    def __init__(self, cin: int, channels: int, num_classes: int, dropout: float = 0.1,
                 pool_scales: Sequence[int] = POOL_SCALES):
        super().__init__()
        self.psp = PyramidPooling(cin, channels, pool_scales)
        self.lateral_convs = nn.ModuleList(conv_bn_relu(cin, channels, 1) for _ in range(3))
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(3))
        self.fpn_bottleneck = conv_bn_relu(4 * channels, channels, 3)
        self.classifier = SegClassifier(channels, num_classes, dropout)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, maps[:3])] + [self.psp(maps[3])]
        for i in range(3, 0, -1):  # top-down: each level gets the coarser one added
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:3])] + [laterals[3]]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [resize(x, size) for x in outs[1:]], dim=1))
        return self.classifier(fused)


class FCNHead(nn.Module):
    """The auxiliary head: one 3x3 conv-BN-ReLU and the classifier (mmseg ``FCNHead``, num_convs=1)."""

    def __init__(self, cin: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.conv = conv_bn_relu(cin, channels, 3)
        self.classifier = SegClassifier(channels, num_classes, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.conv(x))


@torch.no_grad()
def init_seg_head(*heads: nn.Module) -> None:
    """mmcv's initialisation of a decode head: conv weights Kaiming-normal (fan out, ReLU) with zero
    bias, norms 1 / 0, then each classifier conv normal(0, 0.01) with zero bias."""
    for m in (m for head in heads for m in head.modules()):
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in (m for head in heads for m in head.modules() if isinstance(m, SegClassifier)):
        nn.init.normal_(m.conv.weight, std=CLASSIFIER_STD)
        nn.init.zeros_(m.conv.bias)


__all__ = ["FCNHead", "MultiScaleAdapter", "POOL_SCALES", "PyramidPooling", "STRIDES", "SegClassifier", "UPerHead",
           "init_seg_head", "resize"]
