"""What ``beit3 embed`` embeds, cut into chunks: a folder of images, a text file, a JSON-lines list or
webdataset shards.

    photos/            every image file under it, sorted; id: its path relative to the folder
                       (a folder holding .tar files: those shards)
    texts.txt          one text a line; id: the line number (from 1); blank lines are no texts
    list.jsonl         {"id": ..., "image": path} or {"id": ..., "text": ...} a line, one kind per file
                       (lines holding both: --modality picks); relative paths from the file's folder;
                       ids unique (default: the line number)
    PATTERN            webdataset shards as pretraining reads them (``beit3.data.sources``: brace
                       patterns, http(s)://, pipe:); id: the sample's key; ``modality="text"`` takes
                       its caption (``.txt``, or the ``caption`` of its ``.json``)

A listed input is cut into chunks of ``chunk_size`` items in input order, shards into one chunk per
shard. The chunks depend on the input alone, not on the number of processes, so a run resumed on
another number keeps what was done. ``fingerprint`` identifies the input (names and sizes of the
files, the bytes of a list, the shard URLs) so that chunks of an earlier run over other data are
never mixed in.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional, Union

from beit3.core.errors import BadFileError, UserError
from beit3.data.sources import DataSourceError, RetryPolicy, Shard, SkipLog, is_remote, read_samples, resolve_source

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
MODALITIES = ("image", "text")


@dataclass(frozen=True)
class Skip:
    """An input that cannot be embedded, and why (counted, never in the output)."""
    why: str


@dataclass(frozen=True)
class Chunk:
    """``items`` ((id, image path or text), ...) of a listed input, or one ``shard`` read whole."""
    index: int
    items: tuple = ()
    shard: Optional[Shard] = None
    size: Optional[int] = None  # inputs in it, when known

    @property
    def name(self) -> str:
        if self.shard is not None:
            return self.shard.name
        return f"items {self.items[0][0]!r}..{self.items[-1][0]!r}"


@dataclass
class Inputs:
    spec: str
    kind: str  # folder | text | jsonl | shards
    modality: str  # image | text
    chunks: list[Chunk]
    total: Optional[int]  # inputs (images or texts), None when unknown (remote shards)
    fingerprint: str


def open_inputs(spec: str, modality: Optional[str] = None, chunk_size: int = 4096) -> Inputs:
    """The inputs named by ``spec``, cut into chunks; ``UserError`` with one line for a path that is
    not there, an empty input, a malformed list, or a modality the input cannot give."""
    if modality is not None and modality not in MODALITIES:
        raise UserError(f"--modality {modality!r}: expected one of {', '.join(MODALITIES)}")
    if chunk_size < 1:
        raise UserError(f"--chunk-size must be >= 1, got {chunk_size}")
    local = not is_remote(spec)
    if local and os.path.isdir(spec) and not _has_tars(spec):
        return _listed(spec, "folder", _need(modality, "image", spec, "a folder of images"), _folder(spec), chunk_size)
    if local and os.path.isfile(spec) and spec.endswith(".txt"):
        return _listed(spec, "text", _need(modality, "text", spec, "a text file"), _text_lines(spec), chunk_size)
    if local and os.path.isfile(spec) and spec.endswith(".jsonl"):
        found, items = _jsonl(spec, modality)
        return _listed(spec, "jsonl", found, items, chunk_size)
    return _shards(spec, modality or "image")


def _need(modality: Optional[str], kind: str, spec: str, what: str) -> str:
    if modality not in (None, kind):
        raise UserError(f"--input {spec} is {what}: it holds {kind}s, not {modality}s (--modality)")
    return kind


def _has_tars(folder: str) -> bool:
    return any(n.endswith(".tar") for n in os.listdir(folder))


def _listed(spec: str, kind: str, modality: str, items: list[tuple[str, str]], chunk_size: int) -> Inputs:
    if not items:
        what = {"folder": f"no image files ({', '.join(IMAGE_SUFFIXES)})", "text": "no text (every line blank)",
                "jsonl": "no lines"}[kind]
        raise UserError(f"--input {spec}: {what}: nothing to embed")
    digest = hashlib.sha256()
    for key, value in items:
        size = os.path.getsize(value) if modality == "image" and os.path.isfile(value) else -1
        digest.update(json.dumps([key, value if modality == "text" else os.path.basename(value), size]).encode())
    chunks = [Chunk(n, tuple(items[i:i + chunk_size]), size=len(items[i:i + chunk_size]))
              for n, i in enumerate(range(0, len(items), chunk_size))]
    return Inputs(os.path.abspath(spec), kind, modality, chunks, len(items), digest.hexdigest())


def _folder(folder: str) -> list[tuple[str, str]]:
    found = [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names
             if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")]
    return [(os.path.relpath(p, folder).replace(os.sep, "/"), p) for p in sorted(found)]


def _text_lines(path: str) -> list[tuple[str, str]]:
    items = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise BadFileError(path, f"line {n} is not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                         f"{e.start + 1})") from None
            if line.strip():
                items.append((str(n), line))
    return items


def _jsonl(path: str, modality: Optional[str]) -> tuple[str, list[tuple[str, str]]]:
    """(modality, items) of a JSON-lines list."""
    base, items, seen, kinds = os.path.dirname(os.path.abspath(path)), [], {}, {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            obj = _json_line(path, n, raw)
            have = [k for k in MODALITIES if k in obj]
            kind = modality if modality in have else have[0] if len(have) == 1 else None
            if kind is None:
                need = f'a "{modality}"' if modality else 'an "image" or a "text" (both: say which with --modality)'
                raise UserError(f"{path} line {n}: expected {need}, got keys {sorted(obj)}")
            kinds.setdefault(kind, n)
            if len(kinds) > 1:
                other = next(k for k in kinds if k != kind)
                raise UserError(f"{path} line {n} holds {_a(kind)}, line {kinds[other]} {_a(other)}: one kind "
                                f"per file (lines holding both: --modality picks one)")
            key = _id(path, n, obj.get("id", n))
            if key in seen:
                raise UserError(f"{path} line {n}: id {key!r} is also line {seen[key]}'s; ids must be unique")
            seen[key] = n
            value = obj[kind]
            if kind == "image" and isinstance(value, str) and not is_remote(value):
                value = os.path.join(base, value)
            items.append((key, value))
    return (next(iter(kinds)) if kinds else modality or "image"), items


def _a(kind: str) -> str:
    return f"an {kind}" if kind == "image" else f"a {kind}"


def _json_line(path: str, n: int, raw: bytes) -> dict:
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError:
        raise BadFileError(path, f"line {n} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {n}: not JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} line {n}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _id(path: str, n: int, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(f"{path} line {n}: id must be a string or an integer, got {value!r:.60}")
    key = str(value)
    if not key or "\n" in key or "\r" in key:
        raise UserError(f"{path} line {n}: id {key!r:.60} is empty or holds a line break (the ids file has "
                        f"one id a line)")
    return key


def _shards(spec: str, modality: str) -> Inputs:
    kind = "images" if modality == "image" else "texts"
    try:
        source = resolve_source(kind, spec)
    except DataSourceError as e:
        raise UserError(f"--input {e}") from None
    if any(not s.url.endswith(".tar") and not is_remote(s.url) for s in source.shards):
        raise UserError(f"--input {spec}: not a folder of images, a .txt, a .jsonl or webdataset shards (.tar)")
    urls = [s.url for s in source.shards]
    sizes = [os.path.getsize(u) if not is_remote(u) else -1 for u in urls]
    digest = hashlib.sha256(json.dumps([urls, sizes]).encode()).hexdigest()
    chunks = [Chunk(n, shard=s) for n, s in enumerate(source.shards)]
    return Inputs(spec, "shards", modality, chunks, source.samples, digest)


# -- reading a chunk -------------------------------------------------------------------------------
def chunk_items(chunk: Chunk, modality: str, skips: SkipLog,
                retry: Optional[RetryPolicy] = None) -> Iterator[tuple[str, Union[str, bytes, Skip]]]:
    """(id, image path / encoded image / text, or ``Skip``) of each input of ``chunk``, in order. A
    shard that fails for good ends early and is recorded in ``skips.failed``."""
    if chunk.shard is None:
        yield from chunk.items
        return
    for sample in read_samples(chunk.shard, skips, retry):
        yield sample["__key__"], (_sample_image(sample) if modality == "image" else _sample_text(sample))


def _sample_image(sample: dict) -> Union[bytes, Skip]:
    for key in SHARD_IMAGE_KEYS:
        if key in sample:
            return sample[key]
    return Skip(f"no image in the sample (keys {sorted(k for k in sample if not k.startswith('__'))})")


def _sample_text(sample: dict) -> Union[str, Skip]:
    try:
        if "txt" in sample:
            return sample["txt"].decode("utf-8")
        if "json" in sample:
            caption = json.loads(sample["json"]).get("caption")
            if isinstance(caption, str):
                return caption
    except (UnicodeDecodeError, ValueError, AttributeError) as e:
        return Skip(f"unreadable caption ({e})")
    return Skip("no text in the sample (.txt, or a .json with a caption)")
