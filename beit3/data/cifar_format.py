"""Write labelled images as CIFAR-10 / CIFAR-100 "python version" folders, byte-compatible in layout
with the official archives, so that the CIFAR reader can be tested end to end without a download.

    cifar-10-batches-py/   data_batch_1..5, test_batch   {data, labels, batch_label, filenames}
                           batches.meta                  {label_names, num_cases_per_batch, num_vis}
    cifar-100-python/      train, test                   {data, fine_labels, coarse_labels, batch_label, filenames}
                           meta                          {fine_label_names, coarse_label_names}

``data`` is (N, 3072) uint8: per image the 1024 red, then green, then blue values of the 32 x 32
picture, each plane row-major. The official files are Python 2 pickles (protocol 2) whose strings
are Python 2 ``str``: loaded with ``encoding="bytes"`` (the CIFAR page's snippet) the keys read
``b"data"``, ``b"labels"``; with ``encoding="latin1"`` (torchvision, ``CIFARDataset``) they read
``"data"``. :class:`_Py2Pickler` writes strings the same way, so both readings hold here too.
"""
from __future__ import annotations

import os
import pickle
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from beit3.core.errors import BadFileError, first_line

CIFAR10_DIR, CIFAR100_DIR = "cifar-10-batches-py", "cifar-100-python"
CIFAR10_TRAIN_BATCHES = 5
SIDE = 32


@dataclass
class CifarSplit:
    """Images of one split: ``images`` (N, 32, 32, 3) uint8 RGB, a label per image (``coarse``:
    CIFAR-100's superclass labels) and a file name per image."""

    images: np.ndarray
    labels: list[int]
    filenames: list[str]
    coarse: list[int] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.images)
        if self.images.dtype != np.uint8 or self.images.shape[1:] != (SIDE, SIDE, 3):
            raise ValueError(f"CIFAR images must be (N, 32, 32, 3) uint8, got {self.images.shape} {self.images.dtype}")
        if len(self.labels) != n or len(self.filenames) != n or len(self.coarse) not in (0, n):
            raise ValueError(f"{n} images but {len(self.labels)} labels, {len(self.filenames)} file names "
                             f"and {len(self.coarse)} coarse labels")

    def rows(self, index: slice = slice(None)) -> np.ndarray:
        """(N, 3072) uint8: the R, G, B planes of each image, row-major (the official ``data``)."""
        images = self.images[index]
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3 * SIDE * SIDE))


