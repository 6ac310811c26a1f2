"""Webdataset tar shards for pretraining, and their ``manifest.json``.

    beit3 data shards --images DIR --output shards/              -> images-000000.tar ...
    beit3 data shards --captions pairs.jsonl --output shards/    -> pairs-000000.tar ...
    beit3 data shards --texts a.txt b.txt --output shards/       -> texts-000000.tar ...

Samples are ``{"__key__": "000000042", "jpg"|"png"|"webp": <the file's bytes>, "txt": <UTF-8>}``:
images keep their encoded bytes (the member's extension is their sniffed format, not the file
name's). Captions come as JSON lines ``{"image": path, "caption": text}``, COCO captions JSON,
Karpathy-split JSON, or CSV/TSV/parquet tables with an image path/URL column and a caption column
(img2dataset's inputs; see ``caption_samples``); text files hold one document a line.

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

from ..flags import SettingError, add_flag, check_args

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


def caption_samples(source: str | os.PathLike, image_root: str | os.PathLike | None = None,
                    url_col: str | None = None, caption_col: str | None = None,
                    split: Sequence[str] | None = None) -> Iterator[Item]:
    """Image-text pairs from a captions file, by its format:

    - ``.jsonl``: ``{"image": path, "caption": text}`` a line;
    - ``.json``: COCO captions (``images`` with ``file_name`` + ``annotations`` with ``image_id``,
      ``caption``), the Karpathy split (``images`` with ``filepath``/``filename``, ``sentences``
      and ``split``; ``split`` keeps some splits), or a list of ``{"image", "caption"}``;
    - ``.csv`` / ``.tsv`` / ``.parquet``: img2dataset's input tables, an image path or URL column
      (``url_col``, default the first of url, image, image_path, filepath, file_name) and a caption
      column (``caption_col``, default caption or text).

    Image paths are relative to ``image_root`` (default: the captions file's folder); http(s)
    URLs are downloaded (a failed download is skipped and counted)."""
    path = Path(source)
    if not path.is_file():
        raise ShardError(f"--captions {source}: no such file")
    root = Path(image_root) if image_root is not None else path.parent
    if image_root is not None and not root.is_dir():
        raise ShardError(f"--image-root {image_root}: no such directory")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif suffix == ".json":
        rows = _json_rows(path, split)
    elif suffix in (".csv", ".tsv", ".parquet"):
        rows = _table_rows(path, url_col, caption_col)
    else:
        raise ShardError(f"--captions {source}: unknown format {suffix!r} (.jsonl, .json, .csv, .tsv, .parquet)")
    return _pair_items(rows, root)


Row = tuple[str, "str | None", "str | None"]  # (where, image path or URL, caption); None: bad row


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                entry = json.loads(raw)
                yield where, entry["image"], entry["caption"]
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as e:
                yield where, None, f"expected a JSON object with 'image' and 'caption' ({e!r})"


def _json_rows(path: Path, split: Sequence[str] | None) -> Iterator[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"--captions {path}: not valid JSON: {e}") from e
    if isinstance(data, dict) and "annotations" in data and "images" in data:  # COCO captions
        files = {im["id"]: im["file_name"] for im in data["images"]}
        for i, ann in enumerate(data["annotations"]):
            image = files.get(ann.get("image_id"))
            yield (f"{path}: annotation {i}", image, ann.get("caption")) if image else \
                (f"{path}: annotation {i}", None, f"image_id {ann.get('image_id')!r} not among the images")
    elif isinstance(data, dict) and isinstance(data.get("images"), list):  # Karpathy split
        for im in data["images"]:
            if split and im.get("split") not in split:
                continue
            image = os.path.join(im.get("filepath", ""), im["filename"])
            for sent in im.get("sentences", []):
                yield f"{path}: {image}", image, sent.get("raw")
    elif isinstance(data, list):
        for i, entry in enumerate(data):
            ok = isinstance(entry, dict) and "image" in entry
            yield (f"{path}[{i}]", entry["image"], entry.get("caption")) if ok else \
                (f"{path}[{i}]", None, "expected an object with 'image' and 'caption'")
    else:
        raise ShardError(f"--captions {path}: neither COCO captions, a Karpathy split nor a list of "
                         "{image, caption} objects")


IMAGE_COLUMNS = ("url", "image", "image_path", "filepath", "file_name")
CAPTION_COLUMNS = ("caption", "text")


def _table_rows(path: Path, url_col: str | None, caption_col: str | None) -> Iterator[Row]:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        columns, rows = table.column_names, (dict(zip(table.column_names, r)) for r in
                                             zip(*(table.column(c).to_pylist() for c in table.column_names)))
    else:
        import csv
        f = open(path, newline="", encoding="utf-8")
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        columns, rows = reader.fieldnames or [], reader
    image_col = url_col or next((c for c in IMAGE_COLUMNS if c in columns), None)
    text_col = caption_col or next((c for c in CAPTION_COLUMNS if c in columns), None)
    for name, col in (("image", image_col), ("caption", text_col)):
        if col is None or col not in columns:
            raise ShardError(f"--captions {path}: no {name} column ({col or 'none of the usual names'}; "
                             f"columns: {columns}); name it with --{'url' if name == 'image' else 'caption'}-col")
    for i, row in enumerate(rows, 2 if path.suffix.lower() != ".parquet" else 0):
        yield f"{path}:{i}", row[image_col], row[text_col]


def _pair_items(rows: Iterator[Row], root: Path) -> Iterator[Item]:
    for where, image, caption in rows:
        if image is None:
            yield None, f"{where}: {caption}"
            continue
        if not isinstance(caption, str) or not caption.strip():
            yield None, f"{where}: empty caption"
            continue
        fields, why = _url_fields(image) if re.match(r"https?://", str(image)) else _image_fields(root / image)
        if fields is None:
            yield None, f"{where}: {why}"
            continue
        yield {**fields, "txt": caption.strip()}, None


def _url_fields(url: str, retries: int = 2) -> tuple[dict | None, str | None]:
    import urllib.request
    error = None
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(url, timeout=20) as r:
                data = r.read()
            break
        except OSError as e:
            error = e
            time.sleep(0.5 * 2 ** attempt if attempt < retries else 0)
    else:
        return None, f"cannot download {url}: {error}"
    fmt = sniff_image_format(data)
    if fmt is None:
        return None, f"{url} is not a JPEG, PNG or WebP image (first bytes {data[:8]!r})"
    return {fmt: data}, None


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
                 max_bytes: float | None = None, caption_options: dict | None = None) -> dict:
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
    items = _source_items(content, sources[content], caption_options or {})
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


def _source_items(content: str, source, caption_options: dict) -> Iterator[Item]:
    if content == "images":
        return image_folder_samples(source)
    if content == "pairs":
        return caption_samples(source, **caption_options)
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
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beit3 data shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (searched recursively)")
    src.add_argument("--captions", help='captions with image paths or URLs: JSON lines {"image", "caption"}, '
                                        "COCO captions or Karpathy-split JSON, CSV/TSV or parquet")
    src.add_argument("--texts", nargs="+", help="text files, one document a line")
    parser.add_argument("--image-root", help="--captions: folder the image paths are relative to "
                                             "(default: the captions file's)")
    parser.add_argument("--url-col", help="--captions table: the image path or URL column")
    parser.add_argument("--caption-col", help="--captions table: the caption column")
    parser.add_argument("--split", nargs="+", help="--captions Karpathy JSON: keep these splits (e.g. train restval)")
    parser.add_argument("--output", required=True, help="folder for the shards and manifest.json")
    parser.add_argument("--kind", help="shard name prefix (default: images, pairs or texts after the source)")
    add_flag(parser, "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="max samples per shard", ge=1)
    add_flag(parser, "--max-bytes", type=float, default=None,
             help="close a shard once its samples hold this many bytes (e.g. 1e9)", gt=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    start = time.perf_counter()
    from ..errors import OutputError
    from ..files import check_output_dir
    try:
        check_args(parser, args)
        check_output_dir(args.output)
    except (OutputError, SettingError) as e:
        print(f"beit3 data shards: error: {e}", file=sys.stderr)
        return 2
    try:
        options = {"image_root": args.image_root, "url_col": args.url_col, "caption_col": args.caption_col,
                   "split": args.split}
        entry = write_shards(args.output, images=args.images, captions=args.captions, texts=args.texts,
                             kind=args.kind, shard_size=args.shard_size, max_bytes=args.max_bytes,
                             caption_options={k: v for k, v in options.items() if v is not None})
    except ShardError as e:
        print(f"beit3 data shards: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.output}: {entry['num_samples']} {entry['content']} samples in {len(entry['shards'])} shards, "
          f"{entry['num_bytes'] / 1e6:.1f} MB, {entry['skipped']} inputs skipped, "
          f"{time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
