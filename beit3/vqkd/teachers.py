"""Teachers for VQ-KD: frozen modules mapping images to patch features on the tokenizer's grid.

Every teacher takes images (B, 3, H, W) with pixels in [0, 1] and returns (B, grid*grid, dim);
it normalises the pixels itself. Kinds:

* ``hog``: MaskFeat-style histograms of oriented gradients, no weights (offline demo, tests);
* ``pixel``: per-patch normalised pixels (MAE's norm_pix target), no weights;
* any timm model name with a local weights file: ``forward_features`` patch tokens;
* ``open_clip:<model name>`` with a local weights file: CLIP's projected patch tokens, the target
  of the published BEiT v2 tokenizers (``ln_post(tokens) @ proj``, 512-d for ViT-B/16).

Nothing is ever downloaded.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from torch import Tensor, nn

from beit3.core.errors import BadFileError, first_line

OPEN_CLIP_PREFIX = "open_clip:"


class Teacher(nn.Module):
    """Frozen feature extractor. Subclasses set ``dim`` and implement ``features``."""

    dim: int

    def __init__(self, grid: int):
        super().__init__()
        self.grid = grid

    def freeze(self) -> "Teacher":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # a teacher never leaves eval mode

    def features(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) in [0, 1] -> (B, grid*grid, dim) float32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{type(self).__name__}: expected images (B, 3, H, W), got {tuple(images.shape)}")
        return self.features(images).float()


def _to_grid(maps: Tensor, grid: int) -> Tensor:
    """maps: (B, C, h, w) -> (B, grid*grid, C), bilinearly resized when h, w != grid."""
    if tuple(maps.shape[-2:]) != (grid, grid):
        maps = F.interpolate(maps.float(), size=(grid, grid), mode="bilinear", align_corners=False)
    return maps.flatten(2).transpose(1, 2)


class HOGTeacher(Teacher):
    """Histograms of oriented gradients per patch (MaskFeat, Wei et al. 2022, Sec. 3.2).

    Per RGB channel: central-difference gradients, unsigned orientation in [0, pi) hard-binned into
    ``nbins`` bins weighted by the gradient magnitude, summed over ``cells x cells`` cells per
    patch. A patch's 3 * nbins * cells^2 values are l2-normalised together. MaskFeat also weights
    magnitudes by a Gaussian window; that is left out here.
    """

    def __init__(self, grid: int, nbins: int = 9, cells: int = 2):
        super().__init__(grid)
        self.nbins, self.cells = nbins, cells
        self.dim = 3 * nbins * cells * cells
        kx = torch.tensor([[-1.0, 0.0, 1.0]]).reshape(1, 1, 1, 3).repeat(3, 1, 1, 1)
        self.register_buffer("kx", kx, persistent=False)  # (3, 1, 1, 3), one filter per channel
        self.register_buffer("ky", kx.transpose(-1, -2).contiguous(), persistent=False)
        self.freeze()

    def features(self, images: Tensor) -> Tensor:
        b, _, h, w = images.shape
        cells = self.grid * self.cells
        if h != w or h % cells:
            raise ValueError(f"HOG teacher: image size {h}x{w} must be square and a multiple of "
                             f"grid {self.grid} x cells {self.cells} = {cells}")
        x = images.float()
        gx = F.conv2d(F.pad(x, (1, 1, 0, 0), mode="replicate"), self.kx, groups=3)  # (B, 3, H, W)
        gy = F.conv2d(F.pad(x, (0, 0, 1, 1), mode="replicate"), self.ky, groups=3)
        mag = torch.sqrt(gx**2 + gy**2)
        angle = torch.remainder(torch.atan2(gy, gx), math.pi)  # unsigned orientation, [0, pi)
        bins = (angle / (math.pi / self.nbins)).long().clamp_(max=self.nbins - 1)
        hist = torch.zeros(b, 3, self.nbins, h, w, device=x.device)
        hist.scatter_(2, bins.unsqueeze(2), mag.unsqueeze(2))  # (B, 3, nbins, H, W)
        cell = h // cells
        hist = F.avg_pool2d(hist.flatten(1, 2), cell) * cell**2  # sums: (B, 3*nbins, cells, cells)
        g, c = self.grid, self.cells
        hist = hist.reshape(b, 3 * self.nbins, g, c, g, c).permute(0, 2, 4, 1, 3, 5)  # (B, g, g, 3*nb, c, c)
        return F.normalize(hist.reshape(b, g * g, self.dim), dim=-1)


class PixelTeacher(Teacher):
    """Pixels of each patch, normalised by the patch's own mean and std (MAE's norm_pix_loss)."""

    def __init__(self, grid: int, img_size: int):
        super().__init__(grid)
        if img_size % grid:
            raise ValueError(f"pixel teacher: img_size={img_size} is not a multiple of grid={grid}")
        self.patch = img_size // grid
        self.dim = 3 * self.patch**2
        self.freeze()

    def features(self, images: Tensor) -> Tensor:
        p = self.patch
        if tuple(images.shape[-2:]) != (self.grid * p,) * 2:
            raise ValueError(f"pixel teacher: expected {self.grid * p}x{self.grid * p} images, "
                             f"got {tuple(images.shape[-2:])}")
        patches = F.unfold(images.float(), kernel_size=p, stride=p).transpose(1, 2)  # (B, N, 3*p*p)
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        return (patches - mean) / (var + 1e-6).sqrt()


class _ResizeNormalize(nn.Module):
    """Resize [0, 1] images to ``size`` (bicubic) and normalise with the model's mean and std."""

    def __init__(self, size: tuple[int, int], mean, std):
        super().__init__()
        self.size = tuple(size)
        self.register_buffer("mean", torch.tensor(mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        if tuple(images.shape[-2:]) != self.size:
            images = F.interpolate(images.float(), size=self.size, mode="bicubic", align_corners=False)
        return (images.clamp(0, 1) - self.mean) / self.std


def _weights_file(weights: str | os.PathLike | None, name: str) -> str:
    if weights is None:
        raise ValueError(f"teacher {name!r} needs a local weights file (--teacher-weights); "
                         "nothing is downloaded")
    if not Path(weights).is_file():
        raise FileNotFoundError(f"weights file {weights} for teacher {name!r} does not exist")
    if os.path.getsize(weights) == 0:
        raise BadFileError(weights, f"empty file, not the weights of teacher {name!r} (--teacher-weights)")
    return str(weights)


@contextlib.contextmanager
def _reading(path: str, name: str):
    """A weights file the library cannot load (truncated, another format, another model's): one line
    naming it, whatever the library raised."""
    try:
        yield
    except Exception as e:  # timm and open_clip raise EOFError, RuntimeError, pickle and safetensors errors
        raise BadFileError(path, f"cannot be loaded as the weights of teacher {name!r} (--teacher-weights): "
                                 f"{type(e).__name__}: {first_line(e)}") from None


class TimmTeacher(Teacher):
    """A timm model with local weights; its patch tokens (prefix tokens dropped) or feature map."""

    def __init__(self, name: str, weights: str | os.PathLike | None, grid: int):
        super().__init__(grid)
        path = _weights_file(weights, name)
        # pretrained=True with a file overlay: timm reads the file (weights_only), applies the
        # model's checkpoint filter (e.g. OpenAI CLIP -> timm names) and drops the classifier.
        # A set 'file' with source '' is the branch of timm's resolver that never downloads.
        with _reading(path, name):
            self.model = timm.create_model(name, pretrained=True, num_classes=0,
                                           pretrained_cfg_overlay=dict(file=path, source=""))
        cfg = resolve_model_data_config(self.model)
        self.prep = _ResizeNormalize(cfg["input_size"][1:], cfg["mean"], cfg["std"])
        self.dim = self.model.num_features
        self.freeze()

    def features(self, images: Tensor) -> Tensor:
        out = self.model.forward_features(self.prep(images))
        if out.ndim == 4:  # convolutional feature map (B, C, h, w)
            return _to_grid(out, self.grid)
        tokens = out[:, getattr(self.model, "num_prefix_tokens", 0):]  # (B, h*w, C)
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(f"timm teacher: {tokens.shape[1]} patch tokens do not form a square grid")
        return _to_grid(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side), self.grid)


class OpenClipTeacher(Teacher):
    """open_clip image tower: ``ln_post`` patch tokens projected by ``visual.proj``, as beit2's
    CLIP teacher (``encode_image(return_all_tokens=True) @ visual.proj``)."""

    def __init__(self, name: str, weights: str | os.PathLike | None, grid: int):
        super().__init__(grid)
        try:
            import open_clip  # optional: not a dependency of beit3; only open_clip teachers need it
        except ImportError as e:
            raise ImportError(f"teacher {OPEN_CLIP_PREFIX}{name} needs the open_clip package: "
                              "pip install open_clip_torch") from e
        path = _weights_file(weights, OPEN_CLIP_PREFIX + name)
        with _reading(path, OPEN_CLIP_PREFIX + name):
            model = open_clip.create_model(name, pretrained=path)
        self.visual = model.visual
        self.visual.output_tokens = True
        size = self.visual.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.prep = _ResizeNormalize(size, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
        self.dim = self.visual.output_dim
        self.freeze()

    def features(self, images: Tensor) -> Tensor:
        _, tokens = self.visual(self.prep(images))  # (B, h*w, width), after ln_post
        tokens = tokens @ self.visual.proj  # (B, h*w, dim)
        side = math.isqrt(tokens.shape[1])
        return _to_grid(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side), self.grid)


def build_teacher(name: str, weights: str | os.PathLike | None = None, *, grid: int,
                  img_size: int) -> Teacher:
    """``hog`` | ``pixel`` | ``open_clip:<model>`` | a timm model name. ``grid`` is the tokenizer's
    grid side, ``img_size`` its image side (the size of the images the teacher is given)."""
    if name == "hog":
        teacher = HOGTeacher(grid)
        if img_size % (grid * teacher.cells):
            raise ValueError(f"HOG teacher: img_size={img_size} is not a multiple of "
                             f"grid {grid} x {teacher.cells} cells")
        return teacher
    if name == "pixel":
        return PixelTeacher(grid, img_size)
    if name.startswith(OPEN_CLIP_PREFIX):
        return OpenClipTeacher(name[len(OPEN_CLIP_PREFIX):], weights, grid)
    if not timm.is_model(name):
        raise ValueError(f"unknown teacher {name!r}: expected 'hog', 'pixel', "
                         f"'{OPEN_CLIP_PREFIX}<model>' or a timm model name")
    return TimmTeacher(name, weights, grid)
