"""Image transforms: BEiT-3 pretraining views and the per-task fine-tuning transforms.

Pretraining (BEiT v2 ``DataAugmentationForBEiT``, used by BEiT-3): colour jitter 0.4, horizontal
flip, then one RandomResizedCrop resized twice (``RandomResizedCropAndInterpolationWithTwoPic``):
the model view is normalised with mean = std = 0.5 (IMAGENET_INCEPTION_MEAN/STD, what BEiT-3 uses
for pretraining and vision-language tasks) and the visual-tokenizer view of the *same* crop stays
raw [0, 1] pixels, as VQ-KD normalises its input itself.

Fine-tuning follows unilm/beit3 ``datasets.build_transform``: vision-language tasks crop with scale
(0.5, 1), flip and unilm's RandomAugment(2, 7) over geometric/tone ops (``randaug``: translations
of at most 7 px), and resize to S x S without a crop at eval; classification uses timm's
``create_transform`` (timm's RandAugment) with ImageNet mean/std.

All pretraining randomness comes from torch's global generator, so seeding it (the loader does, per
batch, inside ``torch.random.fork_rng``) makes a view reproducible.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.data import create_transform
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from beit3.data.randaug import VL_OPS, RandomAugment
from beit3.data.seg_transforms import Rescale

BEIT3_MEAN, BEIT3_STD = IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD  # (0.5,) * 3: pixels -> [-1, 1]
BEIT_CROP_SCALE = (0.08, 1.0)  # BEiT / BEiT v2 pretraining: `--min_crop_scale 0.08`, the whole image at most
VL_CROP_SCALE = (0.5, 1.0)  # unilm/beit3 build_transform for VQA, retrieval, captioning, NLVR2
VL_RANDAUG_N, VL_RANDAUG_M = 2, 7  # unilm/beit3 RandomAugment(2, 7, isPIL=True, augs=VL_OPS)
CLS_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"  # BEiT-3 ImageNet fine-tuning `--aa`


def interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name)
    except ValueError:
        raise ValueError(f"unknown interpolation {name!r}; use one of "
                         f"{[m.value for m in InterpolationMode]}") from None


class RandomResizedCropTwoViews:
    """One random resized crop, resized to two sizes (BEiT's ``RandomResizedCropAndInterpolationWithTwoPic``).

    Returns ``(view, second_view)`` PIL images of ``size`` and ``second_size`` pixels square, both
    cut from the same box of the input.
    """

    def __init__(self, size: int, second_size: int, scale: tuple[float, float] = BEIT_CROP_SCALE,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), interp: str = "bicubic",
                 second_interp: str = "bicubic"):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
        self.size, self.second_size, self.scale, self.ratio = size, second_size, scale, ratio
        self.interp, self.second_interp = interpolation(interp), interpolation(second_interp)

    def __call__(self, img: Image.Image) -> tuple[Image.Image, Image.Image]:
        top, left, h, w = T.RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        view = F.resized_crop(img, top, left, h, w, [self.size, self.size], self.interp)
        second = F.resized_crop(img, top, left, h, w, [self.second_size, self.second_size], self.second_interp)
        return view, second

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, second_size={self.second_size}, scale={self.scale}, "
                f"interp={self.interp.value}, second_interp={self.second_interp.value})")


class PretrainImageTransform:
    """BEiT pretraining augmentation of one PIL image.

    Returns ``image`` float (3, img_size, img_size) normalised with mean = std = 0.5 and
    ``tokenizer_image`` float (3, tokenizer_img_size, tokenizer_img_size) in [0, 1], the same crop.
    """

    def __init__(self, img_size: int, tokenizer_img_size: int, crop_scale: tuple[float, float] = BEIT_CROP_SCALE,
                 color_jitter: float = 0.4, hflip: float = 0.5, interp: str = "bicubic",
                 tokenizer_interp: str = "bicubic"):
        common = [T.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter > 0 else []
        if hflip > 0:
            common.append(T.RandomHorizontalFlip(hflip))
        self.common = T.Compose(common)
        self.crop = RandomResizedCropTwoViews(img_size, tokenizer_img_size, tuple(crop_scale),
                                              interp=interp, second_interp=tokenizer_interp)
        self.normalize = T.Normalize(BEIT3_MEAN, BEIT3_STD)

    def __call__(self, img: Image.Image | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A PIL image, or a uint8 (3, H, W) tensor (the same ops on the tensor, antialiased)."""
        if isinstance(img, torch.Tensor):
            view, tok_view = self.crop(self.common(img))
            return self.normalize(view.float().div_(255)), tok_view.float().div_(255)
        view, tok_view = self.crop(self.common(img.convert("RGB")))
        return self.normalize(F.to_tensor(view)), F.to_tensor(tok_view)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.common}, {self.crop}, normalize mean=std=0.5)"


