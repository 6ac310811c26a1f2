"""Readers of the unilm/beit3 downstream index files (see ``build``) as torch Datasets.

Each ``__getitem__`` returns a dict of tensors (plus ids); the default ``collate`` batches them:

- ``image``: the ``transform`` of the RGB image (default ``ToTensor``: (3, H, W) float);
- ``text`` (max_len,) long ``[<s>] + ids[:max_len-2] + [</s>]`` right-padded with ``<pad>``, and
  ``padding_mask`` (max_len,) bool, True at padding (unilm/beit3 ``_get_text_segment``);
- task fields: VQA ``labels`` (num_answers,) float soft scores and ``qid``; retrieval and
  captioning ``image_id``; NLVR2 ``image2``, ``label``, ``identifier``; classification ``label``.

Image paths are relative to ``data_root``. A missing or undecodable image (a decompression bomb
included) raises :class:`ImageLoadError` naming the file and the index it came from, rather than
being skipped: a map-style dataset that drops items changes its length mid-epoch. Training skips
such items with ``bad_images.SkipUnreadable``; evaluation does not. Each reader names the keys its
entries need (``required_keys``) and the files they point to (``image_keys``), which
``index_check`` verifies before a run starts. Given a ``TextTokenizer``, a reader refuses index
files that another SentencePiece model tokenized (``provenance``).
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from beit3.data.downstream.build import read_jsonl
from beit3.data.downstream.provenance import check_index_tokenizer
from beit3.core.errors import BadFileError, UserError
from beit3.data.text_tokenizer import TextTokenizer

# (task, split) -> index files, as unilm/beit3 ``get_index_files``.
INDEX_FILES = {
    ("vqa", "train"): ("vqa.train.jsonl", "vqa.trainable_val.jsonl"),
    ("vqa", "val"): ("vqa.rest_val.jsonl",),
    ("vqa", "test"): ("vqa.test.jsonl",),
    ("vqa", "test-dev"): ("vqa.test-dev.jsonl",),
    ("nlvr2", "train"): ("nlvr2.train.index.jsonl",),
    ("nlvr2", "val"): ("nlvr2.dev.index.jsonl",),
    ("nlvr2", "test"): ("nlvr2.test-P.index.jsonl",),
    ("imagenet", "train"): ("imagenet.train.index.jsonl",),
    ("imagenet", "val"): ("imagenet.val.index.jsonl",),
    ("imagenet", "test"): ("imagenet.val.index.jsonl",),
    ("coco_captioning", "train"): ("coco_captioning.train.jsonl",),
    ("nocaps", "train"): ("coco_captioning.train.jsonl",),  # nocaps trains on COCO captions
}
for _task in ("coco_retrieval", "flickr30k", "coco_captioning", "nocaps"):
    for _split in ("train", "val", "test"):
        INDEX_FILES.setdefault((_task, _split), (f"{_task}.{_split}.jsonl",))


class ImageLoadError(UserError, RuntimeError):
    """An image of a dataset could not be read or decoded; ``path`` is the file."""

    def __init__(self, message: str, path: str | os.PathLike = ""):
        super().__init__(message)
        self.path = os.fspath(path)


def index_files(task: str, split: str) -> tuple[str, ...]:
    if (task, split) not in INDEX_FILES:
        known = sorted({s for t, s in INDEX_FILES if t == task}) or sorted({t for t, _ in INDEX_FILES})
        raise ValueError(f"no index files for task {task!r} split {split!r}; known: {known}")
    return INDEX_FILES[(task, split)]


def load_image(path: str | os.PathLike, source: str = "") -> Image.Image:
    """RGB PIL image at ``path``; failures raise :class:`ImageLoadError` naming the file."""
    where = f" (listed in {source})" if source else ""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise ImageLoadError(f"image {path}{where} does not exist", path) from None
    except Image.DecompressionBombError as e:  # refused before decoding: no memory spent on it
        raise ImageLoadError(f"image {path}{where} is too large to decode safely: {e}", path) from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageLoadError(f"cannot decode image {path}{where}: {e}", path) from e


def text_segment_to_input(segment: Sequence[int], max_len: int, bos_id: int, eos_id: int,
                          pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """unilm/beit3 ``_get_text_segment``: ``(text, padding_mask)``, both (max_len,); the segment is
    cut to ``max_len - 2`` ids, wrapped in ``<s>``/``</s>`` and padded; the mask is True at padding."""
    if len(segment) == 0:
        raise ValueError("a text segment needs at least one token")
    if max_len < 3:
        raise ValueError(f"max_len={max_len} leaves no room for a token between <s> and </s>")
    ids = [bos_id, *segment[: max_len - 2], eos_id]
    text = torch.full((max_len,), pad_id, dtype=torch.long)
    text[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    return text, torch.arange(max_len) >= len(ids)


class IndexDataset(Dataset):
    """Items of JSON-lines index files under ``data_root``, with image and text helpers.

    ``tokenizer`` supplies ``bos_id``/``eos_id``/``pad_id`` (and ``encode`` when an index holds
    raw strings as ``text_segment``); by default the fixed ids of the BEiT-3 layout.
    """

    required_keys: tuple[str, ...] = ("image_path",)
    image_keys: tuple[str, ...] = ("image_path",)

    def __init__(self, data_root: str | os.PathLike, index_names: Sequence[str],
                 transform: Callable | None = None, tokenizer: Any = None, max_len: int = 64):
        self.data_root = Path(data_root)
        self.index_paths = [self.data_root / name for name in index_names]
        self.items: list[dict] = []
        self._sources: list[tuple[int, Path]] = []  # (first item, index file)
        for path in self.index_paths:
            if not path.is_file():
                raise FileNotFoundError(f"index file {path} does not exist (build it with beit3.data.downstream)")
            self._sources.append((len(self.items), path))
            self.items += read_jsonl(path)
        self.transform = transform or T.ToTensor()
        self.tokenizer = tokenizer
        self.max_len = max_len
        if isinstance(tokenizer, TextTokenizer):
            check_index_tokenizer(self.index_paths, tokenizer)

    def __len__(self) -> int:
        return len(self.items)

    def _source(self, index: int) -> Path:
        return next(path for start, path in reversed(self._sources) if index >= start)

    def entry_name(self, index: int) -> str:
        """``<index file> entry <n>`` (1-based within its file), for messages."""
        start, path = next((start, path) for start, path in reversed(self._sources) if index >= start)
        return f"{path.name} entry {index - start + 1}"

    def label_problem(self, item: dict) -> str | None:
        """What is wrong with the entry's label(s), if the reader has any."""
        return None

    def _image(self, index: int, key: str = "image_path") -> torch.Tensor:
        return self.transform(load_image(self.data_root / self.items[index][key], str(self._source(index))))

    def _text(self, segment: Sequence[int] | str) -> tuple[torch.Tensor, torch.Tensor]:
        tok = TextTokenizer if self.tokenizer is None else self.tokenizer  # class attributes hold the ids
        if isinstance(segment, str):
            if self.tokenizer is None:
                raise ValueError("this index stores raw text; pass a tokenizer to encode it")
            segment = tok.encode(segment)[1:-1]
        return text_segment_to_input(segment, self.max_len, tok.bos_id, tok.eos_id, tok.pad_id)

    def _image_text(self, index: int) -> dict[str, Any]:
        text, padding_mask = self._text(self.items[index]["text_segment"])
        return {"image": self._image(index), "text": text, "padding_mask": padding_mask}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} items from {[p.name for p in self.index_paths]} "
                f"under {self.data_root}, max_len={self.max_len})")


