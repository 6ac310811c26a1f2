"""A fine-tuning dataset checked before a run trains on it: the keys its reader needs, labels in
range, image files that exist.

A missing key or a label out of range would stop a run (or train it on a wrong target) hours in;
here each is an error naming the index file and the entry. Missing image files are counted: a
training set may lack up to ``max_missing`` (a fraction) of its images, which are then skipped
like undecodable ones (``bad_images``); an evaluation set may lack none, since skipping would
change its score.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Optional

from tqdm import tqdm

from beit3.core.errors import UserError
from beit3.data.downstream.datasets import CIFARDataset, ClassificationDataset, IndexDataset

SHOWN = 5  # problems quoted in one message
PROGRESS_FROM = 5000  # image files: below this the check is too short for a progress bar


class IndexProblemError(UserError, ValueError):
    pass


def _entries(ds) -> Iterator[tuple[int, dict]]:
    if isinstance(ds, IndexDataset) or (isinstance(ds, ClassificationDataset) and ds.classes is None):
        yield from enumerate(ds.items)
    elif isinstance(ds, ClassificationDataset):  # an ImageFolder tree: labels come from folder names
        yield from ((i, {"image_path": p, "label": y}) for i, (p, y) in enumerate(ds.samples))
    elif isinstance(ds, CIFARDataset):
        yield from ((i, {"label": y}) for i, y in enumerate(ds.targets))


def entry_problems(ds, num_classes: Optional[int] = None) -> list[str]:
    """``<where>: <what>`` for every entry the reader could not use."""
    required = getattr(ds, "required_keys", ("label",))
    label_problem = getattr(ds, "label_problem", None)
    if num_classes is None and getattr(ds, "classes", None):
        num_classes = len(ds.classes)
    out = []
    for i, item in _entries(ds):
        where = ds.entry_name(i) if hasattr(ds, "entry_name") else f"item {i + 1}"
        absent = [k for k in required if item.get(k) is None]
        if absent:
            out.append(f"{where}: no {', '.join(repr(k) for k in absent)}")
            continue
        problem = label_problem(item) if label_problem is not None else None
        label = item.get("label")
        if problem is None and num_classes is not None and isinstance(label, int) and not 0 <= label < num_classes:
            problem = f"label {label} outside 0..{num_classes - 1} (the training set's classes)"
        if problem is not None:
            out.append(f"{where}: {problem}")
    return out


def image_files(ds) -> list[str]:
    """Every distinct image file the dataset reads (none for CIFAR, whose images are in the batches)."""
    if isinstance(ds, IndexDataset):
        paths = (str(ds.data_root / item[k]) for item in ds.items for k in ds.image_keys if item.get(k))
    elif isinstance(ds, ClassificationDataset):
        paths = (p for p, _ in ds.samples)
    elif hasattr(ds, "image_files"):  # a reader that lists its own files (ADE20K: images and annotations)
        paths = iter(ds.image_files())
    else:
        paths = iter(())
    return list(dict.fromkeys(paths))


def check_dataset(ds, split: str, max_missing: float = 0.0, num_classes: Optional[int] = None,
                  log: Callable[[str], None] = print, progress: bool = True) -> tuple[int, list[str]]:
    """Raise :class:`IndexProblemError` for unusable entries or too many missing images; returns
    (how many distinct images the dataset reads, the missing ones), each missing file named once
    through ``log``."""
    problems = entry_problems(ds, num_classes)
    if problems:
        more = f" (and {len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
        raise IndexProblemError(f"{len(problems)} of {len(ds)} {split} entries cannot be used: "
                                f"{'; '.join(problems[:SHOWN])}{more}")
    files = image_files(ds)
    bar = tqdm(files, desc=f"checking {split} images", disable=not progress or len(files) < PROGRESS_FROM,
               mininterval=1.0, leave=False)
    missing = [p for p in bar if not os.path.isfile(p)]
    limit = int(max_missing * len(files))
    if len(missing) > limit:
        allowed = f"at most {limit} may be missing (--max-bad-fraction {max_missing:g})" if max_missing else \
            "an evaluation set may lack none"
        raise IndexProblemError(f"{len(missing)} of {len(files)} {split} images do not exist and {allowed}: "
                                f"{', '.join(missing[:SHOWN])}{' ...' if len(missing) > SHOWN else ''}")
    for path in missing:
        log(f"skipping {split} image {path}: it does not exist")
    return len(files) or len(ds), missing
