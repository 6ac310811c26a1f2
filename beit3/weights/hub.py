"""The official unilm/beit3 checkpoints by name: a registry, an explicit download, ``create_model``.

    import beit3
    beit3.list_models("*vqa*")                       # names with their task and image size
    model = beit3.create_model("beit3_base_patch16_224", pretrained=True)
    path = beit3.download("beit3_base_patch16_480_vqa")   # or: beit3 download NAME

Nothing is downloaded unless asked (``pretrained=True``, ``download``). Files land in
``$BEIT3_CACHE/checkpoints`` (default ``~/.cache/beit3``). A download goes to ``<file>.part``, is
resumed from there with an HTTP range request, shows a progress bar, and is renamed to its final
name only once it is known to be whole: the size the server announced (or, when it announced none,
a range request past the end), the sha256 where one is pinned, and the file's own format (a
``.pth`` is a zip whose central directory is complete, a ``.safetensors`` header's offsets cover
the file, a ``.spm`` loads). Every network read times out (``timeout``, default 60 s).

``BEIT3_MIRROR`` (or ``mirror=``) replaces the publisher's address for clusters without internet:
an http(s) base URL (``$BEIT3_MIRROR/<file name>``), a ``file://`` URL or a plain folder (holding
the files flat or in the publisher's layout). ``BEIT3_OFFLINE=1`` (``--offline``) never touches the
network: the cache or a mirror folder only, and an error naming what the cache lacks. A downloaded
file whose sha256 does not match is deleted and reported, never loaded; a file already in the cache
that does not match is reported and not loaded, but kept (the checksum given may be the mistake).
Where the registry has no checksum, the computed one is printed so that it can be pinned
(``sha256=`` or ``BEIT3_SHA256_<NAME>``).
"""
from __future__ import annotations

import fnmatch
import http.client
import os
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from typing import Optional

import sentencepiece as spm
from tqdm import tqdm

from beit3.core.errors import UserError, describe, first_line
from beit3.core.files import cache_root, sha256_of
from beit3.core.weight_files import file_format, safetensors_problem
from beit3.model import BEiT3
from beit3.model.config import BEiT3Config
from beit3.weights.official import from_official

OFFICIAL = "https://conversationhub.blob.core.windows.net/beit-share-public/beit3"
CHUNK = 1 << 20


class DownloadError(UserError, RuntimeError):
    """A download that failed, or a file that is not the one the registry names."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str  # under the publisher's address
    preset: str  # base | large
    img_size: int
    task: Optional[str]  # None: a pretrained backbone; else the fine-tuning task of its heads
    sha256: Optional[str] = None  # None: not pinned yet (the computed one is printed)
    note: str = ""

    @property
    def url(self) -> str:
        return f"{OFFICIAL}/{self.path}"

    @property
    def file_name(self) -> str:
        return os.path.basename(self.path)


def _registry() -> dict[str, ModelInfo]:
    rows = [  # name, folder, preset, image size, task, note (unilm/beit3 README)
        ("beit3_base_patch16_224", "pretraining", "base", 224, None, "276M"),
        ("beit3_large_patch16_224", "pretraining", "large", 224, None, "746M"),
        ("beit3_base_itc_patch16_224", "pretraining", "base", 224, None, "image-text contrastive tuned"),
        ("beit3_large_itc_patch16_224", "pretraining", "large", 224, None, "image-text contrastive tuned"),
        ("beit3_base_indomain_patch16_224", "pretraining", "base", 224, None, "+ COCO and VG"),
        ("beit3_large_indomain_patch16_224", "pretraining", "large", 224, None, "+ COCO and VG"),
        ("beit3_base_patch16_224_in1k", "in1k", "base", 224, "classification", "acc@1 85.4"),
        ("beit3_base_indomain_patch16_224_in1k", "in1k", "base", 224, "classification", "acc@1 85.4"),
        ("beit3_large_patch16_224_in1k", "in1k", "large", 224, "classification", "acc@1 87.6"),
        ("beit3_large_indomain_patch16_224_in1k", "in1k", "large", 224, "classification", "acc@1 87.5"),
        ("beit3_base_patch16_480_vqa", "vqa", "base", 480, "vqa", "test-dev 77.65"),
        ("beit3_base_indomain_patch16_480_vqa", "vqa", "base", 480, "vqa", "test-dev 78.46"),
        ("beit3_large_patch16_480_vqa", "vqa", "large", 480, "vqa", "test-dev 81.85"),
        ("beit3_large_indomain_patch16_480_vqa", "vqa", "large", 480, "vqa", "test-dev 82.53"),
        ("beit3_large_indomain_patch16_768_vgqaaug_vqa", "vqa", "large", 768, "vqa", "test-dev 82.97"),
        ("beit3_base_patch16_224_nlvr2", "nlvr2", "base", 224, "nlvr2", "test-P 84.4"),
        ("beit3_base_indomain_patch16_224_nlvr2", "nlvr2", "base", 224, "nlvr2", "test-P 85.3"),
        ("beit3_large_patch16_224_nlvr2", "nlvr2", "large", 224, "nlvr2", "test-P 89.4"),
        ("beit3_large_indomain_patch16_224_nlvr2", "nlvr2", "large", 224, "nlvr2", "test-P 90.0"),
        ("beit3_base_patch16_480_coco_captioning", "coco_captioning", "base", 480, "captioning", "CIDEr 133.6"),
        ("beit3_base_indomain_patch16_480_coco_captioning", "coco_captioning", "base", 480, "captioning",
         "CIDEr 135.0"),
        ("beit3_large_patch16_480_coco_captioning", "coco_captioning", "large", 480, "captioning", "CIDEr 143.2"),
        ("beit3_base_patch16_480_nocaps", "nocaps", "base", 480, "captioning", "val CIDEr 104.4"),
        ("beit3_base_indomain_patch16_480_nocaps", "nocaps", "base", 480, "captioning", "val CIDEr 105.6"),
        ("beit3_large_patch16_480_nocaps", "nocaps", "large", 480, "captioning", "val CIDEr 120.2"),
        ("beit3_base_patch16_384_coco_retrieval", "coco_retrieval", "base", 384, "retrieval", "IR@1 61.4"),
        ("beit3_large_patch16_384_coco_retrieval", "coco_retrieval", "large", 384, "retrieval", "IR@1 63.4"),
        ("beit3_base_patch16_384_f30k_retrieval", "f30k_retrieval", "base", 384, "retrieval", "IR@1 86.2"),
        ("beit3_large_patch16_384_f30k_retrieval", "f30k_retrieval", "large", 384, "retrieval", "IR@1 88.1"),
    ]
    out = {name: ModelInfo(name, f"{folder}/{name}.pth", preset, size, task, note=note)
           for name, folder, preset, size, task, note in rows}
    out["beit3.spm"] = ModelInfo("beit3.spm", "sentencepiece/beit3.spm", "", 0, "tokenizer",
                                 note="the SentencePiece model of every checkpoint (64,000 pieces)")
    return out


MODELS = _registry()


def tasks() -> list[str]:
    """The registry's tasks, "backbone" for the pretrained checkpoints."""
    return sorted({m.task or "backbone" for m in MODELS.values()})


