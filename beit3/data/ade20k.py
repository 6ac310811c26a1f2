"""ADE20K (the SceneParsing benchmark, 150 classes) as distributed in ``ADEChallengeData2016.zip``:

    ADEChallengeData2016/images/{training,validation}/*.jpg
    ADEChallengeData2016/annotations/{training,validation}/*.png    one class id a pixel

Annotation value 0 is "other" and is not scored; values 1..150 are the classes, read as 0..149
(mmsegmentation's ``reduce_zero_label``: 0 -> 255, v -> v - 1). ``IGNORE_INDEX`` (255) marks every
pixel the loss and the metric leave out (also the padding of crops). An ``objectInfo150.txt``
beside the folders (tab-separated ``Idx Ratio Train Val Name``, as in the release) gives the class
names and their number; without it the 150 names of mmsegmentation's ``ADE20KDataset`` are used.

Images and annotations are paired by file name. An image without its annotation (or the reverse)
stays in the list with the missing file's expected path: ``index_check`` counts and names the
missing files before a run, training skips those items like undecodable images
(``bad_images.SkipUnreadable``) and evaluation refuses them. An annotation that does not match its
image's size, is not a single-channel PNG, or holds ids past the classes raises ``ImageLoadError``
as well (skipped in training).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from beit3.core.errors import UserError
from beit3.data.downstream.datasets import ImageLoadError, load_image

FOLDER = "ADEChallengeData2016"
SPLIT_DIRS = {"train": "training", "val": "validation"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # the release has .jpg; the synthetic world links its .png
CLASS_FILE = "objectInfo150.txt"
IGNORE_INDEX = 255
# mmsegmentation's ADE20KDataset class names, in annotation order (1..150).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)
LAYOUT = (f"{FOLDER}/images/{{training,validation}}/*.jpg with {FOLDER}/annotations/{{training,validation}}/*.png")


class LayoutError(UserError, ValueError):
    """The data folder is not laid out as ADE20K is distributed."""


def find_root(data: str | os.PathLike) -> Path:
    """The ``ADEChallengeData2016`` folder: ``data`` itself or the one inside it."""
    data = Path(data)
    for root in (data, data / FOLDER):
        if (root / "images").is_dir() and (root / "annotations").is_dir():
            return root
    found = sorted(p.name for p in data.iterdir())[:8] if data.is_dir() else "nothing (no such folder)"
    raise LayoutError(f"{data}: expected ADE20K's layout {LAYOUT} (in it or in {data}/{FOLDER}); found {found}")


def read_class_names(root: Path) -> list[str]:
    """Names from ``objectInfo150.txt`` (the first synonym of each row), else ADE20K's 150."""
    path = root / CLASS_FILE
    if not path.is_file():
        return list(ADE20K_CLASSES)
    names = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        cells = line.split("\t")
        if n == 1 and cells[0].strip().lower() == "idx" or not line.strip():
            continue
        if len(cells) < 5 or not cells[0].strip().isdigit() or int(cells[0]) != len(names) + 1:
            raise LayoutError(f"{path} line {n}: expected 'Idx<TAB>Ratio<TAB>Train<TAB>Val<TAB>Name' with "
                              f"Idx {len(names) + 1}, got {line[:80]!r}")
        names.append(cells[4].replace(";", ",").split(",")[0].strip())
    if not names:
        raise LayoutError(f"{path}: no classes listed")
    return names


def _files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in suffixes}


