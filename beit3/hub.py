"""The official unilm/beit3 checkpoints by name: a registry, an explicit download, ``create_model``.

    import beit3
    beit3.list_models("*vqa*")                       # names with their task and image size
    model = beit3.create_model("beit3_base_patch16_224", pretrained=True)
    path = beit3.download("beit3_base_patch16_480_vqa")   # or: beit3 download NAME

Nothing is downloaded unless asked (``pretrained=True``, ``download``). Files land in
``$BEIT3_CACHE/checkpoints`` (default ``~/.cache/beit3``). A download is resumed from a partial
``.part`` file with an HTTP range request and shows a progress bar. ``BEIT3_MIRROR`` (or
``mirror=``) replaces the publisher's address with a base URL of your own for clusters without
internet: ``$BEIT3_MIRROR/<file name>``. A file whose sha256 does not match the registry is
deleted and reported, never loaded. Where the registry has no checksum, the computed one is
printed so that it can be pinned (``sha256=`` or ``BEIT3_SHA256_<NAME>``).
"""
from __future__ import annotations

import fnmatch
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Optional

from .errors import UserError
from .files import sha256_of

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


def list_models(pattern: str = "*", task: Optional[str] = None) -> list[ModelInfo]:
    """The registry's entries whose name matches the glob ``pattern`` (and ``task``, "backbone" for
    pretrained ones)."""
    return [m for m in MODELS.values() if fnmatch.fnmatch(m.name, pattern)
            and (task is None or (m.task or "backbone") == task)]


def info(name: str) -> ModelInfo:
    if name not in MODELS:
        close = [m for m in MODELS if name.replace("-", "_") in m or m in name]
        raise UserError(f"unknown model {name!r}; `beit3 list-models` lists them"
                        + (f" (did you mean {', '.join(close[:3])}?)" if close else ""))
    return MODELS[name]


def cache_dir() -> str:
    from .files import cache_root
    return os.path.join(cache_root(), "checkpoints")


def _source_url(m: ModelInfo, mirror: Optional[str]) -> str:
    mirror = mirror if mirror is not None else os.environ.get("BEIT3_MIRROR")
    return f"{mirror.rstrip('/')}/{m.file_name}" if mirror else m.url


def _pinned(m: ModelInfo, sha256: Optional[str]) -> Optional[str]:
    return sha256 or os.environ.get(f"BEIT3_SHA256_{m.name.upper().replace('.', '_')}") or m.sha256


def download(name: str, mirror: Optional[str] = None, sha256: Optional[str] = None,
             progress: bool = True, timeout: float = 60.0, log=None) -> str:
    """The local path of registry entry ``name``, downloaded into ``cache_dir()`` if not there yet
    (resumed from a partial file). Raises ``DownloadError`` for a failed download or a checksum
    that does not match (the file is deleted)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    m = info(name)
    os.makedirs(cache_dir(), exist_ok=True)
    path = os.path.join(cache_dir(), m.file_name)
    expected = _pinned(m, sha256)
    if not os.path.exists(path):
        _fetch(_source_url(m, mirror), path + ".part", progress, timeout)
        os.replace(path + ".part", path)
    actual = sha256_of(path)
    if expected and actual != expected.lower():
        os.remove(path)
        raise DownloadError(f"{m.file_name}: sha256 {actual} does not match the expected {expected}; "
                            f"the file was deleted (a corrupted or substituted download)")
    if not expected:
        log(f"{m.file_name}: sha256 {actual} (not pinned: pass sha256= or set "
            f"BEIT3_SHA256_{m.name.upper().replace('.', '_')} to check it next time)")
    return path


def _fetch(url: str, part: str, progress: bool, timeout: float) -> None:
    """Append ``url``'s bytes to ``part``, from where a previous attempt stopped."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part file is already whole
            return
        raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"download of {url} failed: {getattr(e, 'reason', e)}") from None
    with resp:
        resumed = have and resp.status == 206
        if have and not resumed:  # the server ignored the range: start over
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        from tqdm import tqdm
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, disable=not progress,
                   desc=os.path.basename(part)[:-5])
        try:
            with open(part, "ab" if resumed else "wb") as f:
                for chunk in iter(lambda: resp.read(CHUNK), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
        except OSError as e:
            raise DownloadError(f"download of {url} broke off after {os.path.getsize(part)} bytes ({e}); "
                                f"run it again to resume") from None
        finally:
            bar.close()
    if total is not None and os.path.getsize(part) != total:
        raise DownloadError(f"download of {url} broke off at {os.path.getsize(part)} of {total} bytes; "
                            f"run it again to resume")


def create_model(name: str, pretrained: bool = False, mirror: Optional[str] = None, **overrides):
    """A ``BEiT3`` backbone of registry entry ``name`` (released layout, its image size; keyword
    ``overrides`` go to the config, e.g. ``img_size=384``), with the official weights when
    ``pretrained``. A task checkpoint's heads are in ``load_official(download(name)).heads``."""
    from .config import BEiT3Config
    from .model import BEiT3
    m = info(name)
    if m.task == "tokenizer":
        raise UserError(f"{name} is the SentencePiece model, not a network: beit3.download({name!r})")
    cfg = BEiT3Config.from_preset(m.preset, layout="released", img_size=overrides.pop("img_size", m.img_size),
                                  **overrides)
    if not pretrained:
        return BEiT3(cfg)
    from .weights.official import from_official
    return from_official(download(name, mirror=mirror), cfg)


def main(argv: Optional[list[str]] = None) -> int:
    """``beit3 list-models [PATTERN] [--task T]`` and ``beit3 download NAME [--mirror URL] [--sha256 H]``."""
    import argparse
    ap = argparse.ArgumentParser(prog="beit3 download")
    ap.add_argument("name")
    ap.add_argument("--mirror", default=None, help="base URL serving the files by name (default $BEIT3_MIRROR)")
    ap.add_argument("--sha256", default=None, help="the expected checksum")
    args = ap.parse_args(argv)
    try:
        print(download(args.name, args.mirror, args.sha256))
    except UserError as e:
        print(f"beit3 download: error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, DownloadError) else 1
    return 0


def list_main(argv: Optional[list[str]] = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="beit3 list-models")
    ap.add_argument("pattern", nargs="?", default="*")
    ap.add_argument("--task", default=None, help="backbone, classification, vqa, nlvr2, captioning, retrieval")
    args = ap.parse_args(argv)
    for m in list_models(args.pattern, args.task):
        print(f"{m.name:<48} {m.task or 'backbone':<14} {m.preset:<6} {m.img_size or '':>4}  {m.note}")
    return 0
