"""Webdataset tar shards for pretraining, and their ``manifest.json``.

    beit3 data shards --images DIR --output shards/              -> images-000000.tar ...
    beit3 data shards --captions pairs.jsonl --output shards/    -> pairs-000000.tar ...
    beit3 data shards --texts a.txt b.txt --output shards/       -> texts-000000.tar ...

Samples are ``{"__key__": "000000042", "jpg"|"png"|"webp": <the file's bytes>, "txt": <UTF-8>}``:
images keep their encoded bytes (the member's extension is their sniffed format, not the file
name's). Caption files are JSON lines ``{"image": path, "caption": text}`` (COCO / CC3M style;
relative paths are resolved against the file's folder); text files hold one document a line.

Unusable inputs (unknown image bytes, missing image files, empty or non-UTF-8 texts, bad JSON
lines) are skipped with a warning and counted; no samples at all is an error.

``manifest.json`` in the output folder lists, per kind, the source (relative to the folder), the
shards with their sample counts and byte sizes, the totals and the skipped inputs; writing a kind
replaces that kind's shards and entry only, so the images, texts and pairs of one dataset share
one folder and one manifest.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import webdataset as wds

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
KINDS = ("images", "texts", "pairs")  # what the pretraining loader mixes
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_SHARD_SIZE = 1000
TAR_MTIME = 0  # fixed member time: identical shards from identical inputs (an int: a float needs a pax header)


class ShardError(ValueError):
    """Bad input to the shard writer (missing path, nothing to write, bad option)."""


def sniff_image_format(data: bytes) -> str | None:
    """``"jpg"``, ``"png"`` or ``"webp"`` from the magic bytes, else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


# --------------------------------------------------------------------------- sample sources
# Each source yields ``(fields, None)`` for a sample or ``(None, reason)`` for a skipped input.
Item = tuple[dict | None, str | None]


def _image_fields(path: Path) -> tuple[dict | None, str | None]:
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, f"cannot read image {path}: {e}"
    fmt = sniff_image_format(data)
    if fmt is None:
        return None, f"{path} is not a JPEG, PNG or WebP file (first bytes {data[:8]!r})"
    return {fmt: data}, None


