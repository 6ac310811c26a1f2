"""The mixed pretraining stream: images, texts and image-text pairs from webdataset shards, one
batch dict per step (BEiT-3 mixes the three kinds in every step, 1:1:1 by default)::

    {"images": {"image": float (Bi, 3, S, S) mean=std=0.5, "tokenizer_image": float (Bi, 3, St, St)
                in [0, 1] (same crop; VQ-KD normalises), "image_mask": bool (Bi, N) True = masked},
     "texts":  {"text": long (Bt, L) masked ids, "padding_mask": bool (Bt, L) True = pad,
                "labels": long (Bt, L) original id where masked, -100 elsewhere},
     "pairs":  {"image", "text", "padding_mask", "labels"; with mask_pair_images also
                "tokenizer_image", "image_mask"},
     "stats":  {"skipped": int (cumulative, this rank), "skipped_per_shard": {shard: int},
                "keys": {kind: ["shard.tar:key", ...]}, "epochs": {kind: int}}}

A kind with batch size 0 is absent. Texts are cut at ``max_text_len`` and padded to the longest text
of the part rounded up to ``text_pad_multiple`` (``text_padding="longest"``: padding is compute the
model spends for nothing, and captions are mostly far shorter than the limit), or always to
``max_text_len`` (``"max"``: one shape for every step). Both give the same masks and the same
loss: masking is drawn at ``max_text_len`` and only all-padding columns are cut. ``text_mask_prob``
(15%) of text tokens and ``pair_text_mask_prob`` (50%) of pair-text tokens are masked (BERT
80/10/10), images get exactly ``masked_patches()`` block-wise masked patches (``image_mask_ratio``,
40%, of the grid), as the BEiT-3 paper's defaults.

The stream is defined globally, not per rank, so that a run can continue on another number of
ranks with exactly the batches it would have seen. It is made of ``streams`` readers (``world_size x
max(1, num_workers)`` when the run starts; kept for the run's life, in the loader state). Global
micro-batch g is batch ``g // streams`` of reader ``g % streams``, and rank r of W takes global
micro-batches r, r + W, r + 2W, ...: with gradient accumulation, step s of any world size with the
same global batch (W x accumulation micro-batches) trains on global micro-batches s*N .. s*N + N - 1.
Every reader owns its own shards of each kind: in epoch e the shards are permuted by (seed, kind, e)
and reader l of L takes every L-th one, so readers never read the same shard in the same epoch.
Samples are shuffled inside each shard with a ``shuffle_buffer`` seeded by (seed, kind, epoch,
shard). Epochs repeat forever, reshuffled. Augmentation and masking are seeded per (seed, reader,
reader's batch), inside ``torch.random.fork_rng`` so the training process's RNG is untouched.

A rank runs the readers its micro-batches come from. When ``streams`` is a multiple of world size x
``max(1, num_workers)``, each reader lives in one process and produces only what it trains on. Otherwise (say a run started on 1 rank continues on 2) a reader's
batches go to several ranks or workers, and each of them reads the reader's stream and keeps its
share: exact, at the cost of reading (and decoding) that reader's data more than once; the loader
logs the factor. Start a run with ``streams`` a multiple of the largest world size it may use.

Stream position (``state_dict``/``load_state_dict``): per reader (epoch, shard, samples taken) for
each kind and its batch count, and the micro-batches the rank consumed. ``load_state_dict`` takes
one rank's state (same world size) or every rank's (any world size: they are merged, the newest
copy of each reader kept). A restored reader re-reads only the current shard up to that point
(bytes, no decoding); the batches after a restore are exactly those of an uninterrupted run, for
any ``num_workers`` and world size, provided seed, shards and ``streams`` are unchanged (otherwise
the stream restarts at a new epoch, with a warning).

Sources (``beit3.data.sources``): each kind reads a shards folder's ``{kind}-*.tar`` or its own
sources, ``PATTERN[::WEIGHT]`` each: local or remote (http(s), ``pipe:``) webdataset shards as
img2dataset writes them, folders of images, text files. Several sources of a kind are mixed by
weight: every sample's source is drawn from (seed, kind, reader, draw number), so the mixture is
deterministic and a restored reader continues it exactly; each source keeps its own stream position.

Bad data: an undecodable image, a missing, empty or non-UTF-8 text, an unreadable or truncated tar
is skipped, counted per shard (``stats``) and logged as a warning naming the shard (the first
``warnings_per_shard`` of each). A remote shard whose open or read fails, or stalls (less than
``shard_min_rate`` bytes/s for ``shard_read_timeout`` seconds), is retried with backoff
(``shard_retries``, ``retry_backoff``), then given up and counted; a reader that gives up on more
than ``max_bad_shard_fraction`` of a source's shards stops with a ``DataSourceError``. A pattern
matching nothing, too few shards for the readers, or a source whose first shards hold no usable
sample is a ``DataSourceError`` (a ``ValueError``) when the loader is built.
"""
from __future__ import annotations

import copy
import functools
import glob
import hashlib
import io
import json
import logging
import math
import os
import random
from bisect import bisect
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image as tv_decode