class VQADataset(IndexDataset):
    """VQAv2 (splits train = train + trainable_val, val = rest_val, test, test-dev).

    Items give ``qid`` and, when annotated, ``labels``: (num_answers,) float soft scores.
    """

    required_keys = ("image_path", "text_segment", "qid")

    def __init__(self, data_root: str | os.PathLike, split: str, transform: Callable | None = None,
                 tokenizer: Any = None, max_len: int = 64):
        super().__init__(data_root, index_files("vqa", split), transform, tokenizer, max_len)
        self.label2ans = load_answer2label(self.data_root / "answer2label.txt")
        self.ans2label = {a: i for i, a in enumerate(self.label2ans)}

    @property
    def num_answers(self) -> int:
        return len(self.label2ans)

    def label_problem(self, item: dict) -> str | None:
        labels, scores = item.get("labels") or [], item.get("scores") or []
        if len(labels) != len(scores):
            return f"{len(labels)} labels but {len(scores)} scores"
        bad = [y for y in labels if not isinstance(y, int) or not 0 <= y < self.num_answers]
        return f"answer labels {bad[:3]} outside 0..{self.num_answers - 1}" if bad else None

    def __getitem__(self, index: int) -> dict[str, Any]:
        item, data = self.items[index], self._image_text(index)
        data["qid"] = item["qid"]
        if item.get("labels"):
            data["labels"] = torch.zeros(self.num_answers)
            data["labels"][torch.tensor(item["labels"])] = torch.tensor(item["scores"], dtype=torch.float)
        return data