class _Py2Pickler(pickle._Pickler):
    """Protocol 2, with ``bytes`` written as Python 2 ``str`` (the BINSTRING opcodes Python 2's
    cPickle wrote the official batches with). Python 3's pickler writes ``bytes`` as a call that
    always loads as ``bytes``; only the pure-Python pickler lets a type's opcode be chosen."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _as_py2(obj):
    """Every ``str`` (keys, names) as the bytes of a Python 2 ``str``, recursively."""
    if isinstance(obj, str):
        return obj.encode("latin1")
    if isinstance(obj, dict):
        return {_as_py2(k): _as_py2(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_as_py2(v) for v in obj]
    return obj


def _dump(obj: dict, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(_as_py2(obj))


def write_cifar10(out_dir: str | os.PathLike, train: CifarSplit, test: CifarSplit,
                  label_names: Sequence[str]) -> Path:
    """``out_dir/cifar-10-batches-py`` (returned): the train split in 5 batches (sizes differ by at
    most one), the test split, and batches.meta."""
    d = Path(out_dir) / CIFAR10_DIR
    d.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(train.labels), CIFAR10_TRAIN_BATCHES + 1).round().astype(int)
    for i in range(CIFAR10_TRAIN_BATCHES):
        part = slice(bounds[i], bounds[i + 1])
        _dump({"batch_label": f"training batch {i + 1} of {CIFAR10_TRAIN_BATCHES}", "labels": train.labels[part],
               "data": train.rows(part), "filenames": train.filenames[part]}, d / f"data_batch_{i + 1}")
    _dump({"batch_label": "testing batch 1 of 1", "labels": test.labels, "data": test.rows(),
           "filenames": test.filenames}, d / "test_batch")
    _dump({"num_cases_per_batch": int(bounds[1]), "label_names": list(label_names), "num_vis": 3 * SIDE * SIDE},
          d / "batches.meta")
    return d


def write_cifar100(out_dir: str | os.PathLike, train: CifarSplit, test: CifarSplit, fine_names: Sequence[str],
                   coarse_names: Sequence[str]) -> Path:
    """``out_dir/cifar-100-python`` (returned): train, test (fine and coarse labels) and meta."""
    d = Path(out_dir) / CIFAR100_DIR
    d.mkdir(parents=True, exist_ok=True)
    for name, split, desc in (("train", train, "training"), ("test", test, "testing")):
        if not split.coarse:
            raise ValueError(f"CIFAR-100 {name} split needs coarse labels")
        _dump({"filenames": split.filenames, "batch_label": f"{desc} batch 1 of 1", "fine_labels": split.labels,
               "coarse_labels": split.coarse, "data": split.rows()}, d / name)
    _dump({"fine_label_names": list(fine_names), "coarse_label_names": list(coarse_names)}, d / "meta")
    return d


def load_split(folder: str | os.PathLike, classes: Sequence[str],
               coarse_of: Callable[[str], int] | None = None, seed: int = 0) -> CifarSplit:
    """An ImageFolder tree ``folder/<class>/<image>`` as a CIFAR split: every image squashed to 32 x 32
    (bicubic, antialiased), labelled by its class's index in ``classes``, in a random order (``seed``)
    as the official batches are, rather than class by class."""
    samples = make_dataset(str(folder), {c: i for i, c in enumerate(classes)}, extensions=IMG_EXTENSIONS)
    samples = [samples[i] for i in np.random.default_rng(seed).permutation(len(samples))]
    images = np.empty((len(samples), SIDE, SIDE, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(samples):
        images[i] = _thumbnail(path)
    labels = [label for _, label in samples]
    coarse = [coarse_of(classes[y]) for y in labels] if coarse_of else []
    return CifarSplit(images, labels, [os.path.basename(p) for p, _ in samples], coarse)


def _thumbnail(path: str) -> np.ndarray:
    """(32, 32, 3) uint8 of the image at ``path``; a file that is no image is a BadFileError."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BICUBIC))
    except Image.DecompressionBombError as e:
        raise BadFileError(path, f"too large to decode safely ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError, truncated data
        raise BadFileError(path, f"not a decodable image ({first_line(e)})") from None


def cifar_from_image_folder(src: str | os.PathLike, out_dir: str | os.PathLike, kind: str = "cifar10",
                            coarse_of: Callable[[str], str] | None = None) -> Path:
    """CIFAR-10 or CIFAR-100 folder (returned) from the ImageFolder trees ``src/train`` (-> the train
    batches) and ``src/val`` (-> the test batch); classes in sorted order, as ImageFolder labels them.

    ``coarse_of`` (CIFAR-100): class name -> superclass name (default: each class its own
    superclass). For the synthetic world's ``classification/`` tree (classes ``{color}_{shape}``),
    ``lambda c: c.split("_")[1]`` groups the classes by shape.
    """
    src = Path(src)
    if kind not in ("cifar10", "cifar100"):
        raise ValueError(f"kind must be 'cifar10' or 'cifar100', got {kind!r}")
    for split in ("train", "val"):
        if not (src / split).is_dir():
            raise FileNotFoundError(f"{src / split}: no such ImageFolder tree (expected {split}/<class>/<image>)")
    classes, _ = find_classes(str(src / "train"))
    if kind == "cifar10":
        return write_cifar10(out_dir, load_split(src / "train", classes), load_split(src / "val", classes), classes)
    coarse_of = coarse_of or (lambda c: c)
    coarse_names = sorted({coarse_of(c) for c in classes})
    to_coarse = {c: coarse_names.index(coarse_of(c)) for c in classes}
    train, test = (load_split(src / s, classes, to_coarse.__getitem__) for s in ("train", "val"))
    return write_cifar100(out_dir, train, test, classes, coarse_names)


__all__ = ["CifarSplit", "write_cifar10", "write_cifar100", "load_split", "cifar_from_image_folder"]