def image_folder_samples(folder: str | os.PathLike) -> Iterator[Item]:
    """Every ``IMAGE_SUFFIXES`` file under ``folder``, recursively, in sorted path order."""
    root = Path(folder)
    if not root.is_dir():
        raise ShardError(f"--images {folder}: no such directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return (_image_fields(path) for path in files)


def caption_samples(jsonl: str | os.PathLike) -> Iterator[Item]:
    """Image-text pairs from JSON lines ``{"image": path, "caption": text}``."""
    path = Path(jsonl)
    if not path.is_file():
        raise ShardError(f"--captions {jsonl}: no such file")
    return _caption_lines(path)


def _caption_lines(path: Path) -> Iterator[Item]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                entry = json.loads(raw)
                image, caption = entry["image"], entry["caption"]
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as e:
                yield None, f"{where}: expected a JSON object with 'image' and 'caption' ({e!r})"
                continue
            if not isinstance(caption, str) or not caption.strip():
                yield None, f"{where}: empty caption"
                continue
            fields, why = _image_fields(path.parent / image)
            if fields is None:
                yield None, f"{where}: {why}"
                continue
            yield {**fields, "txt": caption.strip()}, None


def text_samples(files: Sequence[str | os.PathLike]) -> Iterator[Item]:
    """One sample per non-blank line of each file; non-UTF-8 lines are skipped."""
    for name in files:
        if not Path(name).is_file():
            raise ShardError(f"--texts {name}: no such file")
    return _text_lines(files)


def _text_lines(files: Sequence[str | os.PathLike]) -> Iterator[Item]:
    for name in files:
        with open(name, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    yield None, f"{name}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})"
                    continue
                if text:
                    yield {"txt": text}, None


# --------------------------------------------------------------------------- writing
def write_shards(output_dir: str | os.PathLike, *, images: str | os.PathLike | None = None,
                 captions: str | os.PathLike | None = None, texts: Sequence[str | os.PathLike] | None = None,
                 kind: str | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                 max_bytes: float | None = None) -> dict:
    """Write ``{kind}-NNNNNN.tar`` shards from exactly one source and update ``manifest.json``.

    ``kind`` defaults to ``images``, ``pairs`` or ``texts`` after the source. A shard is closed
    after ``shard_size`` samples or once it holds ``max_bytes`` bytes (it can exceed that by one
    sample; webdataset counts the samples' payload bytes, not tar headers). Returns the kind's
    manifest entry.
    """
    sources = {"images": images, "pairs": captions, "texts": texts}
    given = [name for name, value in sources.items() if value]
    if len(given) != 1:
        raise ShardError(f"give exactly one of images=, captions=, texts= (got {given or 'none'})")
    content = given[0]
    kind = kind or content
    if not re.fullmatch(r"[A-Za-z0-9_]+", kind):
        raise ShardError(f"kind {kind!r} must be letters, digits or '_' (it prefixes the shard names)")
    if shard_size < 1 or (max_bytes is not None and max_bytes <= 0):
        raise ShardError(f"shard_size must be >= 1 and max_bytes > 0, got {shard_size}, {max_bytes}")
    items = _source_items(content, sources[content])
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_shards(out, kind)
    counts, skipped = _write_items(items, out, kind, shard_size, max_bytes)
    if not counts:
        raise ShardError(f"no {content} samples in {sources[content]} ({skipped} inputs skipped); nothing written")
    entry = {"content": content, "source": _source_name(sources[content], out), "shard_size": shard_size,
             "max_bytes": max_bytes, "skipped": skipped,
             "shards": [{"name": name, "samples": n, "bytes": (out / name).stat().st_size}
                        for name, n in sorted(counts.items())]}
    entry["num_samples"] = sum(s["samples"] for s in entry["shards"])
    entry["num_bytes"] = sum(s["bytes"] for s in entry["shards"])
    _update_manifest(out, kind, entry)
    return entry


def _source_items(content: str, source) -> Iterator[Item]:
    if content == "images":
        return image_folder_samples(source)
    if content == "pairs":
        return caption_samples(source)
    return text_samples([source] if isinstance(source, (str, os.PathLike)) else source)


def _write_items(items: Iterator[Item], out: Path, kind: str, shard_size: int,
                 max_bytes: float | None) -> tuple[Counter, int]:
    """Write the samples; returns ({shard file name: samples}, skipped inputs)."""
    counts, skipped, n = Counter(), 0, 0
    writer = wds.ShardWriter(str(out / f"{kind}-%06d.tar"), maxcount=shard_size,
                             maxsize=3e9 if max_bytes is None else max_bytes, verbose=0, mtime=TAR_MTIME)
    try:
        for fields, why in items:
            if fields is None:
                skipped += 1
                log.warning("skipped: %s", why)
                continue
            writer.write({"__key__": f"{n:09d}", **fields})
            counts[os.path.basename(writer.fname)] += 1
            n += 1
    finally:
        writer.close()
    if not counts:
        _remove_shards(out, kind)  # ShardWriter opens its first (here empty) shard up front
    return counts, skipped


def _remove_shards(out: Path, kind: str) -> None:
    for p in out.glob(f"{kind}-*.tar"):
        if re.fullmatch(rf"{re.escape(kind)}-\d{{6}}\.tar", p.name):
            p.unlink()


def _source_name(source, out: Path) -> str | list[str]:
    """The input path(s) relative to the shard folder: the manifest stays true when both move."""
    if isinstance(source, (str, os.PathLike)):
        return os.path.relpath(source, out)
    return [os.path.relpath(s, out) for s in source]


def read_manifest(folder: str | os.PathLike) -> dict:
    """The folder's manifest (``{"format", "kinds": {kind: entry}}``); an empty one when absent."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "kinds": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("kinds"), dict):
        raise ShardError(f"{path}: expected a shard manifest with a 'kinds' object")
    return manifest


def manifest_shards(folder: str | os.PathLike, kind: str) -> list[str] | None:
    """Paths of ``kind``'s shards listed in the folder's manifest, or None if it lists no such kind."""
    entry = read_manifest(folder)["kinds"].get(kind)
    if entry is None:
        return None
    return [os.path.join(folder, s["name"]) for s in entry["shards"]]


def _update_manifest(out: Path, kind: str, entry: dict) -> None:
    manifest = read_manifest(out)
    manifest["kinds"][kind] = entry
    manifest["kinds"] = dict(sorted(manifest["kinds"].items()))
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="beit3 data shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (searched recursively)")
    src.add_argument("--captions", help='JSON lines {"image": path, "caption": text}')
    src.add_argument("--texts", nargs="+", help="text files, one document a line")
    parser.add_argument("--output", required=True, help="folder for the shards and manifest.json")
    parser.add_argument("--kind", help="shard name prefix (default: images, pairs or texts after the source)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="max samples per shard")
    parser.add_argument("--max-bytes", type=float, default=None,
                        help="close a shard once its samples hold this many bytes (e.g. 1e9)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    start = time.perf_counter()
    try:
        entry = write_shards(args.output, images=args.images, captions=args.captions, texts=args.texts,
                             kind=args.kind, shard_size=args.shard_size, max_bytes=args.max_bytes)
    except ShardError as e:
        print(f"beit3 data shards: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.output}: {entry['num_samples']} {entry['content']} samples in {len(entry['shards'])} shards, "
          f"{entry['num_bytes'] / 1e6:.1f} MB, {entry['skipped']} inputs skipped, "
          f"{time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