def load_answer2label(path: str | os.PathLike) -> list[str]:
    """Answers of ``answer2label.txt`` in label order (the labels must run 0, 1, 2, ...)."""
    answers = []
    for i, row in enumerate(read_jsonl(path)):
        if int(row.get("label", -1)) != i:
            raise ValueError(f"{path}: line {i + 1} has label {row.get('label')!r}, expected {i}")
        answers.append(row["answer"])
    return answers


class RetrievalDataset(IndexDataset):
    """COCO / Flickr30k retrieval (``task`` coco_retrieval or flickr30k): one item per caption,
    with ``image_id`` (the image's rank in the split) linking captions to their image."""

    required_keys = ("image_path", "text_segment", "image_id")

    def __init__(self, data_root: str | os.PathLike, split: str, transform: Callable | None = None,
                 tokenizer: Any = None, max_len: int = 64, task: str = "coco_retrieval"):
        super().__init__(data_root, index_files(task, split), transform, tokenizer, max_len)

    def __getitem__(self, index: int) -> dict[str, Any]:
        data = self._image_text(index)
        data["image_id"] = self.items[index]["image_id"]
        return data


class CaptioningDataset(IndexDataset):
    """COCO captioning / nocaps (``task``): train items have ``text``/``padding_mask`` (masking is
    the trainer's, see ``beit3.data.masking.mask_text``); val/test items only ``image`` and ``image_id``."""

    required_keys = ("image_path", "image_id")

    def __init__(self, data_root: str | os.PathLike, split: str, transform: Callable | None = None,
                 tokenizer: Any = None, max_len: int = 64, task: str = "coco_captioning"):
        super().__init__(data_root, index_files(task, split), transform, tokenizer, max_len)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        if item.get("text_segment") is None:
            data = {"image": self._image(index)}
        else:
            data = self._image_text(index)
        data["image_id"] = item["image_id"]
        return data


class NLVR2Dataset(IndexDataset):
    """NLVR2 (splits train, val = dev, test = test-P): two images, one sentence, ``label`` 0/1."""

    required_keys = ("image_path", "image2_path", "text_segment", "label", "identifier")
    image_keys = ("image_path", "image2_path")

    def label_problem(self, item: dict) -> str | None:
        return None if item.get("label") in (0, 1) else f"label {item.get('label')!r} is not 0 or 1"

    def __init__(self, data_root: str | os.PathLike, split: str, transform: Callable | None = None,
                 tokenizer: Any = None, max_len: int = 64):
        super().__init__(data_root, index_files("nlvr2", split), transform, tokenizer, max_len)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item, data = self.items[index], self._image_text(index)
        data["image2"] = self._image(index, "image2_path")
        data["label"] = item["label"]
        data["identifier"] = item["identifier"]
        return data


class ClassificationDataset(Dataset):
    """Image classification from ``root/imagenet.{split}.index.jsonl`` when present, else from the
    ImageFolder tree ``root/{split}/<class>/<image>`` (classes labelled in sorted order, the same
    labels the index builder gives). Items: ``image``, ``label``."""

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None):
        self.root, self.split = Path(root), split
        self.transform = transform or T.ToTensor()
        index = self.root / index_files("imagenet", split)[0]
        folder = self.root / split
        if index.is_file():
            self.source = str(index)
            # Entries are kept as read; index_check names those without an image or a label.
            self.items = read_jsonl(index)
            self.samples = [(str(self.root / str(it.get("image_path", ""))), it.get("label")) for it in self.items]
            self.classes = None
        elif folder.is_dir():
            self.source = str(folder)
            self.classes, class_to_idx = find_classes(str(folder))
            self.samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
        else:
            raise FileNotFoundError(f"no classification data for split {split!r}: "
                                    f"neither {index} nor {folder}/ exists")

    required_keys = ("image_path", "label")

    @property
    def num_classes(self) -> int:
        if self.classes is not None:
            return len(self.classes)
        return 1 + max((label for _, label in self.samples if isinstance(label, int)), default=-1)

    def entry_name(self, index: int) -> str:
        return f"{Path(self.source).name} entry {index + 1}" if self.classes is None else self.samples[index][0]

    def label_problem(self, item: dict) -> str | None:
        label = item.get("label")
        return None if isinstance(label, int) and label >= 0 else f"label {label!r} is not a class index (an int >= 0)"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        return {"image": self.transform(load_image(path, self.source)), "label": label}