from beit3.core.settings import SettingError, check_settings, flag_name, setting as _f
from beit3.data.masking import IMAGE_MASK_RATIO, PAIR_TEXT_MASK_PROB, TEXT_MASK_PROB, BlockMaskGenerator, default_num_masking_patches, mask_text
from beit3.data.remote import Timeouts
from beit3.data.shards import ShardError, manifest_shards, read_manifest
from beit3.data.sources import IMAGE_KEYS, DataSourceError, RetryPolicy, Shard, SkipLog, Source, failed_in, first_usable, read_samples, resolve_source
from beit3.data.text_tokenizer import TextTokenizer
from beit3.data.transforms import BEIT_CROP_SCALE, VL_CROP_SCALE, PretrainImageTransform

log = logging.getLogger(__name__)

KINDS = ("images", "texts", "pairs")
STATE_VERSION = 3  # 3: the stream is global (readers by global id, micro-batches consumed)
TEXT_PADDING = ("longest", "max")
IMAGE_DECODERS = ("pil", "torchvision")
MAX_EMPTY_EPOCHS = 1000  # a reader that finds nothing usable for this long stops instead of hanging


SOURCE = "PATTERN[::WEIGHT]"


@dataclass
class PretrainDataConfig:
    """The loader's settings: ``beit3 pretrain``'s data part (``PretrainConfig.data``), each field a
    flag. ``None`` batch sizes, text length and workers are filled by the job (they depend on the
    preset and the device); the loader needs them given. The last four fields are no flags: the job
    sets them from the model and the visual tokenizer."""
    # -- sources
    shards_dir: Optional[str] = _f(None, "'synthetic' (the embedded world, built and cached; the default without "
                                   "sources) or a shards directory holding images-*/texts-*/pairs-*.tar and "
                                   "manifest.json", name="data")
    pair_shards: Optional[list] = _f(None, "image-text pairs: PATTERN[::WEIGHT] (repeat to mix; docs/data.md)",
                                     metavar=SOURCE)
    image_shards: Optional[list] = _f(None, "images (pair shards' captions are ignored)", metavar=SOURCE)
    text_shards: Optional[list] = _f(None, "texts", metavar=SOURCE)
    data_streams: Optional[int] = _f(None, "readers of the data stream over all ranks (default: ranks x max(1, "
                                     "--num-workers)); fixed for the run: a resume on another number of ranks keeps "
                                     "the exact stream, reading without waste when this is a multiple of its ranks "
                                     "(x workers)", ge=1)
    # -- remote shards
    shard_retries: int = _f(3, "further attempts at a remote shard whose open or read failed", ge=0)
    retry_backoff: float = _f(1.0, "seconds before the first retry, doubled for each further one", ge=0)
    shard_connect_timeout: float = _f(30.0, "seconds to connect to a remote shard's server", gt=0)
    shard_read_timeout: float = _f(60.0, "seconds in which a remote shard must deliver --shard-min-rate bytes/s; "
                                   "a stalled or trickling read fails and is retried", gt=0)
    shard_min_rate: float = _f(1024.0, "bytes/s below which a remote read counts as stalled", ge=0)
    max_bad_shard_fraction: float = _f(0.1, "stop when a reader has given up on more than this share of a "
                                       "source's shards", ge=0, le=1)
    # -- batches and texts
    batch_images: Optional[int] = _f(None, "per rank per micro-step (default 16 for tiny, 32 otherwise; 0 without "
                                     "an image source)", ge=0)
    batch_texts: Optional[int] = _f(None, "per rank per micro-step", ge=0)
    batch_pairs: Optional[int] = _f(None, "per rank per micro-step", ge=0)
    max_text_len: Optional[int] = _f(None, "text tokens with <s> and </s>, at most the preset's position table "
                                     "(1022); default 32 for tiny, 64 otherwise", ge=3)
    text_padding: str = _f("longest", "pad each micro-batch's texts to its longest text rounded up to "
                           "--text-pad-multiple (no compute on padding) or always to --max-text-len (one shape every "
                           "step)", choices=list(TEXT_PADDING))
    text_pad_multiple: int = _f(8, "--text-padding longest: widths rounded up to this (tensor-core friendly, few "
                                "distinct shapes)", ge=1)
    # -- reading
    num_workers: Optional[int] = _f(None, "data loader workers per rank (default 0 on CPU, 6 on GPU; the loader "
                                    "alone: 0, reading in its own process)", ge=0)
    prefetch_factor: int = _f(2, "batches each worker prepares ahead", ge=1)
    pin_memory: bool = _f(False, "page-locked batches (faster copies to the GPU)")
    shuffle_buffer: int = _f(500, "samples shuffled together inside a shard", ge=1)
    warnings_per_shard: int = _f(5, "bad samples of a shard logged by name (all are counted)", ge=0)
    image_decoder: str = _f("pil", "PIL, or torchvision.io.decode_image with the transforms on uint8 tensors",
                            choices=list(IMAGE_DECODERS))
    seed: int = _f(0, "the data stream's order, augmentation and masks (and the model's initialisation)",
                   ge=0, lt=2**32)
    # -- masking (BEiT-3 paper, Sec. 2.3)
    image_mask_ratio: float = _f(IMAGE_MASK_RATIO, "share of image patches masked, block-wise (75 of 196 at "
                                 "224/16, BEiT's count)", ge=0, le=1)
    num_masking_patches: Optional[int] = _f(None, "masked patches per image, instead of --image-mask-ratio", ge=0)
    mask_pair_images: bool = _f(False, "also mask (and predict) pair images")
    text_mask_prob: float = _f(TEXT_MASK_PROB, "share of a monomodal text's tokens masked (BERT 80/10/10)",
                               ge=0, le=1)
    pair_text_mask_prob: float = _f(PAIR_TEXT_MASK_PROB, "share of a pair's text tokens masked: the image makes "
                                    "recovering them easier", ge=0, le=1)
    # -- augmentation (BEiT v2's DataAugmentationForBEiT)
    crop_scale: tuple = _f(BEIT_CROP_SCALE, "RandomResizedCrop area range of images (BEiT's --min_crop_scale "
                           "0.08)", gt=0, le=1, metavar=("MIN", "MAX"))
    # A pair's caption describes the whole picture and says "left"/"right": crop it as the official
    # vision-language fine-tuning does (scale >= 0.5) and do not flip it.
    pair_crop_scale: tuple = _f(VL_CROP_SCALE, "RandomResizedCrop area range of pair images (as vision-language "
                                "fine-tuning's --crop-scale)", gt=0, le=1, metavar=("MIN", "MAX"))
    color_jitter: float = _f(0.4, "brightness, contrast and saturation jitter of images and pair images", ge=0)
    hflip: float = _f(0.5, "probability of a horizontal flip of an image", ge=0, le=1)
    pair_hflip: float = _f(0.0, "probability of a horizontal flip of a pair image (its caption may say left)",
                           ge=0, le=1)
    # -- the model's and the visual tokenizer's sizes: set by the job, no flags
    img_size: int = _f(224, "the model's input (from the preset)", ge=1, flag=False)
    patch_size: int = _f(16, "the model's patch (from the preset)", ge=1, flag=False)
    tokenizer_img_size: Optional[int] = _f(None, "the visual tokenizer's input (default: img_size)", ge=1,
                                           flag=False)
    tokenizer_patch_size: Optional[int] = _f(None, "when given, its grid must equal the model's", ge=1, flag=False)

    def __post_init__(self):
        # Sources given as one pattern or as paths are lists of strings.
        for name in ("pair_shards", "image_shards", "text_shards"):
            value = getattr(self, name)
            if isinstance(value, (str, os.PathLike)):
                value = [value]
            if isinstance(value, (list, tuple)):
                setattr(self, name, [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value])
        if isinstance(self.shards_dir, os.PathLike):
            self.shards_dir = os.fspath(self.shards_dir)
        check_settings(self)
        self.crop_scale, self.pair_crop_scale = tuple(self.crop_scale), tuple(self.pair_crop_scale)
        for name in ("crop_scale", "pair_crop_scale"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise SettingError(f"{flag_name(name)} {lo:g} {hi:g}: the smallest area comes first")

    @property
    def readers_per_rank(self) -> int:
        return max(1, self.workers)

    @property
    def workers(self) -> int:
        return self.num_workers or 0

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def view_size(self) -> int:
        """The visual tokenizer's input size."""
        return self.tokenizer_img_size or self.img_size

    def batch_size(self, kind: str) -> int:
        return {"images": self.batch_images, "texts": self.batch_texts, "pairs": self.batch_pairs}[kind]

    def active_kinds(self) -> list[str]:
        return [k for k in KINDS if self.batch_size(k) > 0]

    def specs(self, kind: str) -> list[str]:
        return list({"images": self.image_shards, "texts": self.text_shards, "pairs": self.pair_shards}[kind] or [])

    def retry(self) -> RetryPolicy:
        return RetryPolicy(self.shard_retries, self.retry_backoff, self.timeouts())

    def timeouts(self) -> Timeouts:
        return Timeouts(connect=self.shard_connect_timeout, read=self.shard_read_timeout,
                        min_rate=self.shard_min_rate)

    def masked_patches(self) -> int:
        if self.num_masking_patches is not None:
            return self.num_masking_patches
        return default_num_masking_patches(self.grid, self.grid, self.image_mask_ratio)

    def validate(self) -> None:
        """The checks across fields (each field's type and range: ``check_settings``, run again in case
        a field was set after the config was built)."""
        check_settings(self)
        unset = [flag_name(n) for n in ("batch_images", "batch_texts", "batch_pairs", "max_text_len")
                 if getattr(self, n) is None]
        if unset:
            raise ValueError(f"the pretraining data loader needs {', '.join(unset)} given (the job fills them in)")
        if not self.active_kinds():
            raise ValueError("--batch-images, --batch-texts and --batch-pairs are all 0")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.tokenizer_patch_size and self.view_size // self.tokenizer_patch_size != self.grid:
            raise ValueError(f"tokenizer grid {self.view_size}/{self.tokenizer_patch_size} != model grid "
                             f"{self.img_size}/{self.patch_size}: the image mask indexes both")
        if not 0 <= self.masked_patches() <= self.grid ** 2:
            raise ValueError(f"--num-masking-patches {self.masked_patches()} outside [0, {self.grid ** 2}] (the "
                             f"{self.grid}x{self.grid} patch grid)")
        try:
            self.timeouts().check()
        except ValueError as e:
            raise ValueError(f"remote shard reads: {e}") from None


# --------------------------------------------------------------------------- sources
def resolve_sources(cfg: PretrainDataConfig, readers: int = 1) -> dict[str, list[Source]]:
    """``{kind: sources}`` for every kind with a batch size: the kind's own sources if given,
    else the ``{kind}-*.tar`` shards of ``shards_dir``. ``readers``: readers over all ranks."""
    out = {}
    for kind in cfg.active_kinds():
        specs = cfg.specs(kind)
        if specs:
            out[kind] = [resolve_source(kind, spec, readers) for spec in specs]
        elif cfg.shards_dir:
            out[kind] = [_dir_source(cfg.shards_dir, kind)]
        else:
            raise DataSourceError(f"no {kind} data: give a {kind[:-1]} source or a shards folder (or batch size 0)")
    return out


def _dir_source(folder: str, kind: str) -> Source:
    if not os.path.isdir(folder):
        raise DataSourceError(f"shards folder {folder} does not exist")
    try:
        listed = manifest_shards(folder, kind)
    except ShardError as e:
        raise DataSourceError(str(e)) from None
    if listed is not None:
        n = read_manifest(folder)["kinds"][kind].get("num_samples")
        if n == 0:
            raise DataSourceError(f"{folder}/manifest.json lists no {kind} samples")
        missing = [p for p in listed if not os.path.isfile(p)]
        if missing:
            raise DataSourceError(f"{kind} shard {missing[0]} does not exist ({len(missing)} of {len(listed)} "
                                  f"listed in {folder}/manifest.json missing)")
        return Source(kind, os.path.join(folder, f"{kind}-*.tar"), 1.0, [Shard(p) for p in listed], n, "manifest.json")
    found = sorted(glob.glob(os.path.join(glob.escape(folder), f"{kind}-*.tar")))
    if not found:
        raise DataSourceError(f"{folder} has no {kind}-*.tar shards (and no manifest.json entry for {kind}); "
                              f"for other layouts (img2dataset's 00000.tar ...) give the sources, e.g. "
                              f"--{kind[:-1]}-shards '{folder}/{{00000..00099}}.tar'")
    return Source(kind, os.path.join(folder, f"{kind}-*.tar"), 1.0, [Shard(p) for p in found], None, "not counted")


# --------------------------------------------------------------------------- reading shards
class BadSample(ValueError):
    """A sample that cannot be used (undecodable image, missing or empty text)."""


def _buffer_shuffle(samples: Iterator[dict], rng: random.Random, size: int) -> Iterator[dict]:
    buf = []
    for sample in samples:
        buf.append(sample)
        if len(buf) >= size:
            yield buf.pop(rng.randrange(len(buf)))
    while buf:
        yield buf.pop(rng.randrange(len(buf)))


class ShardStream:
    """Raw samples of one kind for reader ``reader`` of ``num_readers``, epoch after epoch.

    ``position`` = (epoch, index in this reader's shard list of that epoch, samples taken from
    that shard); a new stream built with it continues exactly where the old one was.
    """

    def __init__(self, kind: str, shards: Sequence[Shard | str], reader: int, num_readers: int, seed: int,
                 buffer: int, skips: SkipLog, position: Sequence[int] = (0, 0, 0), retry: RetryPolicy | None = None,
                 source: Source | None = None, max_failed: float = float("inf")):
        self.kind, self.reader, self.num_readers = kind, reader, num_readers
        self.shards = [s if isinstance(s, Shard) else Shard(s) for s in shards]
        self.seed, self.buffer, self.skips, self.retry = seed, buffer, skips, retry
        self.source, self.max_failed = source, max_failed
        self.position = tuple(position)
        self.last_valid_epoch = self.position[0]

    def epoch_shards(self, epoch: int) -> list[int]:
        """Indices (into ``shards``) this reader reads in ``epoch``."""
        order = random.Random(f"{self.seed}/{self.kind}/{epoch}").sample(range(len(self.shards)), len(self.shards))
        return order[self.reader::self.num_readers]

    def shard_samples(self, shard: int, epoch: int) -> Iterator[dict]:
        rng = random.Random(f"{self.seed}/{self.kind}/{epoch}/{shard}")
        return _buffer_shuffle(read_samples(self.shards[shard], self.skips, self.retry), rng, self.buffer)

    def check_failures(self) -> None:
        """Stop once this reader alone has given up on more than the allowed share of the source."""
        if self.source is None:
            return
        failed = failed_in(self.source, list(self.skips.failed))
        if len(failed) > self.max_failed:
            raise DataSourceError(
                f"{self.kind} source {self.source.pattern!r}: {len(failed)} of {len(self.shards)} shards failed "
                f"(more than the allowed {self.max_failed:g}); first: {failed[0]}: {self.skips.failed[failed[0]]}")

    def mark_valid(self) -> None:
        self.last_valid_epoch = self.position[0]

    def __iter__(self) -> Iterator[dict]:
        epoch, index, taken = self.position
        while True:
            if epoch - self.last_valid_epoch > MAX_EMPTY_EPOCHS:
                raise RuntimeError(f"{self.kind} reader {self.reader}: no usable sample in {MAX_EMPTY_EPOCHS} "
                                   f"epochs over {len(self.shards)} shards (see the warnings)")
            for i, shard in enumerate(self.epoch_shards(epoch)[index:], start=index):
                samples = self.shard_samples(shard, epoch)
                self._replay(samples, taken)
                for sample in samples:
                    taken += 1
                    self.position = (epoch, i, taken)
                    yield sample
                self.check_failures()
                taken = 0
            epoch, index = epoch + 1, 0
            self.position = (epoch, 0, 0)

    def _replay(self, samples: Iterator[dict], n: int) -> None:
        """Drop the first ``n`` samples; problems met on the way were counted in the run that took them."""
        self.skips.muted = True
        try:
            for _ in range(n):
                if next(samples, None) is None:
                    break
        finally:
            self.skips.muted = False


# --------------------------------------------------------------------------- decoding
def decode_image(sample: dict, decoder: str = "pil") -> Image.Image | torch.Tensor:
    """The sample's image: an RGB PIL image, or with ``decoder="torchvision"`` a uint8 (3, H, W)
    tensor from ``torchvision.io.decode_image`` (libjpeg-turbo for JPEG, as PIL)."""
    ext = next((k for k in IMAGE_KEYS if k in sample), None)
    if ext is None:
        raise BadSample(f"no image member ({'/'.join(IMAGE_KEYS)}) among {sorted(k for k in sample if k[0] != '_')}")
    try:
        if decoder == "torchvision":
            return tv_decode(torch.frombuffer(bytearray(sample[ext]), dtype=torch.uint8), mode=ImageReadMode.RGB)
        with Image.open(io.BytesIO(sample[ext])) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise BadSample(f"undecodable image {sample['__key__']}.{ext}: {e}") from e


def decode_text(sample: dict) -> str:
    """``txt``, or the ``caption`` field of ``json`` (img2dataset writes both)."""
    if "txt" in sample:
        try:
            text = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise BadSample(f"text {sample['__key__']}.txt is not UTF-8: {e}") from e
    elif "json" in sample:
        try:
            text = json.loads(sample["json"]).get("caption")
        except (ValueError, UnicodeDecodeError, AttributeError) as e:
            raise BadSample(f"{sample['__key__']}.json is not a JSON object: {e}") from e
        if not isinstance(text, str):
            raise BadSample(f"{sample['__key__']}.json has no string 'caption'")
        text = text.strip()
    else:
        raise BadSample("no txt member and no json caption")
    if not text:
        raise BadSample(f"empty text {sample['__key__']}.txt")
    return text


DECODERS = {"images": decode_image, "texts": decode_text,
            "pairs": lambda s: (decode_image(s), decode_text(s))}


def check_sources(sources: dict[str, list[Source]], retry: RetryPolicy | None = None) -> list[str]:
    """Open every source's first shard(s) and decode one sample; ``DataSourceError`` naming the
    source otherwise. Returns a line per source for the log."""
    lines = []
    for kind, group in sources.items():
        for source in group:
            first = first_usable(source, DECODERS[kind], retry)
            lines.append(f"{source.describe()}; first sample {first}")
    return lines


# --------------------------------------------------------------------------- batches of one reader
def _seed(*key: int) -> int:
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


class ReaderBatches:
    """The batches of reader ``reader`` of ``num_readers`` (the global stream's readers)."""

    def __init__(self, cfg: PretrainDataConfig, sources: dict[str, list[Source]], tokenizer_path: str,
                 reader: int, num_readers: int, state: dict | None):
        state = state or {}
        self.cfg, self.reader = cfg, reader
        self.batches = state.get("batches", 0)
        self.skips = SkipLog(state.get("skipped"), cfg.warnings_per_shard, state.get("failed"))
        positions, self.draws = state.get("streams", {}), dict(state.get("draws", {}))
        self.streams = {kind: [ShardStream(kind, src.shards, reader, num_readers, cfg.seed,
                                           cfg.shuffle_buffer, self.skips, _position(positions, kind, i), cfg.retry(),
                                           src, cfg.max_bad_shard_fraction * len(src.shards))
                               for i, src in enumerate(group)]
                        for kind, group in sources.items()}
        self.iters = {kind: [iter(s) for s in group] for kind, group in self.streams.items()}
        # Cumulative weights: a draw u in [0, total) picks the first source whose bound exceeds it.
        self.bounds = {kind: list(np.cumsum([src.weight for src in group])) for kind, group in sources.items()}
        image = functools.partial(decode_image, decoder=cfg.image_decoder)
        self.decode = {"images": image, "texts": decode_text, "pairs": lambda x: (image(x), decode_text(x))}
        self.tokenizer = TextTokenizer(tokenizer_path)
        self.masker = BlockMaskGenerator(cfg.grid, cfg.masked_patches())
        self.image_tf = PretrainImageTransform(cfg.img_size, cfg.view_size, cfg.crop_scale, cfg.color_jitter,
                                               cfg.hflip)
        self.pair_tf = PretrainImageTransform(cfg.img_size, cfg.view_size, cfg.pair_crop_scale, cfg.color_jitter,
                                              cfg.pair_hflip)

    def state(self) -> dict:
        return {"reader": self.reader, "batches": self.batches, "skipped": dict(self.skips.counts),
                "failed": dict(self.skips.failed), "draws": dict(self.draws),
                "streams": {kind: [list(s.position) for s in group] for kind, group in self.streams.items()}}

    def pick(self, kind: str) -> int:
        """The source of ``kind``'s next sample: by weight, from the draw's own seed, so a restored
        reader draws the same sources."""
        bounds = self.bounds[kind]
        if len(bounds) == 1:
            return 0
        draw = self.draws.get(kind, 0)
        self.draws[kind] = draw + 1
        u = random.Random(f"{self.cfg.seed}/{kind}/{self.reader}/{draw}").random() * bounds[-1]
        return min(bisect(bounds, u), len(bounds) - 1)

    def take(self, kind: str, n: int) -> tuple[list, list[str]]:
        """``n`` decoded samples of ``kind`` and their ``shard:key``; bad ones are counted and skipped."""
        items, keys = [], []
        while len(items) < n:
            i = self.pick(kind)
            sample = next(self.iters[kind][i])
            try:
                items.append(self.decode[kind](sample))
            except BadSample as e:
                self.skips.add(sample["__url__"], str(e))
                continue
            self.streams[kind][i].mark_valid()
            keys.append(f"{os.path.basename(sample['__url__'])}:{sample['__key__']}")
        return items, keys

    def next_batch(self) -> dict:
        cfg = self.cfg
        key = (cfg.seed, self.reader, self.batches)
        rng, gen = np.random.default_rng(_seed(*key, 1)), torch.Generator().manual_seed(_seed(*key, 2))
        batch, keys = {}, {}
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(_seed(*key, 0))  # torchvision's random transforms draw from it
            if cfg.batch_images:
                images, keys["images"] = self.take("images", cfg.batch_images)
                batch["images"] = self.image_part(images, rng)
            if cfg.batch_texts:
                texts, keys["texts"] = self.take("texts", cfg.batch_texts)
                batch["texts"] = self.text_part(texts, cfg.text_mask_prob, gen)
            if cfg.batch_pairs:
                pairs, keys["pairs"] = self.take("pairs", cfg.batch_pairs)
                batch["pairs"] = self.pair_part(pairs, rng, gen)
        self.batches += 1
        batch["_keys"], batch["_state"] = keys, self.state()
        return batch

    def skip_to(self, batch: int) -> None:
        """Produce and drop batches until ``batch`` is next: the ones another rank or worker trains
        on. Decoded, not just read, since a bad sample moves the stream on by more than one."""
        while self.batches < batch:
            self.next_batch()

    def image_part(self, images: list, rng: np.random.Generator,
                   transform: PretrainImageTransform | None = None) -> dict:
        views = [(transform or self.image_tf)(im) for im in images]
        return {"image": torch.stack([v[0] for v in views]),  # (B, 3, S, S)
                "tokenizer_image": torch.stack([v[1] for v in views]),  # (B, 3, St, St)
                "image_mask": self.masks(len(images), rng)}  # (B, N)

    def masks(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.masker(rng).reshape(-1) for _ in range(n)]))

    def text_part(self, texts: list[str], prob: float, gen: torch.Generator) -> dict:
        tok = self.tokenizer
        ids, pad = tok.batch_encode(texts, self.cfg.max_text_len, pad_to_max=True)  # (B, max_text_len)
        # Masks are drawn at the full width so that they do not depend on the padding mode.
        inputs, labels = mask_text(ids, pad, prob, tok.mask_id, tok.vocab_size, tok.special_ids, gen)
        width = self.text_width(pad)
        return {"text": inputs[:, :width], "padding_mask": pad[:, :width], "labels": labels[:, :width]}

    def text_width(self, pad: torch.Tensor) -> int:
        """Columns to keep of a (B, max_text_len) padding mask: all of them, or the longest text
        rounded up to ``text_pad_multiple``."""
        full = pad.shape[1]
        if self.cfg.text_padding == "max":
            return full
        longest = int((~pad).sum(dim=1).max())
        m = self.cfg.text_pad_multiple
        return min(full, -(-longest // m) * m)

    def pair_part(self, pairs: list[tuple], rng: np.random.Generator,
                  gen: torch.Generator) -> dict:
        part = self.image_part([p[0] for p in pairs], rng, self.pair_tf)
        if not self.cfg.mask_pair_images:
            part = {"image": part["image"]}
        return {**part, **self.text_part([p[1] for p in pairs], self.cfg.pair_text_mask_prob, gen)}


def _position(positions: dict, kind: str, i: int) -> Sequence[int]:
    group = positions.get(kind)
    return tuple(group[i]) if group and i < len(group) else (0, 0, 0)


class MixedBatches(IterableDataset):
    """Endless batches of one rank: its local micro-batch i is global micro-batch
    ``rank + world_size * i``, i.e. batch ``g // streams`` of reader ``g % streams``.

    In a DataLoader, physical worker p of P produces local batches ``first + p``, ``first + p + P``,
    ... (the DataLoader takes them round-robin), running each reader those come from.
    """

    def __init__(self, cfg: PretrainDataConfig, sources: dict[str, list[Source]], tokenizer_path: str,
                 rank: int, world_size: int, streams: int, states: dict[int, dict], first: int):
        self.cfg, self.sources, self.tokenizer_path = cfg, sources, tokenizer_path
        self.rank, self.world_size, self.streams, self.states, self.first = rank, world_size, streams, states, first

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical, stride = (info.id, info.num_workers) if info is not None else (0, 1)
        readers: dict[int, ReaderBatches] = {}
        i = self.first + physical
        while True:
            reader, batch = divmod_stream(self.rank + self.world_size * i, self.streams)
            if reader not in readers:
                readers[reader] = ReaderBatches(self.cfg, self.sources, self.tokenizer_path, reader, self.streams,
                                                self.states.get(reader))
            readers[reader].skip_to(batch)
            yield readers[reader].next_batch()
            i += stride


def divmod_stream(g: int, streams: int) -> tuple[int, int]:
    """(reader, batch of that reader) of global micro-batch ``g``."""
    return g % streams, g // streams


def read_factor(world_size: int, streams: int, workers: int) -> float:
    """Batches a rank's processes produce per batch they train on (1.0: no reader is shared)."""
    # A process sees every stride-th global micro-batch; two of one reader that it sees are
    # lcm(stride, streams) apart, i.e. lcm / streams of that reader's batches.
    stride = world_size * max(1, workers)
    return stride / math.gcd(stride, streams)


# --------------------------------------------------------------------------- the loader
def _sources_digest(group: list[Source]) -> str:
    """Patterns, weights and shard names of a kind's sources (moving a folder keeps the position)."""
    names = "\n".join(f"{src.weight:g}|" + "|".join(os.path.basename(s.name) for s in src.shards) for src in group)
    return f"{sum(len(src.shards) for src in group)}:{hashlib.sha1(names.encode()).hexdigest()[:16]}"


class PretrainLoader:
    """Iterable of mixed pretraining batches for one rank, with a resumable stream position.

    ``text_tokenizer``: a :class:`TextTokenizer` or the path of its sentencepiece model.
    ``streams``: readers of the global stream (default ``cfg.data_streams``, else ``world_size x
    max(1, num_workers)``); a restored state brings its own.
    """

    def __init__(self, cfg: PretrainDataConfig, text_tokenizer: TextTokenizer | str, rank: int = 0,
                 world_size: int = 1, check: bool = True, streams: int | None = None):
        """``check``: open every source's first shard now (False when the caller just did, as
        ``beit3 pretrain`` does before anything is built)."""
        cfg.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.tokenizer_path = text_tokenizer.model_file if isinstance(text_tokenizer, TextTokenizer) \
            else os.fspath(text_tokenizer)
        TextTokenizer(self.tokenizer_path)  # fail now, not in a worker
        self.streams = streams or cfg.data_streams or world_size * cfg.readers_per_rank
        self.sources = resolve_sources(cfg, self.streams)
        self._check_shard_counts()
        self._warn_if_shared()
        self.source_lines = (check_sources(self.sources, cfg.retry()) if check else
                             [src.describe() for group in self.sources.values() for src in group])
        self._consumed = 0  # micro-batches this rank yielded (global ones: rank + world_size * i)
        self._states: dict[int, dict] = {}  # reader -> its state after its newest batch yielded here

    def _check_shard_counts(self) -> None:
        for kind, group in self.sources.items():
            for src in group:
                if len(src.shards) < self.streams:
                    raise DataSourceError(
                        f"{kind} source {src.pattern!r} has {len(src.shards)} shards for {self.streams} readers "
                        f"(--data-streams; by default ranks x workers); every reader needs its own shard: write "
                        "smaller shards (beit3 data shards --shard-size) or use fewer readers")

    @property
    def shards(self) -> dict[str, list[str]]:
        """``{kind: shard names}`` over all of a kind's sources."""
        return {k: [s.name for src in g for s in src.shards] for k, g in self.sources.items()}

    @property
    def read_factor(self) -> float:
        return read_factor(self.world_size, self.streams, self.cfg.workers)

    def __iter__(self) -> Iterator[dict]:
        cfg = self.cfg
        data = MixedBatches(cfg, self.sources, self.tokenizer_path, self.rank, self.world_size, self.streams,
                            copy.deepcopy(self._states), self._consumed)
        if cfg.workers > 0:
            data = DataLoader(data, batch_size=None, num_workers=cfg.workers, pin_memory=cfg.pin_memory,
                              prefetch_factor=cfg.prefetch_factor)
        for batch in data:
            state = batch.pop("_state")
            self._states[state["reader"]] = state
            self._consumed += 1
            batch["stats"] = self._stats(batch.pop("_keys"))
            yield batch

    def _stats(self, keys: dict[str, list[str]]) -> dict:
        per_shard = Counter()
        for state in self._states.values():
            per_shard.update(state["skipped"])
        epochs = {kind: max(p[0] for s in self._states.values() for p in s["streams"][kind])
                  for kind in self.sources}
        return {"skipped": sum(per_shard.values()), "skipped_per_shard": dict(per_shard), "keys": keys,
                "epochs": epochs}

    # -- stream position ---------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        return {"streams": self.streams, "seed": self.cfg.seed,
                "shards": {k: _sources_digest(g) for k, g in self.sources.items()}}

    def state_dict(self) -> dict:
        """Position after the batches yielded so far (not those prefetched by workers)."""
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "consumed": self._consumed, "readers": {str(r): copy.deepcopy(s) for r, s in self._states.items()},
                "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict | Sequence[dict]) -> None:
        """Continue from one rank's state (same world size) or from every rank's (any world size);
        takes effect at the next ``iter()``."""
        states = [state] if isinstance(state, dict) else list(state)
        if not states:
            raise ValueError("no pretraining data state to load")
        if states[0].get("version") not in (1, 2, STATE_VERSION):
            raise ValueError(f"pretraining data state version {states[0].get('version')!r}, expected {STATE_VERSION}")
        if states[0]["version"] == STATE_VERSION and states[0]["fingerprint"].get("streams") != self.streams:
            self._adopt_streams(states[0]["fingerprint"]["streams"])
        saved = states[0]["fingerprint"]
        mismatch = [k for k, v in self._fingerprint().items() if saved.get(k) != v]
        if states[0]["version"] != STATE_VERSION:
            mismatch = ["version"]
        if mismatch:
            return self._restart(states, mismatch)
        done = states[0]["world_size"] * states[0]["consumed"]  # ranks step together
        if done % self.world_size:
            raise ValueError(f"the data state is at global micro-batch {done}, which {self.world_size} ranks cannot "
                             f"split evenly: keep the global batch (ranks x grad-accum) of the run")
        merged: dict[int, dict] = {}
        for s in states:
            for reader, rs in s["readers"].items():
                if int(reader) not in merged or rs["batches"] > merged[int(reader)]["batches"]:
                    merged[int(reader)] = rs
        self._check_complete(merged, done)
        self._consumed, self._states = done // self.world_size, merged

    def _adopt_streams(self, streams: int) -> None:
        """The run's stream keeps its number of readers on any world size."""
        self.streams = streams
        self.sources = resolve_sources(self.cfg, streams)
        self._check_shard_counts()
        self._warn_if_shared()

    def _warn_if_shared(self) -> None:
        if self.read_factor > 1:
            log.warning("%d readers over %d ranks x %d workers: each process reads %.3gx the data it trains on "
                        "(exact, but slower; see beit3.data.pretrain_loader)", self.streams, self.world_size,
                        self.cfg.readers_per_rank, self.read_factor)

    def _check_complete(self, merged: dict[int, dict], done: int) -> None:
        """Every reader's state must be at the batch the stream has reached: a missing rank's
        state would silently replay its readers' batches."""
        for reader in range(self.streams):
            owed = len(range(reader, done, self.streams))  # its batches among the first ``done``
            have = merged.get(reader, {}).get("batches", 0)
            if have < owed:
                raise ValueError(f"pretraining data state: reader {reader} is at batch {have}, the stream at its "
                                 f"batch {owed}; pass every rank's state when the world size changes")

    def _restart(self, states: list[dict], mismatch: list[str]) -> None:
        def positions(s):
            readers = s.get("readers") or []
            readers = readers.values() if isinstance(readers, dict) else filter(None, readers)
            return [p for r in readers for g in r["streams"].values() for p in (g if g and isinstance(g[0], list) else [g])]
        epoch = 1 + max((p[0] for s in states for p in positions(s)), default=0)
        log.warning("pretraining data state was saved with different %s; the stream restarts at epoch %d "
                    "(reshuffled) instead of continuing exactly", ", ".join(mismatch), epoch)
        self._consumed = 0
        self._states = {r: {"reader": r, "batches": 0, "skipped": {},
                            "streams": {k: [[epoch, 0, 0] for _ in g] for k, g in self.sources.items()}}
                        for r in range(self.streams)}

    def summary(self) -> str:
        """What the loader reads, a line per source, for the run's log."""
        cfg = self.cfg
        head = ("pretraining data: " + ", ".join(f"{kind} {cfg.batch_size(kind)}/step" for kind in self.sources)
                + f"; rank {self.rank}/{self.world_size}, {self.streams} readers in all, "
                f"{cfg.masked_patches()} of {cfg.grid ** 2} patches masked")
        return "\n".join([head] + [f"  {line}" for line in self.source_lines])