def build_vl_transform(img_size: int, train: bool, randaug: bool = True, hflip: float = 0.5,
                       scale: tuple[float, float] = VL_CROP_SCALE, interp: str = "bicubic") -> Callable:
    """Transform for VQA, retrieval, captioning and NLVR2 images (unilm/beit3 ``build_transform``).

    train: RandomResizedCrop(scale) + RandomHorizontalFlip(hflip) + unilm's RandomAugment(n=2, m=7)
    over ``randaug.VL_OPS``; eval: resize to (img_size, img_size), no crop. Both end in mean = std = 0.5.
    Set ``hflip=0`` where texts say "left"/"right" (the synthetic world's captions and questions).
    """
    mode = interpolation(interp)
    tail = [T.ToTensor(), T.Normalize(BEIT3_MEAN, BEIT3_STD)]
    if not train:
        return eval_transform(vl_preprocess(img_size, interp))
    t = [T.RandomResizedCrop(img_size, scale=scale, interpolation=mode)]
    if hflip > 0:
        t.append(T.RandomHorizontalFlip(hflip))
    if randaug:
        t.append(RandomAugment(VL_RANDAUG_N, VL_RANDAUG_M, VL_OPS))
    return T.Compose(t + tail)


def build_cls_transform(img_size: int, train: bool, auto_augment: str | None = CLS_AUTO_AUGMENT,
                        color_jitter: float = 0.4, re_prob: float = 0.25, crop_pct: float = 1.0,
                        interp: str = "bicubic") -> Callable:
    """Image classification transform (unilm/beit3 ``build_imagenet_transform``), ImageNet mean/std.

    train: timm ``create_transform`` (RandomResizedCrop, flip, RandAugment ``auto_augment``,
    random erasing ``re_prob`` in pixel mode); eval: resize the short side to
    ``img_size / crop_pct`` and centre-crop ``img_size`` (BEiT-3's default crop_pct is 1.0).
    Inputs of 32 px or less (CIFAR) use RandomCrop(padding=4) and no eval resize, as unilm/beit3.
    """
    if train:
        tf = create_transform(img_size, is_training=True, color_jitter=color_jitter, auto_augment=auto_augment,
                              interpolation=interp, re_prob=re_prob, re_mode="pixel", re_count=1,
                              mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
        if img_size <= 32:
            tf.transforms[0] = T.RandomCrop(img_size, padding=4)
        return tf
    return eval_transform(cls_preprocess(img_size, crop_pct, interp))


# -- evaluation preprocessing as data: saved with a model, rebuilt identically ----------------------
def vl_preprocess(img_size: int, interp: str = "bicubic") -> dict:
    """Vision-language eval: resize to S x S (no crop), mean = std = 0.5."""
    return {"size": img_size, "resize": "square", "crop_pct": 1.0, "interpolation": interp,
            "mean": list(BEIT3_MEAN), "std": list(BEIT3_STD)}


def cls_preprocess(img_size: int, crop_pct: float = 1.0, interp: str = "bicubic") -> dict:
    """Classification eval: short side to S / crop_pct, centre crop S (none at 32 px or less, CIFAR)."""
    return {"size": img_size, "resize": "short_side" if img_size > 32 else "none", "crop_pct": crop_pct,
            "interpolation": interp, "mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD)}


def eval_transform(p: dict) -> Callable:
    """The PIL image -> (3, S, S) tensor transform that a preprocessing dict describes (segmentation's
    "rescale": (3, H, W) fitting ``scale``)."""
    size, mode = int(p["size"]), interpolation(p["interpolation"])
    if p["resize"] == "square":
        t = [T.Resize((size, size), interpolation=mode)]
    elif p["resize"] == "short_side":
        t = [T.Resize(int(size / p["crop_pct"]), interpolation=mode), T.CenterCrop(size)]
    elif p["resize"] == "none":
        t = []
    elif p["resize"] == "rescale":  # segmentation: the whole image, aspect kept, to fit (long, short)
        t = [Rescale(p["scale"], p["interpolation"])]
    else:
        raise ValueError(f"preprocessing resize {p['resize']!r}: expected square, short_side, rescale or none")
    return T.Compose(t + [T.ToTensor(), T.Normalize(tuple(p["mean"]), tuple(p["std"]))])
