"""Where pretraining samples come from: shard URLs as people hold them, folders of images, text files.

A *source* is one pattern with a weight, written ``PATTERN`` or ``PATTERN::WEIGHT``::

    /data/laion/{00000..41407}.tar::0.7               local webdataset shards (brace expansion)
    https://host/cc12m/{00000..01242}.tar::0.3        read through webdataset's opener (curl)
    pipe:aws s3 cp s3://bucket/{00000..41407}.tar -   any command writing a tar to stdout
    /data/imagenet/train/                             a folder: its *.tar, or its image files
    /data/cc3m-files/                                 pairs: img2dataset's "files" output, KEY.jpg + KEY.txt/.json
    /data/corpus/{en,de}.txt  /data/cc.jsonl          text files: one document a line

Tars are read as img2dataset and ``beit3 data shards`` write them: ``KEY.jpg|jpeg|png|webp`` and
``KEY.txt`` or the ``caption`` field of ``KEY.json``; a kind takes what it needs from a sample (an
image source ignores captions). Folders of images and text files are cut into virtual shards
(chunks of files, byte ranges of lines) so that every reader has its own.

Reads of remote shards are bounded in time (``remote.Timeouts``: connect, stall, trickle) and
retried with exponential backoff; a shard that still fails is skipped,
counted and logged with its URL (``SkipLog``), and the caller stops once too many of one source
failed (``DataSourceError``). Local files are not retried: their errors do not go away.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from braceexpand import braceexpand
from webdataset.tariterators import group_by_keys, tar_file_iterator

from beit3.data.remote import ReadTimeout, Timeouts, open_stream
from beit3.data.shards import ShardError, read_manifest

log = logging.getLogger(__name__)

WEIGHT_SEP = "::"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TEXT_SUFFIXES = (".txt", ".jsonl")
CAPTION_SUFFIXES = (".txt", ".json")  # beside an image file: img2dataset's "files" output
IMAGES_PER_SHARD = 1000  # a folder of images: files per virtual shard
TEXT_BYTES_PER_SHARD = 64 << 20  # a text file: bytes per virtual shard
_REMOTE = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]*://)")


class DataSourceError(ValueError):
    """A source that cannot be used: a pattern matching nothing, an unreachable first shard, or too
    many shards failing while training."""


@dataclass(frozen=True)
class Shard:
    """One unit a reader reads whole: a tar (``url``), a chunk of image ``files``, or the lines of a
    text file between byte ``start`` and ``end`` (-1: its end); image files with ``captions`` come
    with the KEY.txt / KEY.json beside each."""
    url: str
    files: tuple[str, ...] = ()
    start: int = 0
    end: int = -1
    captions: bool = False  # image files: read KEY.txt / KEY.json beside each (pairs)

    @property
    def name(self) -> str:
        if self.files:
            return f"{self.url}[{os.path.basename(self.files[0])}..{os.path.basename(self.files[-1])}]"
        if self.start or self.end >= 0:
            return f"{self.url}[{self.start}:{self.end}]"
        return self.url


@dataclass
class Source:
    kind: str  # images | texts | pairs
    pattern: str
    weight: float
    shards: list[Shard]
    samples: int | None = None  # None: not known
    count_note: str = ""  # where ``samples`` comes from

    def describe(self) -> str:
        n = "unknown number of" if self.samples is None else f"{self.samples:,}"
        return (f"{self.kind} source {self.pattern!r} (weight {self.weight:g}): {len(self.shards)} shards, "
                f"{n} samples ({self.count_note})")


def is_remote(url: str) -> bool:
    return bool(_REMOTE.match(url))


def parse_spec(spec: str) -> tuple[str, float]:
    """``PATTERN[::WEIGHT]`` -> (pattern, weight)."""
    pattern, sep, weight = spec.rpartition(WEIGHT_SEP)
    if not sep:
        return spec, 1.0
    try:
        w = float(weight)
    except ValueError:
        raise DataSourceError(f"source {spec!r}: the weight after {WEIGHT_SEP!r} must be a number, "
                              f"got {weight!r}") from None
    if not (w > 0 and math.isfinite(w)):
        raise DataSourceError(f"source {spec!r}: weight {w:g} must be positive")
    if not pattern:
        raise DataSourceError(f"source {spec!r}: no pattern before {WEIGHT_SEP!r}")
    return pattern, w


# --------------------------------------------------------------------------- resolving
def resolve_source(kind: str, spec: str, min_shards: int = 1) -> Source:
    """The shards of one source. ``min_shards``: how many readers must each get their own shard
    (virtual shards are cut to at least that many)."""
    pattern, weight = parse_spec(spec)
    urls = list(braceexpand(pattern))
    if all(is_remote(u) for u in urls):
        return Source(kind, pattern, weight, [Shard(u) for u in urls], None,
                      "remote: counted only while reading")
    if any(is_remote(u) for u in urls):
        raise DataSourceError(f"{kind} source {pattern!r} mixes remote and local paths")
    if len(urls) == 1 and os.path.isdir(urls[0]):
        return _folder_source(kind, urls[0], pattern, weight, min_shards)
    present = [u for u in urls if os.path.isfile(u)]
    if not present:
        raise DataSourceError(f"{kind} source {pattern!r} matches no file ({len(urls)} paths, none exists)")
    if len(present) < len(urls):
        missing = [u for u in urls if u not in set(present)]
        log.warning("%s source %r: %d of %d paths do not exist and are left out (first: %s)",
                    kind, pattern, len(missing), len(urls), missing[0])
    return _files_source(kind, present, pattern, weight, min_shards)


def _folder_source(kind: str, folder: str, pattern: str, weight: float, min_shards: int) -> Source:
    names = sorted(os.listdir(folder))
    tars = [os.path.join(folder, n) for n in names if n.endswith(".tar")]
    if tars:
        return _files_source(kind, tars, pattern, weight, min_shards)
    found = [os.path.join(dp, f) for dp, _, fs in os.walk(folder) for f in fs]
    images = sorted(p for p in found if p.lower().endswith(tuple("." + k for k in IMAGE_KEYS)))
    texts = sorted(p for p in found if p.endswith(TEXT_SUFFIXES))
    if kind == "images" and images:
        return _files_source(kind, images, pattern, weight, min_shards)
    if kind == "texts" and texts:
        return _files_source(kind, texts, pattern, weight, min_shards)
    captioned = _captioned(images, found) if kind == "pairs" else []
    if captioned:  # img2dataset's "files" output: 00000/000000001.jpg beside .txt and .json
        return _files_source(kind, captioned, pattern, weight, min_shards)
    what = {"images": " or image files", "texts": " or .txt/.jsonl files",
            "pairs": " or image files with a KEY.txt or KEY.json caption beside them"}[kind]
    raise DataSourceError(f"{kind} source {folder}: a folder without .tar shards{what}")


def _captioned(images: list[str], files: list[str]) -> list[str]:
    """The images with a caption file of the same name beside them (KEY.txt or KEY.json)."""
    present = set(files)
    return [p for p in images if any(os.path.splitext(p)[0] + s in present for s in CAPTION_SUFFIXES)]


def _files_source(kind: str, paths: list[str], pattern: str, weight: float, min_shards: int) -> Source:
    suffixes = {_suffix(p) for p in paths}
    if suffixes == {".tar"}:
        samples, note = _tar_counts(paths)
        return Source(kind, pattern, weight, [Shard(p) for p in paths], samples, note)
    if suffixes <= set(TEXT_SUFFIXES) and kind == "texts":
        return _text_source(paths, pattern, weight, min_shards)
    if suffixes <= {"." + k for k in IMAGE_KEYS} and kind in ("images", "pairs"):
        n = max(min_shards, math.ceil(len(paths) / IMAGES_PER_SHARD))
        chunks = [tuple(c) for c in (paths[i::n] for i in range(n)) if c]
        folder = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
        pairs = kind == "pairs"
        return Source(kind, pattern, weight, [Shard(folder, files=c, captions=pairs) for c in chunks], len(paths),
                      "image files with captions" if pairs else "image files")
    raise DataSourceError(f"{kind} source {pattern!r}: cannot read {sorted(suffixes)} files as {kind} "
                          f"(tars for any kind, images for images and, with captions beside them, pairs; "
                          f".txt/.jsonl for texts)")


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _text_source(paths: list[str], pattern: str, weight: float, min_shards: int) -> Source:
    shards, lines = [], 0
    per_file = max(1, math.ceil(min_shards / len(paths)))
    for p in paths:
        size = os.path.getsize(p)
        n = max(per_file, math.ceil(size / TEXT_BYTES_PER_SHARD))
        bounds = [size * i // n for i in range(n + 1)]
        shards += [Shard(p, start=a, end=b) for a, b in zip(bounds, bounds[1:])]
        with open(p, "rb") as f:
            lines += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    return Source("texts", pattern, weight, shards, lines, "lines of the text files")


def _tar_counts(paths: list[str]) -> tuple[int | None, str]:
    """Samples in local tars: img2dataset's ``<shard>_stats.json`` ("successes") for every shard,
    else the folder's ``manifest.json`` (``beit3 data shards``), else the first shard counted times
    the number of shards."""
    stats = [os.path.splitext(p)[0] + "_stats.json" for p in paths]
    if all(os.path.isfile(s) for s in stats):
        try:
            return sum(int(json.load(open(s))["successes"]) for s in stats), "img2dataset *_stats.json"
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("img2dataset stats next to %s unreadable (%s); counting instead", paths[0], e)
    folder = os.path.dirname(paths[0])
    try:
        listed = {s["name"]: s["samples"] for e in read_manifest(folder)["kinds"].values() for s in e["shards"]}
    except ShardError as e:
        log.warning("%s; counting instead", e)
        listed = {}
    names = [os.path.basename(p) for p in paths]
    if names and all(n in listed for n in names):
        return sum(listed[n] for n in names), "manifest.json"
    first = len({s["__key__"] for s in read_samples(Shard(paths[0]), SkipLog(muted=True))})
    return first * len(paths), f"estimated: {first} in the first shard x {len(paths)} shards"


# --------------------------------------------------------------------------- skipping and failures
class SkipLog:
    """Per-shard counts of skipped samples and read errors, and the shards that failed for good;
    warns for the first few of each shard."""

    def __init__(self, counts: dict[str, int] | None = None, warn_limit: int = 5,
                 failed: dict[str, str] | None = None, muted: bool = False):
        self.counts = Counter(counts or {})
        self.failed: dict[str, str] = dict(failed or {})  # shard name -> why
        self.warn_limit = warn_limit
        self.muted = muted  # while replaying a stream up to a restored position (counted back then)

    def add(self, shard: str, why: str) -> None:
        if self.muted:
            return
        self.counts[shard] += 1
        n = self.counts[shard]
        if n <= self.warn_limit:
            more = "; further ones in this shard are only counted" if n == self.warn_limit else ""
            log.warning("skipped bad data in shard %s (%d so far): %s%s", shard, n, why, more)

    def shard_failed(self, shard: str, why: str) -> None:
        """Counted each time it happens (a later epoch tries the shard again); remembered once."""
        self.add(shard, f"shard given up: {why}")
        self.failed.setdefault(shard, why)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class RetryPolicy:
    retries: int = 3  # further attempts after a failed open or read of a remote shard
    backoff: float = 1.0  # seconds before the first retry, doubled each time
    timeouts: Timeouts = field(default_factory=Timeouts)  # of each attempt (connect, stall, trickle)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)


# --------------------------------------------------------------------------- reading
def open_url(url: str, timeouts: Timeouts | None = None):
    """A binary stream of ``url``: a local file, or the command webdataset would run for it (curl
    for http(s), the ``pipe:`` command, gsutil/ais for their schemes) with bounded reads."""
    if not is_remote(url):
        return open(url, "rb")
    return open_stream(url, timeouts or Timeouts())


def read_samples(shard: Shard, skips: SkipLog, retry: RetryPolicy | None = None) -> Iterator[dict]:
    """Samples ``{"__key__", "__url__", ext: bytes}`` of one shard. A shard that cannot be read to
    its end (after the retries, for remote ones) ends early and is recorded in ``skips.failed``."""
    if shard.files:
        return _file_samples(shard, skips)
    if shard.start or shard.end >= 0:
        return _line_samples(shard, skips)
    return _tar_samples(shard.url, skips, retry or RetryPolicy())


def _file_samples(shard: Shard, skips: SkipLog) -> Iterator[dict]:
    for path in shard.files:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            skips.add(shard.name, f"cannot read {path}: {e}")
            continue
        ext = _suffix(path)[1:]
        sample = {"__key__": os.path.splitext(os.path.relpath(path, shard.url))[0], "__url__": shard.name,
                  "jpg" if ext == "jpeg" else ext: data}
        if shard.captions:
            sample.update(_caption_files(os.path.splitext(path)[0]))
        yield sample


def _caption_files(stem: str) -> dict[str, bytes]:
    """``{"txt": ..., "json": ...}`` of the caption files beside an image (img2dataset's layout)."""
    found = {}
    for suffix in CAPTION_SUFFIXES:
        try:
            with open(stem + suffix, "rb") as f:
                found[suffix[1:]] = f.read()
        except OSError:
            continue
    return found


def _line_samples(shard: Shard, skips: SkipLog) -> Iterator[dict]:
    """Lines starting in [start, end); a .jsonl line's "text" (or "caption") field."""
    jsonl = shard.url.endswith(".jsonl")
    with open(shard.url, "rb") as f:
        if shard.start:
            f.seek(shard.start - 1)
            f.readline()  # the line that began before ``start`` belongs to the previous shard
        while shard.end < 0 or f.tell() < shard.end:
            pos, raw = f.tell(), f.readline()
            if not raw:
                return
            key = f"{os.path.basename(shard.url)}@{pos}"
            if not raw.strip():
                continue
            if jsonl:
                try:
                    obj = json.loads(raw)
                    text = obj.get("text", obj.get("caption")) if isinstance(obj, dict) else None
                    if not isinstance(text, str):
                        raise ValueError('no string "text" or "caption" field')
                except (ValueError, UnicodeDecodeError) as e:
                    skips.add(shard.name, f"{key}: bad JSON line ({e})")
                    continue
                raw = text.encode("utf-8")
            yield {"__key__": key, "__url__": shard.name, "txt": raw.strip()}


def _tar_samples(url: str, skips: SkipLog, retry: RetryPolicy) -> Iterator[dict]:
    def reraise(exn: Exception) -> bool:
        raise exn

    remote, taken, error = is_remote(url), 0, None
    for attempt in range((retry.retries if remote else 0) + 1):
        if attempt:
            wait = retry.backoff * 2 ** (attempt - 1)
            log.warning("shard %s: %s; retry %d of %d in %.1f s", url, error, attempt, retry.retries, wait)
            retry.sleep(wait)
        try:
            stream = open_url(url, retry.timeouts)
        except Exception as e:  # noqa: BLE001 - OSError, a failing subprocess, a bad URL
            error = _why(e)
            continue
        # Every byte the subprocess delivered is read before its exit status is judged: the tar
        # then breaks off at the same sample whenever the same bytes arrived.
        try:
            members = ({**m, "__url__": url} for m in tar_file_iterator(stream, handler=reraise))
            for i, sample in enumerate(group_by_keys(members, handler=reraise)):
                if i < taken:  # a retry re-reads the shard up to where the last attempt broke off
                    continue
                taken += 1
                yield sample
            why = stream.exit_problem() if remote else tar_truncation(url)  # a cut header reads as the end
            if why is None:
                return
            error = why
            if not remote:
                break
        except Exception as e:  # noqa: BLE001 - tarfile, the stream, a read timeout
            error = (stream.exit_problem() if remote else None) or _why(e)
        finally:
            _close_quietly(stream)
    skips.shard_failed(url, error or "unreadable")


def _why(e: Exception) -> str:
    """One line for a failed open or read."""
    return str(e) if isinstance(e, ReadTimeout) else f"{type(e).__name__}: {e}"


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - a pipe closed early exits non-zero; the samples are what counts
        pass


def tar_truncation(path: str) -> str | None:
    """Why local ``path`` is not a complete tar (whole 512-byte blocks ending in two zero blocks)."""
    size = os.path.getsize(path)
    if size % 512 or size < 1024:
        return f"truncated tar: {size} bytes is not a whole number of 512-byte blocks"
    with open(path, "rb") as f:
        f.seek(size - 1024)
        if any(f.read(1024)):
            return "truncated tar: no end-of-archive blocks"
    return None


def first_usable(source: Source, decode: Callable[[dict], object], retry: RetryPolicy | None = None,
                 shards_to_try: int = 3) -> str:
    """``shard:key`` of the first sample of ``source`` that ``decode`` accepts, looking at up to
    ``shards_to_try`` shards; ``DataSourceError`` naming the source and why if there is none."""
    quiet = SkipLog(muted=True)
    reasons = []
    for shard in source.shards[:shards_to_try]:
        for sample in read_samples(shard, quiet, retry):
            try:
                decode(sample)
                return f"{shard.name}:{sample['__key__']}"
            except ValueError:
                continue
        reasons.append(f"{shard.name}: {quiet.failed.get(shard.name, 'no usable sample')}")
    tried = len(source.shards[:shards_to_try])
    raise DataSourceError(f"{source.kind} source {source.pattern!r}: no usable sample in its first {tried} "
                          f"shard(s): " + "; ".join(reasons))


def failed_in(source: Source, failed: Sequence[str]) -> list[str]:
    names = {s.name for s in source.shards}
    return [f for f in failed if f in names]
