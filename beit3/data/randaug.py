"""unilm/beit3's RandAugment for vision-language fine-tuning (``randaug.py``, ``RandomAugment(2, 7,
isPIL=True, augs=[...])`` in ``datasets.build_transform``), on PIL images.

Each call draws ``n`` ops uniformly with replacement from ``ops``; each is applied with probability
0.5 at level ``m`` of 10:

=================  ===========================================  ==========================
op                 what                                         at m = 7
=================  ===========================================  ==========================
Identity           nothing
AutoContrast       stretch each channel to 0..255               (no magnitude)
Equalize           equalise each channel's histogram            (no magnitude)
Brightness         pixel * f, f = m / 10 * 1.8 + 0.1             f = 1.36
Sharpness          blend with the 3x3 smoothed image by f       f = 1.36
ShearX / ShearY    shear by +-m / 10 * 0.3                       +-0.21
TranslateX / Y     move by +-m / 10 * 10 pixels                  +-7 px, at any image size
Rotate             rotate about the centre by +-m / 10 * 30 deg  +-21 degrees
=================  ===========================================  ==========================

Geometric ops fill what they uncover with grey (128, 128, 128) and sample bilinearly, with the
matrices of unilm's OpenCV calls (``cv2.warpAffine`` on pixel-index coordinates). No op changes a
colour's hue: captions and answers name colours. One difference: unilm's Sharpness casts its blend
to uint8 without clipping, so values past 0 or 255 wrap around (bright or dark specks at edges);
here they are clipped, as PIL's ``ImageEnhance`` does. timm's RandAugment, which classification
keeps, translates by a fraction of the image instead (up to ~151 px at 480 px).

Draws come from torch's global generator, like torchvision's random transforms, so seeding torch
reproduces an augmentation.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

MAX_LEVEL = 10
TRANSLATE_CONST = 10  # pixels at MAX_LEVEL
FILL = (128, 128, 128)
APPLY_PROB = 0.5
VL_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
          "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")  # unilm/beit3 build_transform's augs
SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}


def magnitude(name: str, level: float) -> float | None:
    """The op's argument at ``level`` (before its random sign), as unilm's ``arg_dict``."""
    if name in ("Brightness", "Sharpness"):
        return level / MAX_LEVEL * 1.8 + 0.1
    if name in ("ShearX", "ShearY"):
        return level / MAX_LEVEL * 0.3
    if name in ("TranslateX", "TranslateY"):
        return level / MAX_LEVEL * TRANSLATE_CONST
    if name == "Rotate":
        return level / MAX_LEVEL * 30
    return None


# -- the ops: (PIL RGB image, argument) -> PIL RGB image ----------------------------------------------
def _warp(img: Image.Image, forward: np.ndarray) -> Image.Image:
    """``cv2.warpAffine(img, forward, img.size, borderValue=FILL)``: ``forward`` (2, 3) maps input
    pixel indices to output ones. PIL wants the inverse map on pixel-edge coordinates (a pixel's
    centre at i + 0.5), hence the half-pixel shift of the offset; the input gets a 1-pixel FILL
    frame (one more pixel of offset) so that samples between the edge and the outside blend the
    two, as OpenCV's constant border does, instead of PIL's all-or-nothing fill."""
    a = np.vstack([forward, [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(a)[:2]  # output index -> input index
    lin, t = inv[:, :2], inv[:, 2]
    t = t + 0.5 - lin @ np.array([0.5, 0.5]) + 1.0
    coeffs = (lin[0, 0], lin[0, 1], t[0], lin[1, 0], lin[1, 1], t[1])
    framed = ImageOps.expand(img, border=1, fill=FILL)
    return framed.transform(img.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=FILL)


def _rotate(img: Image.Image, degrees: float) -> Image.Image:
    w, h = img.size  # cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1): counter-clockwise
    cx, cy, rad = w / 2, h / 2, np.deg2rad(degrees)
    al, be = np.cos(rad), np.sin(rad)
    return _warp(img, np.array([[al, be, (1 - al) * cx - be * cy], [-be, al, be * cx + (1 - al) * cy]]))


def _brightness(img: Image.Image, factor: float) -> Image.Image:
    table = np.clip(np.arange(256, dtype=np.float32) * np.float32(factor), 0, 255).astype(np.uint8)
    return img.point(table.tolist() * len(img.getbands()))


def _sharpness(img: Image.Image, factor: float) -> Image.Image:
    # The 3x3 smoothing kernel (1 1 1 / 1 5 1 / 1 1 1) / 13 on the interior; the border stays.
    x = np.asarray(img, dtype=np.float32)
    smooth = np.asarray(img.filter(ImageFilter.SMOOTH), dtype=np.float32)
    out = x.copy()
    out[1:-1, 1:-1] = smooth[1:-1, 1:-1] + factor * (x[1:-1, 1:-1] - smooth[1:-1, 1:-1])
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


OPS: dict[str, Callable[[Image.Image, float | None], Image.Image]] = {
    "Identity": lambda img, _: img,
    "AutoContrast": lambda img, _: ImageOps.autocontrast(img),
    "Equalize": lambda img, _: ImageOps.equalize(img),
    "Brightness": _brightness,
    "Sharpness": _sharpness,
    "ShearX": lambda img, f: _warp(img, np.array([[1.0, f, 0.0], [0.0, 1.0, 0.0]])),
    "ShearY": lambda img, f: _warp(img, np.array([[1.0, 0.0, 0.0], [f, 1.0, 0.0]])),
    "TranslateX": lambda img, d: _warp(img, np.array([[1.0, 0.0, -d], [0.0, 1.0, 0.0]])),
    "TranslateY": lambda img, d: _warp(img, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -d]])),
    "Rotate": _rotate,
}


def apply_op(img: Image.Image, name: str, arg: float | None) -> Image.Image:
    return OPS[name](img.convert("RGB"), arg)


class RandomAugment:
    """``n`` random ops of ``ops`` at level ``m``, each applied with probability 0.5 (unilm's
    ``RandomAugment(n, m, isPIL=True, augs=ops)``); PIL image in, PIL image out."""

    def __init__(self, n: int = 2, m: float = 7, ops: Sequence[str] = VL_OPS):
        unknown = [op for op in ops if op not in OPS]
        if unknown or not ops:
            raise ValueError(f"RandomAugment ops {unknown or '[]'}: choose from {sorted(OPS)}")
        self.n, self.m, self.ops = n, m, tuple(ops)

    def draw(self) -> list[tuple[str, float | None]]:
        """The ops this call applies, with their signed arguments."""
        chosen = []
        for i in torch.randint(len(self.ops), (self.n,)).tolist():
            name = self.ops[i]
            if torch.rand(()).item() >= APPLY_PROB:
                continue
            arg = magnitude(name, self.m)
            if name in SIGNED and torch.rand(()).item() < 0.5:
                arg = -arg
            chosen.append((name, arg))
        return chosen

    def __call__(self, img: Image.Image) -> Image.Image:
        img = img.convert("RGB")
        for name, arg in self.draw():
            img = OPS[name](img, arg)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, m={self.m}, ops={list(self.ops)})"
