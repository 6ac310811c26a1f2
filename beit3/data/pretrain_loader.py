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
loss: masking is drawn at ``max_text_len`` and only all-padding columns are cut. 15% of text tokens and
50% of pair-text tokens are masked (BERT 80/10/10), images get exactly ``num_masking_patches``
block-wise masked patches.

Readers: each rank runs ``max(1, num_workers)`` readers (dataloader workers), and every reader owns
its own shards of each kind: in epoch e the shards are permuted by (seed, kind, e) and reader r of R
takes every R-th one, so ranks and workers never read the same shard in the same epoch. Samples are
shuffled inside each shard with a ``shuffle_buffer`` seeded by (seed, kind, epoch, shard). Epochs
repeat forever, reshuffled.

Stream position (``state_dict``/``load_state_dict``): per reader (epoch, shard, samples taken) for
each kind and its batch count. A restored loader re-reads only the current shard up to that point
(bytes, no decoding) and rotates its workers so that batch K+1 comes next; the batches after a
restore are exactly those of an uninterrupted run, for any ``num_workers``, provided seed, shards,
world size and ``num_workers`` are unchanged (otherwise the stream restarts at a new epoch, with a
warning). Augmentation and masking are seeded per (seed, rank, reader, batch), inside
``torch.random.fork_rng`` so the training process's RNG is untouched.