def list_models(pattern: str = "*", task: Optional[str] = None) -> list[ModelInfo]:
    """The registry's entries whose name matches the glob ``pattern`` (and ``task``, "backbone" for
    pretrained ones; another task raises ``UserError`` naming the known ones)."""
    if task is not None and task not in tasks():
        raise UserError(f"unknown task {task!r}; the registry's tasks: {', '.join(tasks())}")
    return [m for m in MODELS.values() if fnmatch.fnmatch(m.name, pattern)
            and (task is None or (m.task or "backbone") == task)]


def info(name: str) -> ModelInfo:
    if name not in MODELS:
        close = [m for m in MODELS if name.replace("-", "_") in m or m in name]
        raise UserError(f"unknown model {name!r}; `beit3 list-models` lists them"
                        + (f" (did you mean {', '.join(close[:3])}?)" if close else ""))
    return MODELS[name]


def cache_dir() -> str:
    return os.path.join(cache_root(), "checkpoints")


def is_offline() -> bool:
    """``BEIT3_OFFLINE`` set to 1/true/yes/on: never use the network (as ``HF_HUB_OFFLINE``)."""
    return os.environ.get("BEIT3_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _mirror(mirror: Optional[str]) -> Optional[str]:
    return mirror if mirror is not None else os.environ.get("BEIT3_MIRROR") or None


def _source(m: ModelInfo, mirror: Optional[str]) -> tuple[str, bool]:
    """(where to read ``m`` from, whether that is a local file): the publisher's URL, or the mirror's
    ``<base>/<file name>``; a mirror is an http(s) URL, a ``file://`` URL or a plain folder."""
    base = _mirror(mirror)
    if base is None:
        return m.url, False
    scheme = urllib.parse.urlsplit(base).scheme.lower()
    if scheme in ("http", "https"):
        return f"{base.rstrip('/')}/{m.file_name}", False
    if scheme == "file":
        base = urllib.request.url2pathname(urllib.parse.urlsplit(base).path)
    elif len(scheme) > 1:  # not a Windows drive letter
        raise UserError(f"BEIT3_MIRROR {base}: a mirror is an http(s):// or file:// URL or a folder, "
                        f"not a {scheme}:// URL")
    if not os.path.isdir(base):
        raise DownloadError(f"BEIT3_MIRROR {describe(base)}: not a folder of checkpoint files")
    for rel in (m.file_name, m.path):  # flat, or the publisher's layout (folder/file)
        if os.path.isfile(os.path.join(base, rel)):
            return os.path.join(base, rel), True
    raise DownloadError(f"the mirror folder {base} has no {m.file_name}")


def _pinned(m: ModelInfo, sha256: Optional[str]) -> Optional[str]:
    return sha256 or os.environ.get(_sha_variable(m)) or m.sha256


def _sha_variable(m: ModelInfo) -> str:
    return f"BEIT3_SHA256_{m.name.upper().replace('.', '_')}"


def _where_else(m: ModelInfo, path: str) -> str:
    return (f"without network, copy {m.file_name} into the cache ({path}) or set BEIT3_MIRROR to a folder or "
            f"URL that holds it; BEIT3_OFFLINE=1 (--offline) never tries the network")


def download(name: str, mirror: Optional[str] = None, sha256: Optional[str] = None,
             progress: bool = True, timeout: float = 60.0, log=None, offline: Optional[bool] = None) -> str:
    """The local path of registry entry ``name``, downloaded into ``cache_dir()`` if not there yet.

    The bytes go to ``<file>.part`` (a later call resumes it) and are renamed only once complete: the
    size the server announced (or a range request past the end) matches, the pinned sha256 matches
    and the file's own format is whole (a zip's central directory, a safetensors header's offsets).
    ``offline`` (default ``BEIT3_OFFLINE``): use the cache (or a mirror folder) only. ``timeout``:
    seconds any network read may wait. Raises ``DownloadError`` saying what failed and what is kept."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    m = info(name)
    path = os.path.join(cache_dir(), m.file_name)
    expected = _pinned(m, sha256)
    offline = is_offline() if offline is None else offline
    cached = os.path.exists(path)
    if not cached:
        source, local = _source(m, mirror) if not offline or _mirror(mirror) else (m.url, False)
        if offline and not local:
            raise DownloadError(_offline_message(m, path))
        os.makedirs(cache_dir(), exist_ok=True)
        part = path + ".part"
        try:
            total = _copy(source, part) if local else _fetch_whole(source, part, progress, timeout)
        except _Unreachable as e:
            raise DownloadError(f"{e}; {_where_else(m, path)}") from None
        _check_part(m, part, total, expected)
        os.replace(part, path)
    actual = sha256_of(path)
    if expected and actual != expected.lower() and cached:  # perhaps a mistyped checksum: keep the file
        raise DownloadError(f"{describe(path)}: sha256 {actual} does not match the expected {expected}; not used, "
                            f"and kept in the cache: if the checksum is right, delete the file and download again")
    if expected and actual != expected.lower():
        os.remove(path)
        raise DownloadError(f"{m.file_name}: sha256 {actual} does not match the expected {expected}; "
                            f"the file was deleted (a corrupted or substituted download)")
    if not expected:
        log(f"{m.file_name}: sha256 {actual} (not pinned: pass sha256= or set {_sha_variable(m)} to check it "
            f"next time)")
    return path


def _offline_message(m: ModelInfo, path: str) -> str:
    part = path + ".part"
    partial = f" (only a partial {os.path.basename(part)} of {os.path.getsize(part):,} bytes)" \
        if os.path.isfile(part) else ""
    return (f"offline (BEIT3_OFFLINE / --offline): {m.file_name} is not in the cache {cache_dir()}{partial}; "
            f"copy it there as {path}, set BEIT3_MIRROR to a folder that holds it, or go online")


def _copy(source: str, part: str) -> int:
    """A mirror folder's file into ``part``; returns its size."""
    try:
        shutil.copyfile(source, part)
    except OSError as e:
        raise DownloadError(f"copying {source} to {part} failed: {e.strerror}") from None
    return os.path.getsize(source)


# -- downloads over HTTP -------------------------------------------------------------------------------
class _Unreachable(DownloadError):
    """No answer from the server (no network, refused, timed out before any byte)."""


def _open(url: str, start: int, timeout: float):
    """The response to a GET from byte ``start`` (a 416 answer is returned, not raised)."""
    req = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # nothing from ``start`` on
            return e
        raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or first_line(e) or type(e).__name__
        raise _Unreachable(f"download of {url} failed: {reason}") from None


def _announced(resp, start: int) -> Optional[int]:
    """The file's whole size as the response states it (Content-Range, else Content-Length)."""
    content_range = resp.headers.get("Content-Range") or ""
    total = content_range.rpartition("/")[2].strip()
    if total.isdigit():
        return int(total)
    length = resp.headers.get("Content-Length")
    if resp.status in (200, 206) and length is not None and length.strip().isdigit():
        return start + int(length) if resp.status == 206 else int(length)
    return None


def _fetch_whole(url: str, part: str, progress: bool, timeout: float) -> Optional[int]:
    """Download ``url`` into ``part`` (resuming it); returns the size the server announced or, when
    it announced none, confirmed with a range request past the end (None: it ignores ranges)."""
    for _ in range(8):  # each round resumes where the server last stopped
        total = _fetch(url, part, progress, timeout)
        if total is not None:
            return total
        have = os.path.getsize(part)
        with _open(url, have, timeout) as probe:
            if probe.status == 416:  # nothing past what we have
                return _announced(probe, have) or have
            if probe.status != 206:  # ranges ignored: no way to know the size
                return None
    return None


def _fetch(url: str, part: str, progress: bool, timeout: float) -> Optional[int]:
    """Append ``url``'s bytes to ``part``, from where a previous attempt stopped; returns the size
    the server announced (None: none), having checked that ``part`` has it."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    with _open(url, have, timeout) as resp:
        if resp.status == 416:  # the part file is already whole
            return _announced(resp, have) or have
        resumed = have and resp.status == 206
        if have and not resumed:  # the server ignored the range: start over
            have = 0
        total = _announced(resp, have)
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, disable=not progress,
                   desc=os.path.basename(part)[:-5])
        try:
            with open(part, "ab" if resumed else "wb") as f:
                # read1: what has arrived, so that bytes before a stall are kept (read waits for CHUNK)
                for chunk in iter(lambda: resp.read1(CHUNK), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:  # reset, cut short, or no byte for ``timeout`` s
            reason = getattr(e, "strerror", None) or first_line(e) or type(e).__name__
            raise DownloadError(f"download of {url} broke off after {os.path.getsize(part):,} bytes "
                                f"({reason}); run it again to resume") from None
        finally:
            bar.close()
    if total is not None and os.path.getsize(part) != total:
        raise DownloadError(f"download of {url} broke off at {os.path.getsize(part):,} of {total:,} bytes; "
                            f"run it again to resume")
    return total


# -- is the file whole? --------------------------------------------------------------------------------
def _check_part(m: ModelInfo, part: str, total: Optional[int], expected: Optional[str]) -> None:
    """Raise ``DownloadError`` unless ``part`` is complete: its announced size, its sha256 (the file
    is deleted when that differs), its format. A failed check leaves no file under the final name."""
    size = os.path.getsize(part)
    if total is not None and size != total:
        raise DownloadError(f"{part}: {size:,} of {total:,} bytes; run the download again to resume")
    if expected and sha256_of(part) != expected.lower():
        os.remove(part)
        raise DownloadError(f"{m.file_name}: sha256 of the download does not match the expected {expected}; "
                            f"the file was deleted (a corrupted or substituted download)")
    problem = format_problem(part, m.file_name)
    if problem is not None:
        length = "the server announced no length" if total is None else f"{total:,} bytes announced"
        raise DownloadError(f"{describe(part)}: incomplete or corrupted download of {m.file_name}: {problem} "
                            f"({length}); kept as .part: run the download again to resume it, or delete it "
                            f"to start over")


def format_problem(path: str, name: str) -> Optional[str]:
    """Why the file at ``path`` (named ``name``) is not a whole file of its kind, or None (also for
    kinds that cannot be checked: a legacy torch pickle)."""
    if name.endswith(".safetensors"):
        return safetensors_problem(path)
    if name.endswith(".spm") or name.endswith(".model"):
        try:
            spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            return f"not a SentencePiece model ({first_line(e)})"
        return None
    kind = file_format(path)
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as z:
                last = max((i.header_offset + i.compress_size for i in z.infolist()), default=0)
        except (zipfile.BadZipFile, OSError) as e:
            return f"not a complete zip archive ({first_line(e)})"
        return None if last <= os.path.getsize(path) else "its zip entries run past the end"
    if kind in ("legacy", "safetensors"):
        return None
    return "not a torch checkpoint" if kind != "empty" else "empty file"


def create_model(name: str, pretrained: bool = False, mirror: Optional[str] = None,
                 offline: Optional[bool] = None, **overrides):
    """A ``BEiT3`` backbone of registry entry ``name`` (released layout, its image size; keyword
    ``overrides`` go to the config, e.g. ``img_size=384``), with the official weights when
    ``pretrained`` (``download``'s ``mirror`` and ``offline``). A task checkpoint's heads are in
    ``load_official(download(name)).heads``."""
    m = info(name)
    if m.task == "tokenizer":
        raise UserError(f"{name} is the SentencePiece model, not a network: beit3.download({name!r})")
    cfg = BEiT3Config.from_preset(m.preset, layout="released", img_size=overrides.pop("img_size", m.img_size),
                                  **overrides)
    if not pretrained:
        return BEiT3(cfg)
    return from_official(download(name, mirror=mirror, offline=offline), cfg)