def pair_files(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, annotation) paths of a split, by name; a missing partner keeps its expected path."""
    if split not in SPLIT_DIRS:
        raise ValueError(f"ADE20K has no annotated split {split!r}; splits: {', '.join(SPLIT_DIRS)}")
    img_dir, ann_dir = root / "images" / SPLIT_DIRS[split], root / "annotations" / SPLIT_DIRS[split]
    images, annotations = _files(img_dir, IMAGE_SUFFIXES), _files(ann_dir, (".png",))
    if not images and not annotations:
        raise LayoutError(f"{root}: no {split} pairs: expected {img_dir}/*.jpg and {ann_dir}/*.png ({LAYOUT})")
    return [(images.get(stem, img_dir / f"{stem}.jpg"), annotations.get(stem, ann_dir / f"{stem}.png"))
            for stem in sorted(images.keys() | annotations.keys())]


def load_annotation(path: Path, size: tuple[int, int], num_classes: int, source: str = "") -> np.ndarray:
    """(H, W) uint8 class ids of an annotation PNG as stored (0 = unlabeled, 1..num_classes)."""
    where = f" (annotation of {source})" if source else ""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise ImageLoadError(f"annotation {path}{where} is a {im.mode} image; expected one 8-bit class id "
                                     f"a pixel (mode L or P)", path)
            label = np.asarray(im)
    except FileNotFoundError:
        raise ImageLoadError(f"annotation {path}{where} does not exist", path) from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageLoadError(f"cannot decode annotation {path}{where}: {e}", path) from e
    if (label.shape[1], label.shape[0]) != size:
        raise ImageLoadError(f"annotation {path} is {label.shape[1]}x{label.shape[0]} but its image "
                             f"{source} is {size[0]}x{size[1]}", path)
    top = int(label.max(initial=0))
    if top > num_classes:
        raise ImageLoadError(f"annotation {path} holds class id {top}; the dataset has {num_classes} classes "
                             f"(ids 1..{num_classes}, 0 unlabeled)", path)
    return label


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """Stored ids -> targets: 0 -> ``IGNORE_INDEX``, v -> v - 1 (uint8: what the transforms resize)."""
    return np.where(label == 0, IGNORE_INDEX, label.astype(np.int64) - 1).astype(np.uint8)


def palette(n: int = 256) -> list[int]:
    """The PASCAL VOC colour map (index 0 black): distinct colours for a paletted class-id PNG."""
    out = []
    for i in range(n):
        rgb, c = [0, 0, 0], i
        for bit in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - bit)
            c >>= 3
        out += rgb
    return out


def annotation_image(classes: np.ndarray) -> Image.Image:
    """(H, W) class indices 0..n-1 -> a PNG-ready image in the annotation format (ids 1..n, 0 none),
    paletted so that it also shows the classes in colour; ``np.asarray`` of it gives the ids."""
    if classes.size and int(classes.max()) >= 255:
        raise ValueError("an 8-bit annotation holds at most 254 classes")
    ids = np.ascontiguousarray(classes.astype(np.int64) + 1, dtype=np.uint8)
    image = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
    image.putpalette(palette())
    return image


class ADE20KDataset(Dataset):
    """Items: ``image`` and ``label`` (long, ``IGNORE_INDEX`` where unscored) after ``transform``
    (``transform(pil_image, label_array) -> (image, label)``; default: tensors as stored)."""

    def __init__(self, data: str | os.PathLike, split: str, transform: Optional[Callable] = None):
        self.root, self.split = find_root(data), split
        self.classes = read_class_names(self.root)
        self.pairs = pair_files(self.root, split)
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def image_files(self) -> list[str]:
        """Every file the split reads (``index_check`` counts the missing ones)."""
        return [str(p) for pair in self.pairs for p in pair]

    def entry_name(self, index: int) -> str:
        return self.pairs[index][0].name

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The RGB image and its targets (``reduce_zero_label``) as stored."""
        image_path, ann_path = self.pairs[index]
        image = load_image(image_path)
        label = load_annotation(ann_path, image.size, self.num_classes, image_path.name)
        return image, reduce_zero_label(label)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self.load(index)
        if self.transform is None:
            pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, H, W) uint8
            return {"image": pixels, "label": torch.from_numpy(label).long()}
        image, label = self.transform(image, label)
        return {"image": image, "label": label}

    def __repr__(self) -> str:
        return f"ADE20KDataset({len(self)} {self.split} pairs under {self.root}, {self.num_classes} classes)"


__all__ = ["ADE20KDataset", "ADE20K_CLASSES", "CLASS_FILE", "FOLDER", "IGNORE_INDEX", "LayoutError", "SPLIT_DIRS",
           "annotation_image", "find_root", "load_annotation", "pair_files", "palette", "read_class_names",
           "reduce_zero_label"]