class CIFARDataset(Dataset):
    """CIFAR-10 / CIFAR-100 read from their python pickles, nothing downloaded.

    ``root`` holds (or its ``cifar-10-batches-py`` / ``cifar-100-python`` folder holds) CIFAR-10's
    ``data_batch_1..5`` / ``test_batch`` (``labels``) or CIFAR-100's ``train`` / ``test``
    (``fine_labels``). Items: ``image`` (the transform of a 32x32 RGB PIL image) and ``label``.
    The pickles are read by an unpickler that builds only what the official files hold (numpy
    arrays, lists, dicts, strings, numbers): a planted file that would run code is refused.
    """

    def __init__(self, root: str | os.PathLike, train: bool = True, transform: Callable | None = None):
        self.root = _cifar_dir(Path(root))
        self.transform = transform or T.ToTensor()
        if (self.root / "test_batch").exists():
            names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
            meta, names_key = "batches.meta", "label_names"
        else:
            names, meta, names_key = ["train" if train else "test"], "meta", "fine_label_names"
        batches = [_load_pickle(self.root / n) for n in names]
        self.data = np.concatenate([_cifar_images(b, self.root / n) for b, n in zip(batches, names)])
        self.targets = [int(y) for b in batches for y in b.get("labels", b.get("fine_labels", []))]
        if len(self.targets) != len(self.data):
            raise ValueError(f"{self.root}: {len(self.data)} images but {len(self.targets)} labels "
                             "(expected a 'labels' or 'fine_labels' list per batch)")
        self.classes = _load_pickle(self.root / meta)[names_key] if (self.root / meta).exists() else None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.transform(Image.fromarray(self.data[index])), "label": self.targets[index]}


def _cifar_dir(root: Path) -> Path:
    for d in (root, root / "cifar-10-batches-py", root / "cifar-100-python"):
        if (d / "test_batch").exists() or (d / "test").is_file():
            return d
    raise FileNotFoundError(f"{root}: no CIFAR python batches (data_batch_1..5 + test_batch, or train + test)")


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only the callables a pickled numpy array needs: a pickle can call any function it
    names while it loads, and the CIFAR batches name nothing else."""

    ALLOWED = {(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
               for name in ("_reconstruct", "scalar")}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
                ("numpy._core.numeric", "_frombuffer"),
                ("_codecs", "encode")}  # Python 3 writes bytes into protocol-2 pickles as encode(str)

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}: a CIFAR batch holds only numpy arrays, "
                                         f"lists and plain values")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR batch {path} does not exist")
    try:
        with open(path, "rb") as f:
            data = _CifarUnpickler(f, encoding="latin1").load()  # the official batches were pickled by Python 2
    except pickle.UnpicklingError as e:
        raise BadFileError(path, f"not a CIFAR batch: {e}") from None
    except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise BadFileError(path, f"not a complete CIFAR batch ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise BadFileError(path, f"not a CIFAR batch: holds a {type(data).__name__}, not a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def _cifar_images(batch: dict, path: Path) -> np.ndarray:
    data = np.asarray(batch.get("data"), dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be (N, 3072) uint8 rows (R, G, B planes of 32x32), got {data.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)


__all__ = ["INDEX_FILES", "ImageLoadError", "IndexDataset", "VQADataset", "RetrievalDataset",
           "CaptioningDataset", "NLVR2Dataset", "ClassificationDataset", "CIFARDataset",
           "index_files", "load_image", "load_answer2label", "text_segment_to_input"]
