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
lines, image URLs that fail or miss their download deadline) are skipped with a warning and
counted; no samples at all is an error. A source that cannot be used as a whole (an empty folder or
file, a captions file that is not valid JSON or UTF-8, a table without its columns, a JSON entry
without its image name) is a ``ShardError`` naming the file, raised before anything is written.

``manifest.json`` in the output folder lists, per kind, the source (relative to the folder), the
shards with their sample counts and byte sizes, the totals and the skipped inputs; writing a kind
replaces that kind's shards and entry only, so the images, texts and pairs of one dataset share
one folder and one manifest. The new shards are written into a hidden folder beside the old ones
and moved in, with the manifest, once complete: an error or an interrupt leaves the old set.
"""
from __future__ import annotations

import codecs
import csv
import http.client
import json
import logging
import os
import re
import shutil
import socket
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import webdataset as wds

from beit3.core.errors import describe, first_line
from beit3.core.files import remove_stale_temps
from beit3.data.remote import ReadTimeout, Timeouts, download

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
KINDS = ("images", "texts", "pairs")  # what the pretraining loader mixes
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_SHARD_SIZE = 1000
TAR_MTIME = 0  # fixed member time: identical shards from identical inputs (an int: a float needs a pax header)
DOWNLOAD_TIMEOUT = 30.0  # seconds for one image URL of a captions table, retries not counted
DOWNLOAD_CONNECT_TIMEOUT = 10.0  # seconds to connect, and the longest wait for any byte
DOWNLOAD_RETRIES = 2


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
# Each source checks what it can before anything is written (paths, formats, columns, the
# structure of a JSON file) and raises ShardError; then it yields ``(fields, None)`` for a sample
# or ``(None, reason)`` for a skipped input.
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
    if not files:
        raise ShardError(f"--images {folder}: no {'/'.join(IMAGE_SUFFIXES)} files in it (searched recursively)")
    return (_image_fields(path) for path in files)


def caption_samples(source: str | os.PathLike, image_root: str | os.PathLike | None = None,
                    url_col: str | None = None, caption_col: str | None = None,
                    split: Sequence[str] | None = None, download_timeout: float = DOWNLOAD_TIMEOUT,
                    download_retries: int = DOWNLOAD_RETRIES) -> Iterator[Item]:
    """Image-text pairs from a captions file, by its format:

    - ``.jsonl``: ``{"image": path, "caption": text}`` a line;
    - ``.json``: COCO captions (``images`` with ``id`` and ``file_name`` + ``annotations`` with
      ``image_id``, ``caption``), the Karpathy split (``images`` with ``filepath``/``filename``,
      ``sentences`` and ``split``; ``split`` keeps some splits), or a list of ``{"image", "caption"}``;
    - ``.csv`` / ``.tsv`` / ``.parquet``: img2dataset's input tables, an image path or URL column
      (``url_col``, default the first of url, image, image_path, filepath, file_name) and a caption
      column (``caption_col``, default caption or text).

    Image paths are relative to ``image_root`` (default: the captions file's folder); http(s)
    URLs are downloaded, each within ``download_timeout`` seconds (a failed download is retried
    ``download_retries`` times, then skipped and counted; one that timed out is not retried)."""
    path = Path(source)
    if not path.is_file():
        raise ShardError(f"--captions {source}: no such file")
    if path.stat().st_size == 0:
        raise ShardError(f"--captions {describe(path)}: an empty file")
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
    timeouts = Timeouts(connect=min(DOWNLOAD_CONNECT_TIMEOUT, download_timeout),
                        read=min(DOWNLOAD_CONNECT_TIMEOUT, download_timeout), total=download_timeout)
    return _pair_items(rows, root, timeouts, download_retries)


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
    except json.JSONDecodeError as e:
        raise ShardError(f"--captions {describe(path)}: not valid JSON ({e.msg} at line {e.lineno}, "
                         f"column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ShardError(f"--captions {path}: not UTF-8 text (byte {e.start})") from None
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        return _coco_rows(path, data)
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        return _karpathy_rows(path, data["images"], split)
    if isinstance(data, list):
        return _list_rows(path, data)
    raise ShardError(f"--captions {path}: neither COCO captions, a Karpathy split nor a list of "
                     "{image, caption} objects")


def _entry_problem(path: Path, where: str, entry, keys: Sequence[str]) -> None:
    if not isinstance(entry, dict):
        raise ShardError(f"--captions {path}: {where} is a {type(entry).__name__}, not an object")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ShardError(f"--captions {path}: {where} has no {', '.join(repr(k) for k in missing)} "
                         f"(keys: {sorted(entry)[:8]})")


def _coco_rows(path: Path, data: dict) -> Iterator[Row]:
    if not isinstance(data["images"], list) or not isinstance(data["annotations"], list):
        raise ShardError(f"--captions {path}: COCO 'images' and 'annotations' must be lists")
    for i, im in enumerate(data["images"]):
        _entry_problem(path, f"images[{i}]", im, ("id", "file_name"))
    for i, ann in enumerate(data["annotations"]):
        _entry_problem(path, f"annotations[{i}]", ann, ("image_id",))
    files = {im["id"]: im["file_name"] for im in data["images"]}
    return ((f"{path}: annotation {i}", files[ann["image_id"]], ann.get("caption")) if ann["image_id"] in files
            else (f"{path}: annotation {i}", None, f"image_id {ann['image_id']!r} not among the images")
            for i, ann in enumerate(data["annotations"]))


def _karpathy_rows(path: Path, images: list, split: Sequence[str] | None) -> Iterator[Row]:
    for i, im in enumerate(images):
        _entry_problem(path, f"images[{i}]", im, ("filename",))
        if not isinstance(im.get("sentences", []), list):
            raise ShardError(f"--captions {path}: images[{i}]['sentences'] is not a list")
    chosen = [im for im in images if not split or im.get("split") in split]
    return ((f"{path}: {image}", image, sent.get("raw") if isinstance(sent, dict) else None)
            for im in chosen for image in [os.path.join(im.get("filepath", ""), im["filename"])]
            for sent in im.get("sentences", []))


def _list_rows(path: Path, data: list) -> Iterator[Row]:
    for i, entry in enumerate(data):
        ok = isinstance(entry, dict) and "image" in entry
        yield (f"{path}[{i}]", entry["image"], entry.get("caption")) if ok else \
            (f"{path}[{i}]", None, "expected an object with 'image' and 'caption'")


IMAGE_COLUMNS = ("url", "image", "image_path", "filepath", "file_name")
CAPTION_COLUMNS = ("caption", "text")


def _table_rows(path: Path, url_col: str | None, caption_col: str | None) -> Iterator[Row]:
    if path.suffix.lower() == ".parquet":
        columns, rows = _parquet_table(path)
    else:
        columns, rows = _csv_table(path)
    image_col = url_col or next((c for c in IMAGE_COLUMNS if c in columns), None)
    text_col = caption_col or next((c for c in CAPTION_COLUMNS if c in columns), None)
    for name, col in (("image", image_col), ("caption", text_col)):
        if col is None or col not in columns:
            raise ShardError(f"--captions {path}: no {name} column ({col or 'none of the usual names'}; "
                             f"columns: {columns}); name it with --{'url' if name == 'image' else 'caption'}-col")
    return ((where, row[image_col], row[text_col]) if row.get(image_col) else (where, None, f"no {image_col!r} value")
            for where, row in rows)


def _parquet_table(path: Path) -> tuple[list[str], Iterator[tuple[str, dict]]]:
    import pyarrow  # optional: not a dependency of beit3; only parquet captions need it
    import pyarrow.parquet as pq  # optional: not a dependency of beit3; only parquet captions need it
    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise ShardError(f"--captions {describe(path)}: not a readable parquet file ({first_line(e)})") from None
    columns = table.column_names
    values = zip(*(table.column(c).to_pylist() for c in columns))
    return columns, ((f"{path}: row {i}", dict(zip(columns, r))) for i, r in enumerate(values))


def _csv_table(path: Path) -> tuple[list[str], Iterator[tuple[str, dict]]]:
    _check_utf8(path)
    f = open(path, newline="", encoding="utf-8")
    reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    try:
        columns = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as e:
        f.close()
        raise ShardError(f"--captions {path}: unreadable header ({e})") from None
    return list(columns), _csv_rows(path, f, reader)


def _check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """A table in another encoding is refused before any row is used, naming the first bad line."""
    decoder, offset, lines = codecs.getincrementaldecoder("utf-8")(), 0, 1
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                bad = max(0, e.start - len(e.object) + len(block))  # the error's position in this block
                line = lines + block[:bad].count(b"\n")
                raise ShardError(f"--captions {path}: line {line} is not UTF-8 text (byte {block[bad:bad + 1]!r} at "
                                 f"offset {offset + bad}); convert the file to UTF-8") from None
            offset, lines = offset + len(block), lines + block.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ShardError(f"--captions {path}: ends inside a UTF-8 character (a truncated file?)") from None


def _csv_rows(path: Path, f, reader: csv.DictReader) -> Iterator[tuple[str, dict]]:
    with f:
        try:
            for row in reader:
                yield f"{path}:{reader.line_num}", row
        except (UnicodeDecodeError, csv.Error) as e:  # a file problem, not a row's: refuse the file
            raise ShardError(f"--captions {path}: after line {reader.line_num}: not valid CSV ({e})") from None


def _pair_items(rows: Iterator[Row], root: Path, timeouts: Timeouts, retries: int) -> Iterator[Item]:
    for where, image, caption in rows:
        if image is None:
            yield None, f"{where}: {caption}"
            continue
        if not isinstance(caption, str) or not caption.strip():
            yield None, f"{where}: empty caption"
            continue
        if re.match(r"https?://", str(image)):
            fields, why = _url_fields(str(image), timeouts, retries)
        else:
            fields, why = _image_fields(root / str(image))
        if fields is None:
            yield None, f"{where}: {why}"
            continue
        yield {**fields, "txt": caption.strip()}, None


def _url_fields(url: str, timeouts: Timeouts, retries: int = DOWNLOAD_RETRIES) -> tuple[dict | None, str | None]:
    error = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(0.5 * 2 ** (attempt - 1))
        try:
            data = download(url, timeouts)
            break
        except ReadTimeout as e:  # a stalled or trickling server: another try would take as long
            return None, f"cannot download {url}: {e}"
        except (OSError, http.client.HTTPException, ValueError) as e:
            error = e
    else:
        return None, f"cannot download {url}: {error}"
    fmt = sniff_image_format(data)
    if fmt is None:
        return None, f"{url} is not a JPEG, PNG or WebP image (first bytes {data[:8]!r})"
    return {fmt: data}, None


def text_samples(files: Sequence[str | os.PathLike]) -> Iterator[Item]:
    """One sample per non-blank line of each file; non-UTF-8 lines are skipped."""
    if not files:
        raise ShardError("--texts: no files given")
    for name in files:
        if not Path(name).is_file():
            raise ShardError(f"--texts {name}: no such file")
        if Path(name).stat().st_size == 0:
            raise ShardError(f"--texts {describe(name)}: an empty file")
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
    sample; webdataset counts the samples' payload bytes, not tar headers). The new shards are
    written into a hidden folder beside the old ones and replace them (and the kind's manifest
    entry) only once complete: a bad input leaves the folder as it was. Returns the kind's
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
    read_manifest(out)  # a damaged manifest stops us before the work, not after it
    staging = _staging_dir(out, kind)
    try:
        counts, skipped = _write_items(items, staging, kind, shard_size, max_bytes)
        if not counts:
            raise ShardError(f"no {content} samples in {sources[content]} ({skipped} inputs skipped); "
                             f"nothing written")
        entry = {"content": content, "source": _source_name(sources[content], out), "shard_size": shard_size,
                 "max_bytes": max_bytes, "skipped": skipped,
                 "shards": [{"name": name, "samples": n, "bytes": (staging / name).stat().st_size}
                            for name, n in sorted(counts.items())]}
        entry["num_samples"] = sum(s["samples"] for s in entry["shards"])
        entry["num_bytes"] = sum(s["bytes"] for s in entry["shards"])
        _swap_in(out, staging, kind, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry


def _source_items(content: str, source, caption_options: dict) -> Iterator[Item]:
    if content == "images":
        return image_folder_samples(source)
    if content == "pairs":
        return caption_samples(source, **caption_options)
    return text_samples([source] if isinstance(source, (str, os.PathLike)) else source)


def _staging_dir(out: Path, kind: str) -> Path:
    """``out/.{kind}-shards.tmp-<host>-<pid>``: the temporary naming of ``beit3.core.files``, so that the
    next writer removes what a killed one left."""
    remove_stale_temps(out / f"{kind}-shards")
    staging = out / f".{kind}-shards.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


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
    return counts, skipped


def _kind_shards(folder: Path, kind: str) -> list[Path]:
    return sorted(p for p in folder.glob(f"{kind}-*.tar") if re.fullmatch(rf"{re.escape(kind)}-\d{{6}}\.tar", p.name))


def _swap_in(out: Path, staging: Path, kind: str, entry: dict) -> None:
    """Replace ``kind``'s shards in ``out`` by the complete set in ``staging``, then the manifest:
    renames within one folder, the old set moved aside first and put back if a rename fails."""
    manifest = read_manifest(out)
    manifest["kinds"][kind] = entry
    manifest["kinds"] = dict(sorted(manifest["kinds"].items()))
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    old = staging / "previous"
    old.mkdir()
    new = _kind_shards(staging, kind)
    moved_old, moved_new = [], []
    try:
        for p in _kind_shards(out, kind):
            os.replace(p, old / p.name)
            moved_old.append(p.name)
        for p in new:
            os.replace(p, out / p.name)
            moved_new.append(p.name)
        os.replace(staging / MANIFEST, out / MANIFEST)
    except BaseException:
        for name in moved_new:
            os.replace(out / name, staging / name)
        for name in moved_old:
            os.replace(old / name, out / name)
        raise


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
        raise ShardError(f"{describe(path)}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("kinds"), dict):
        raise ShardError(f"{path}: expected a shard manifest with a 'kinds' object")
    for kind, entry in manifest["kinds"].items():
        problem = _entry_problems(entry)
        if problem:
            raise ShardError(f"{path}: kinds.{kind}{problem}; rewrite it with beit3 data shards")
    return manifest


def _entry_problems(entry) -> str | None:
    """What makes a manifest entry unusable (``.shards[3] has no 'name'``), or None."""
    if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
        return " is not an object with a 'shards' list"
    for i, shard in enumerate(entry["shards"]):
        if not isinstance(shard, dict):
            return f".shards[{i}] is not an object"
        name, samples = shard.get("name"), shard.get("samples")
        if not isinstance(name, str) or not name or os.path.basename(name) != name:
            return f".shards[{i}] has no 'name' (a file name in the folder)" if name is None else \
                f".shards[{i}] has 'name' {name!r}, not a file name in the folder"
        if not (isinstance(samples, int) and samples >= 0):
            return f".shards[{i}] ({name}) has 'samples' {samples!r}, not a count"
    return None


def manifest_shards(folder: str | os.PathLike, kind: str) -> list[str] | None:
    """Paths of ``kind``'s shards listed in the folder's manifest, or None if it lists no such kind."""
    entry = read_manifest(folder)["kinds"].get(kind)
    if entry is None:
        return None
    return [os.path.join(folder, s["name"]) for s in entry["shards"]]