Bad data: an undecodable image, a missing, empty or non-UTF-8 text, an unreadable or truncated tar
is skipped, counted per shard (``stats``) and logged as a warning naming the shard (the first
``warnings_per_shard`` of each). A missing path, too few shards for the readers, or a kind without
one usable sample is a ``ValueError`` when the loader is built.
"""
from __future__ import annotations

import copy
import glob
import hashlib
import io
import logging
import os
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from .masking import (IMAGE_MASK_RATIO, PAIR_TEXT_MASK_PROB, TEXT_MASK_PROB, BlockMaskGenerator,
                      default_num_masking_patches, mask_text)
from .shards import manifest_shards, read_manifest
from .text_tokenizer import TextTokenizer
from .transforms import BEIT_MIN_CROP_SCALE, VL_CROP_SCALE, PretrainImageTransform

log = logging.getLogger(__name__)

KINDS = ("images", "texts", "pairs")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
STATE_VERSION = 1
TEXT_PADDING = ("longest", "max")
MAX_EMPTY_EPOCHS = 1000  # a reader that finds nothing usable for this long stops instead of hanging


@dataclass
class PretrainDataConfig:
    shards_dir: str | None = None  # holds {images,texts,pairs}-*.tar (and manifest.json)
    image_shards: str | Sequence[str] | None = None  # per-kind override: paths or brace patterns
    text_shards: str | Sequence[str] | None = None
    pair_shards: str | Sequence[str] | None = None
    batch_images: int = 16
    batch_texts: int = 16
    batch_pairs: int = 16
    img_size: int = 224
    patch_size: int = 16
    tokenizer_img_size: int = 224
    tokenizer_patch_size: int | None = None  # when given, its grid must equal the model's
    max_text_len: int = 64
    text_padding: str = "longest"  # or "max"
    text_pad_multiple: int = 8  # tensor-core friendly widths, and few distinct shapes
    num_workers: int = 0
    seed: int = 0
    image_mask_ratio: float = IMAGE_MASK_RATIO
    num_masking_patches: int | None = None  # default: default_num_masking_patches(grid, grid, ratio)
    mask_pair_images: bool = False
    min_crop_scale: float = BEIT_MIN_CROP_SCALE
    # A pair's caption describes the whole picture and says "left"/"right": crop it as the official
    # vision-language fine-tuning does (scale >= 0.5) and do not flip it.
    pair_min_crop_scale: float = VL_CROP_SCALE[0]
    color_jitter: float = 0.4
    hflip: float = 0.5
    pair_hflip: float = 0.0
    text_mask_prob: float = TEXT_MASK_PROB
    pair_text_mask_prob: float = PAIR_TEXT_MASK_PROB
    shuffle_buffer: int = 500
    prefetch_factor: int = 2
    pin_memory: bool = False
    warnings_per_shard: int = 5

    @property
    def readers_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    def batch_size(self, kind: str) -> int:
        return {"images": self.batch_images, "texts": self.batch_texts, "pairs": self.batch_pairs}[kind]

    def active_kinds(self) -> list[str]:
        return [k for k in KINDS if self.batch_size(k) > 0]

    def masked_patches(self) -> int:
        if self.num_masking_patches is not None:
            return self.num_masking_patches
        return default_num_masking_patches(self.grid, self.grid, self.image_mask_ratio)

    def validate(self) -> None:
        if min(self.batch_images, self.batch_texts, self.batch_pairs) < 0 or not self.active_kinds():
            raise ValueError(f"batch sizes must be >= 0 and not all 0, got images={self.batch_images}, "
                             f"texts={self.batch_texts}, pairs={self.batch_pairs}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.tokenizer_patch_size and self.tokenizer_img_size // self.tokenizer_patch_size != self.grid:
            raise ValueError(f"tokenizer grid {self.tokenizer_img_size}/{self.tokenizer_patch_size} != model grid "
                             f"{self.img_size}/{self.patch_size}: the image mask indexes both")
        if not 0 <= self.masked_patches() <= self.grid ** 2:
            raise ValueError(f"num_masking_patches {self.masked_patches()} outside [0, {self.grid ** 2}]")
        if self.text_padding not in TEXT_PADDING or self.text_pad_multiple < 1:
            raise ValueError(f"text_padding={self.text_padding!r}, text_pad_multiple={self.text_pad_multiple}: "
                             f"expected one of {TEXT_PADDING} and a multiple >= 1")
        if self.max_text_len < 2 or self.num_workers < 0 or self.shuffle_buffer < 1:
            raise ValueError(f"need max_text_len >= 2, num_workers >= 0, shuffle_buffer >= 1; got "
                             f"{self.max_text_len}, {self.num_workers}, {self.shuffle_buffer}")


# --------------------------------------------------------------------------- shard lists
def _expand(patterns: str | Sequence[str]) -> list[str]:
    patterns = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
    return [p for pattern in patterns for p in braceexpand(os.fspath(pattern))]


def resolve_shards(cfg: PretrainDataConfig) -> dict[str, list[str]]:
    """``{kind: shard paths}`` for every kind with a batch size, checked to exist and be non-empty."""
    out = {}
    for kind in cfg.active_kinds():
        explicit = getattr(cfg, f"{kind[:-1]}_shards")
        if explicit:
            paths = _expand(explicit)
        elif cfg.shards_dir:
            paths = _dir_shards(cfg.shards_dir, kind)
        else:
            raise ValueError(f"no {kind} shards: set shards_dir or {kind[:-1]}_shards")
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"{kind} shard {missing[0]} does not exist ({len(missing)} of {len(paths)} missing)")
        if not paths or all(os.path.getsize(p) == 0 for p in paths):
            raise ValueError(f"no {kind} data: {len(paths)} shards, all empty")
        out[kind] = paths
    return out


def _dir_shards(folder: str, kind: str) -> list[str]:
    if not os.path.isdir(folder):
        raise ValueError(f"shards_dir {folder} does not exist")
    listed = manifest_shards(folder, kind)
    if listed is not None:
        if read_manifest(folder)["kinds"][kind].get("num_samples", 1) == 0:
            raise ValueError(f"{folder}/manifest.json lists no {kind} samples")
        return listed
    found = sorted(glob.glob(os.path.join(glob.escape(folder), f"{kind}-*.tar")))
    if not found:
        raise ValueError(f"{folder} has no {kind}-*.tar shards (and no manifest.json entry for {kind})")
    return found


# --------------------------------------------------------------------------- reading shards
class BadSample(ValueError):
    """A sample that cannot be used (undecodable image, missing or empty text)."""


class SkipLog:
    """Per-shard counts of skipped samples and read errors; warns for the first few of each shard."""

    def __init__(self, counts: dict[str, int] | None = None, warn_limit: int = 5):
        self.counts = Counter(counts or {})
        self.warn_limit = warn_limit
        self.muted = False  # while replaying a stream up to a restored position (counted back then)

    def add(self, shard: str, why: str) -> None:
        if self.muted:
            return
        self.counts[shard] += 1
        n = self.counts[shard]
        if n <= self.warn_limit:
            more = "; further ones in this shard are only counted" if n == self.warn_limit else ""
            log.warning("skipped bad data in shard %s (%d so far): %s%s", shard, n, why, more)

    def handler(self, shard: str, keep_going: bool) -> Callable[[Exception], bool]:
        """A webdataset ``handler``: count and warn, then continue (True) or end the shard (False)."""
        def handle(exn: Exception) -> bool:
            self.add(shard, f"{type(exn).__name__}: {exn}")
            return keep_going
        return handle

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def read_shard(path: str, skips: SkipLog) -> Iterator[dict]:
    """Samples ``{"__key__", "__url__", ext: bytes}`` of one tar; a read error ends the shard."""
    return group_by_keys(_tar_members(path, skips), handler=skips.handler(path, keep_going=True))


def _tar_members(path: str, skips: SkipLog) -> Iterator[dict]:
    failed = []
    count = skips.handler(path, keep_going=False)

    def on_error(exn: Exception) -> bool:  # after a broken member the stream is lost: end the shard
        failed.append(exn)
        return count(exn)

    try:
        f = open(path, "rb")
    except OSError as e:
        on_error(e)
        return
    with f:
        members = tar_file_iterator(f, handler=on_error)
        while True:
            try:
                member = next(members)
            except StopIteration:
                # tarfile takes a cut inside a header for the end of the archive, silently
                if not failed and (why := tar_truncation(path)):
                    on_error(tarfile.ReadError(why))
                return
            except Exception as e:  # a truncated header or garbage raises outside webdataset's handler
                on_error(e)
                return
            member["__url__"] = path
            yield member


def tar_truncation(path: str) -> str | None:
    """Why ``path`` is not a complete tar (a tar is whole 512-byte blocks ending in two zero blocks)."""
    size = os.path.getsize(path)
    if size % 512 or size < 1024:
        return f"truncated tar: {size} bytes is not a whole number of 512-byte blocks"
    with open(path, "rb") as f:
        f.seek(size - 1024)
        if any(f.read(1024)):
            return "truncated tar: no end-of-archive blocks"
    return None


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

    def __init__(self, kind: str, shards: list[str], reader: int, num_readers: int, seed: int,
                 buffer: int, skips: SkipLog, position: Sequence[int] = (0, 0, 0)):
        self.kind, self.shards, self.reader, self.num_readers = kind, shards, reader, num_readers
        self.seed, self.buffer, self.skips = seed, buffer, skips
        self.position = tuple(position)
        self.last_valid_epoch = self.position[0]

    def epoch_shards(self, epoch: int) -> list[int]:
        """Indices (into ``shards``) this reader reads in ``epoch``."""
        order = random.Random(f"{self.seed}/{self.kind}/{epoch}").sample(range(len(self.shards)), len(self.shards))
        return order[self.reader::self.num_readers]

    def shard_samples(self, shard: int, epoch: int) -> Iterator[dict]:
        rng = random.Random(f"{self.seed}/{self.kind}/{epoch}/{shard}")
        return _buffer_shuffle(read_shard(self.shards[shard], self.skips), rng, self.buffer)

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
def decode_image(sample: dict) -> Image.Image:
    ext = next((k for k in IMAGE_KEYS if k in sample), None)
    if ext is None:
        raise BadSample(f"no image member ({'/'.join(IMAGE_KEYS)}) among {sorted(k for k in sample if k[0] != '_')}")
    try:
        with Image.open(io.BytesIO(sample[ext])) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise BadSample(f"undecodable image {sample['__key__']}.{ext}: {e}") from e


def decode_text(sample: dict) -> str:
    if "txt" not in sample:
        raise BadSample("no txt member")
    try:
        text = sample["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise BadSample(f"text {sample['__key__']}.txt is not UTF-8: {e}") from e
    if not text:
        raise BadSample(f"empty text {sample['__key__']}.txt")
    return text


DECODERS = {"images": decode_image, "texts": decode_text,
            "pairs": lambda s: (decode_image(s), decode_text(s))}


def first_usable_sample(kind: str, shards: list[str]) -> str:
    """``shard:key`` of the first sample of ``kind`` that decodes; ValueError if there is none."""
    quiet = SkipLog()
    quiet.muted = True
    for shard in shards:
        for sample in read_shard(shard, quiet):
            try:
                DECODERS[kind](sample)
                return f"{shard}:{sample['__key__']}"
            except BadSample:
                continue
    raise ValueError(f"no usable {kind} sample in {len(shards)} shards ({shards[0]} ...): empty or all broken")


# --------------------------------------------------------------------------- batches of one reader
def _seed(*key: int) -> int:
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


class ReaderBatches:
    """The batches of one reader (logical dataloader worker ``worker`` of rank ``rank``)."""

    def __init__(self, cfg: PretrainDataConfig, shards: dict[str, list[str]], tokenizer_path: str,
                 rank: int, world_size: int, worker: int, state: dict | None):
        state = state or {}
        per_rank = cfg.readers_per_rank
        self.cfg, self.rank, self.worker = cfg, rank, worker
        self.batches = state.get("batches", 0)
        self.skips = SkipLog(state.get("skipped"), cfg.warnings_per_shard)
        positions = state.get("streams", {})
        self.streams = {kind: ShardStream(kind, paths, rank * per_rank + worker, world_size * per_rank, cfg.seed,
                                          cfg.shuffle_buffer, self.skips, positions.get(kind, (0, 0, 0)))
                        for kind, paths in shards.items()}
        self.iters = {kind: iter(s) for kind, s in self.streams.items()}
        self.tokenizer = TextTokenizer(tokenizer_path)
        self.masker = BlockMaskGenerator(cfg.grid, cfg.masked_patches())
        self.image_tf = PretrainImageTransform(cfg.img_size, cfg.tokenizer_img_size, cfg.min_crop_scale,
                                               cfg.color_jitter, cfg.hflip)
        self.pair_tf = PretrainImageTransform(cfg.img_size, cfg.tokenizer_img_size, cfg.pair_min_crop_scale,
                                              cfg.color_jitter, cfg.pair_hflip)

    def state(self) -> dict:
        return {"worker": self.worker, "batches": self.batches, "skipped": dict(self.skips.counts),
                "streams": {kind: list(s.position) for kind, s in self.streams.items()}}

    def take(self, kind: str, n: int) -> tuple[list, list[str]]:
        """``n`` decoded samples of ``kind`` and their ``shard:key``; bad ones are counted and skipped."""
        items, keys = [], []
        while len(items) < n:
            sample = next(self.iters[kind])
            try:
                items.append(DECODERS[kind](sample))
            except BadSample as e:
                self.skips.add(sample["__url__"], str(e))
                continue
            self.streams[kind].mark_valid()
            keys.append(f"{os.path.basename(sample['__url__'])}:{sample['__key__']}")
        return items, keys

    def next_batch(self) -> dict:
        cfg = self.cfg
        key = (cfg.seed, self.rank, self.worker, self.batches)
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

    def image_part(self, images: list[Image.Image], rng: np.random.Generator,
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

    def pair_part(self, pairs: list[tuple[Image.Image, str]], rng: np.random.Generator,
                  gen: torch.Generator) -> dict:
        part = self.image_part([p[0] for p in pairs], rng, self.pair_tf)
        if not self.cfg.mask_pair_images:
            part = {"image": part["image"]}
        return {**part, **self.text_part([p[1] for p in pairs], self.cfg.pair_text_mask_prob, gen)}


class MixedBatches(IterableDataset):
    """Endless batches of this process's readers; in a DataLoader each worker is one reader.

    Physical worker j plays reader (j + offset) % R: after a restore at batch K the DataLoader's
    round-robin starts with the reader that owed batch K.
    """

    def __init__(self, cfg: PretrainDataConfig, shards: dict[str, list[str]], tokenizer_path: str,
                 rank: int, world_size: int, states: list[dict | None], offset: int):
        self.cfg, self.shards, self.tokenizer_path = cfg, shards, tokenizer_path
        self.rank, self.world_size, self.states, self.offset = rank, world_size, states, offset

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.offset) % self.cfg.readers_per_rank
        reader = ReaderBatches(self.cfg, self.shards, self.tokenizer_path, self.rank, self.world_size,
                               worker, self.states[worker])
        while True:
            yield reader.next_batch()


# --------------------------------------------------------------------------- the loader
def _names_digest(paths: list[str]) -> str:
    """Count and hash of the shard file names (moving the folder keeps the stream position)."""
    names = "\n".join(os.path.basename(p) for p in paths)
    return f"{len(paths)}:{hashlib.sha1(names.encode()).hexdigest()[:16]}"


class PretrainLoader:
    """Iterable of mixed pretraining batches for one rank, with a resumable stream position.

    ``text_tokenizer``: a :class:`TextTokenizer` or the path of its sentencepiece model.
    """

    def __init__(self, cfg: PretrainDataConfig, text_tokenizer: TextTokenizer | str, rank: int = 0,
                 world_size: int = 1):
        cfg.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.tokenizer_path = text_tokenizer.model_file if isinstance(text_tokenizer, TextTokenizer) \
            else os.fspath(text_tokenizer)
        TextTokenizer(self.tokenizer_path)  # fail now, not in a worker
        self.shards = resolve_shards(cfg)
        readers = world_size * cfg.readers_per_rank
        for kind, paths in self.shards.items():
            if len(paths) < readers:
                raise ValueError(f"{len(paths)} {kind} shards for {readers} readers ({world_size} ranks x "
                                 f"{cfg.readers_per_rank} workers); every reader needs its own shard: write "
                                 "smaller shards (beit3 data shards --shard-size) or use fewer workers")
            first_usable_sample(kind, paths)
        self._batches = 0
        self._states: list[dict | None] = [None] * cfg.readers_per_rank

    def __iter__(self) -> Iterator[dict]:
        cfg = self.cfg
        data = MixedBatches(cfg, self.shards, self.tokenizer_path, self.rank, self.world_size,
                            copy.deepcopy(self._states), self._batches % cfg.readers_per_rank)
        if cfg.num_workers > 0:
            data = DataLoader(data, batch_size=None, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory,
                              prefetch_factor=cfg.prefetch_factor)
        for batch in data:
            state = batch.pop("_state")
            self._states[state["worker"]] = state
            self._batches += 1
            batch["stats"] = self._stats(batch.pop("_keys"))
            yield batch

    def _stats(self, keys: dict[str, list[str]]) -> dict:
        per_shard = Counter()
        for state in filter(None, self._states):
            per_shard.update(state["skipped"])
        epochs = {kind: max(s["streams"][kind][0] for s in filter(None, self._states)) for kind in self.shards}
        return {"skipped": sum(per_shard.values()), "skipped_per_shard": dict(per_shard), "keys": keys,
                "epochs": epochs}

    # -- stream position ---------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "readers_per_rank": self.cfg.readers_per_rank,
                "seed": self.cfg.seed, "shards": {k: _names_digest(v) for k, v in self.shards.items()}}

    def state_dict(self) -> dict:
        """Position after the batches yielded so far (not those prefetched by workers)."""
        return {"version": STATE_VERSION, "batches": self._batches, "readers": copy.deepcopy(self._states),
                "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; takes effect at the next ``iter()``."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"pretraining data state version {state.get('version')!r}, expected {STATE_VERSION}")
        mismatch = [k for k, v in self._fingerprint().items() if state["fingerprint"].get(k) != v]
        if mismatch:
            epoch = 1 + max((p[0] for s in filter(None, state["readers"]) for p in s["streams"].values()), default=0)
            log.warning("pretraining data state was saved with different %s; the stream restarts at epoch %d "
                        "(reshuffled) instead of continuing exactly", ", ".join(mismatch), epoch)
            self._batches = 0
            self._states = [{"worker": w, "batches": 0, "skipped": {},
                             "streams": {k: [epoch, 0, 0] for k in self.shards}}
                            for w in range(self.cfg.readers_per_rank)]
            return
        self._batches = int(state["batches"])
        self._states = copy.deepcopy(state["readers"])

    def summary(self) -> str:
        cfg = self.cfg
        return (f"pretraining data: " + ", ".join(f"{kind} {cfg.batch_size(kind)}/step from {len(p)} shards"
                                                 for kind, p in self.shards.items())
                + f"; rank {self.rank}/{self.world_size}, {cfg.readers_per_rank} readers, "
                f"{cfg.masked_patches()} of {cfg.grid ** 2} patches masked; config {asdict(cfg)}")
