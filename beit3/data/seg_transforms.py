"""Segmentation transforms: mmsegmentation's ADE20K pipeline (the one BEiT's segmentation configs use)
on a PIL image and its (H, W) uint8 target map (``ade20k.IGNORE_INDEX`` = not scored).

Training, in mmseg's order: ``Resize(img_scale, ratio_range)`` (a ratio r drawn uniformly, the image
rescaled keeping its aspect so that it fits (r x long, r x short)), ``RandomCrop(crop, cat_max_ratio)``
(up to 10 draws until no class covers ``cat_max_ratio`` of the crop's scored pixels), ``RandomFlip``,
``PhotoMetricDistortion`` (brightness, contrast, saturation, hue, each with probability 0.5; contrast
first or last), ``Normalize``, ``Pad`` to the crop (image 0, targets 255). Evaluation: the image
rescaled to fit ``img_scale`` (short side 512 for (2048, 512)), the targets left at their size
(the metric is computed there, after the logits are resized back).

Differences from mmseg, none of which changes what is learnt: images are resized with PIL (which
filters when shrinking) rather than OpenCV, and hue and saturation are shifted in PIL's 8-bit HSV
(hue 0..255; mmseg's delta of 18 in OpenCV's 0..179 is 26 here). Every random draw comes from
torch's generator, as the other fine-tuning transforms, so seeding torch reproduces a crop.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from torch import Tensor

IGNORE = 255  # ade20k.IGNORE_INDEX (kept here so the transforms stand alone)
CROP_TRIES = 10  # mmseg RandomCrop
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST}


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand(()).item()


def _randint(n: int) -> int:
    """0 <= k < n."""
    return int(torch.randint(n, ()).item())


def rescale_size(size: tuple[int, int], scale: Sequence[float]) -> tuple[int, int]:
    """mmcv ``imrescale``: the (w, h) of an image of ``size`` scaled to fit a long side of max(scale)
    and a short side of min(scale), aspect kept."""
    w, h = size
    factor = min(max(scale) / max(w, h), min(scale) / min(w, h))
    return int(w * factor + 0.5), int(h * factor + 0.5)


class Rescale:
    """PIL image -> the same image rescaled to fit ``scale`` (long, short), aspect kept."""

    def __init__(self, scale: Sequence[float], interpolation: str = "bilinear"):
        if interpolation not in RESAMPLE:
            raise ValueError(f"interpolation {interpolation!r}: expected one of {sorted(RESAMPLE)}")
        self.scale, self.resample = tuple(scale), RESAMPLE[interpolation]

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.resize(rescale_size(image.size, self.scale), self.resample)

    def __repr__(self) -> str:
        return f"Rescale(scale={self.scale})"


def crop_box(label: np.ndarray, crop: int, cat_max_ratio: float) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a random crop of at most ``crop`` x ``crop``; with ``cat_max_ratio`` < 1,
    redrawn (up to 10 times, as mmseg) while fewer than two classes are in it or one covers that
    share of its scored pixels."""
    h, w = label.shape

    def draw():
        y0, x0 = _randint(max(h - crop, 0) + 1), _randint(max(w - crop, 0) + 1)
        return y0, y0 + crop, x0, x0 + crop

    box = draw()
    if cat_max_ratio >= 1.0:
        return box
    for _ in range(CROP_TRIES):
        counts = np.bincount(label[box[0]:box[1], box[2]:box[3]].ravel(), minlength=256)[:IGNORE]
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        box = draw()
    return box


