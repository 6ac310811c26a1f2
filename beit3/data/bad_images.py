"""Training past images that cannot be read: missing, undecodable, decompression bombs.

``SkipUnreadable`` replaces such an item by the next readable item of the dataset. Replacing
rather than dropping keeps every micro-batch full (the contrastive loss gathers equal batches from
every rank) and keeps the data order a pure function of the epoch, so a resumed run still matches
an uninterrupted one. The unreadable files travel with the batch (``SKIPPED_KEY``, one string per
item, filled in the loader's worker processes); ``UnreadableImages`` in the training loop names
each file once, counts them and says when they pass the allowed fraction of the dataset.
Evaluation does not skip: a skipped image would change the score.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from torch.utils.data import Dataset

from beit3.core.errors import UserError
from beit3.data.downstream.datasets import ImageLoadError

SKIPPED_KEY = "skipped_images"
MAX_IN_A_ROW = 32  # more unreadable items in a row than this is a broken dataset, not a few bad files


class TooManyUnreadableImages(UserError):
    pass


class SkipUnreadable(Dataset):
    """``dataset``'s items, each with ``SKIPPED_KEY``: the unreadable files passed over to get it
    (``path<TAB>reason`` lines, empty when none)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for k in range(min(MAX_IN_A_ROW, len(self.dataset))):
            try:
                item = self.dataset[(index + k) % len(self.dataset)]
            except ImageLoadError as e:
                skipped.append(f"{e.path}\t{e}")
                continue
            item[SKIPPED_KEY] = "\n".join(skipped)
            return item
        raise TooManyUnreadableImages(f"{len(skipped)} items in a row from item {index} have unreadable images; "
                                      f"last: {skipped[-1].split(chr(9))[-1]}")


class UnreadableImages:
    """The distinct unreadable files this rank met: each named once through ``log``; ``too_many``
    once there are more than ``max_fraction`` of ``total`` (``known``: found missing up front)."""

    def __init__(self, total: int, max_fraction: float, log: Callable[[str], None], known: Iterable[str] = ()):
        self.total, self.max_fraction, self.log = total, max_fraction, log
        self.seen = set(known)
        self.limit = int(max_fraction * total)

    def record(self, skipped: Iterable[str]) -> None:
        for lines in skipped:
            for line in filter(None, lines.split("\n")):
                path, _, reason = line.partition("\t")
                if path not in self.seen:
                    self.seen.add(path)
                    self.log(f"skipped an unreadable training image ({len(self.seen)} so far): {reason}")

    @property
    def count(self) -> int:
        return len(self.seen)

    @property
    def too_many(self) -> bool:
        return self.count > self.limit

    def error(self, where: str) -> TooManyUnreadableImages:
        return TooManyUnreadableImages(
            f"{self.count} of {self.total} training images cannot be read, more than --max-bad-fraction "
            f"{self.max_fraction:g} allows ({self.limit}); {where}")