def _scaled(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _hsv_channel(img: np.ndarray, channel: int, change) -> np.ndarray:
    hsv = np.asarray(Image.fromarray(img).convert("HSV")).copy()
    hsv[..., channel] = change(hsv[..., channel])
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def photometric_distortion(img: np.ndarray, brightness: float = 32, contrast: tuple = (0.5, 1.5),
                           saturation: tuple = (0.5, 1.5), hue: int = 18) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion`` on an (H, W, 3) uint8 RGB array (``hue`` in OpenCV's 0..179)."""
    def maybe_contrast(x):
        return _scaled(x, alpha=_uniform(*contrast)) if _randint(2) else x

    if _randint(2):
        img = _scaled(img, beta=_uniform(-brightness, brightness))
    contrast_last = _randint(2) == 0
    if not contrast_last:
        img = maybe_contrast(img)
    if _randint(2):
        alpha = _uniform(*saturation)
        img = _hsv_channel(img, 1, lambda s: _scaled(s, alpha=alpha))
    if _randint(2):
        shift = round((_randint(2 * hue) - hue) * 256 / 180)  # mmseg: randint(-hue, hue) of 180
        img = _hsv_channel(img, 0, lambda h: ((h.astype(np.int32) + shift) % 256).astype(np.uint8))
    if contrast_last:
        img = maybe_contrast(img)
    return img


def _normalized(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div_(255)  # (3, H, W), a copy
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class SegTrainTransform:
    """(PIL image, (H, W) uint8 targets) -> (image (3, crop, crop) normalised, targets (crop, crop) long)."""

    def __init__(self, crop: int, scale: Sequence[float] = (2048, 512), ratio_range: Sequence[float] = (0.5, 2.0),
                 cat_max_ratio: float = 0.75, hflip: float = 0.5, photometric: bool = True,
                 mean: Sequence[float] = IMAGENET_INCEPTION_MEAN, std: Sequence[float] = IMAGENET_INCEPTION_STD):
        self.crop, self.scale, self.ratio_range = crop, tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.hflip, self.photometric = cat_max_ratio, hflip, photometric
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: Image.Image, label: np.ndarray) -> tuple[Tensor, Tensor]:
        r = _uniform(*self.ratio_range)
        size = rescale_size(image.size, (int(self.scale[0] * r), int(self.scale[1] * r)))
        image = image.convert("RGB").resize(size, Image.Resampling.BILINEAR)
        label = np.asarray(Image.fromarray(label.astype(np.uint8)).resize(size, Image.Resampling.NEAREST))
        y0, y1, x0, x1 = crop_box(label, self.crop, self.cat_max_ratio)
        img, label = np.asarray(image)[y0:y1, x0:x1], label[y0:y1, x0:x1]
        if self.hflip > 0 and torch.rand(()).item() < self.hflip:
            img, label = img[:, ::-1], label[:, ::-1]
        if self.photometric:
            img = photometric_distortion(np.ascontiguousarray(img))
        x = _normalized(img, self.mean, self.std)
        h, w = label.shape
        padded = torch.zeros(3, self.crop, self.crop)
        padded[:, :h, :w] = x
        target = torch.full((self.crop, self.crop), IGNORE, dtype=torch.long)
        target[:h, :w] = torch.from_numpy(label.astype(np.int64))
        return padded, target


class SegEvalTransform:
    """(PIL image, targets) -> (the image rescaled to fit ``scale``, normalised; targets as they are)."""

    def __init__(self, scale: Sequence[float] = (2048, 512), mean: Sequence[float] = IMAGENET_INCEPTION_MEAN,
                 std: Sequence[float] = IMAGENET_INCEPTION_STD, interpolation: str = "bilinear"):
        self.rescale, self.mean, self.std = Rescale(scale, interpolation), tuple(mean), tuple(std)

    def image(self, image: Image.Image) -> Tensor:
        return _normalized(np.asarray(self.rescale(image.convert("RGB"))), self.mean, self.std)

    def __call__(self, image: Image.Image, label: np.ndarray) -> tuple[Tensor, Tensor]:
        return self.image(image), torch.from_numpy(label.astype(np.int64))


def seg_preprocess(crop: int, scale: Sequence[float], interpolation: str = "bilinear",
                   mean: Sequence[float] = IMAGENET_INCEPTION_MEAN,
                   std: Sequence[float] = IMAGENET_INCEPTION_STD) -> dict:
    """The evaluation preprocessing as data (saved with a model; ``transforms.eval_transform`` rebuilds
    it): rescale to fit ``scale``, normalise; windows of ``crop`` pixels are the model's input."""
    return {"size": crop, "resize": "rescale", "scale": [int(s) for s in scale], "crop_pct": 1.0,
            "interpolation": interpolation, "mean": list(mean), "std": list(std)}


__all__ = ["Rescale", "SegEvalTransform", "SegTrainTransform", "crop_box", "photometric_distortion", "rescale_size",
           "seg_preprocess"]
