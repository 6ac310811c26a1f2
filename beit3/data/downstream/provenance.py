"""Which SentencePiece model wrote each index file: recorded by the builders, checked by the readers.

Index files hold token ids (``text_segment``), which mean the words of one SentencePiece model
only: fine-tuning them with another ``--spm`` would train on ids that stand for other words and
save the other model as the run's tokenizer. The builders record, in ``index_manifest.json``
beside the files, each index file's size and the digest (``spm_digest``) and path of the model
that tokenized it; ``check_index_tokenizer`` refuses a reader's tokenizer with another digest,
naming both files. An index file without a record (unilm's own, or one written before records
existed) loads as before, and so does one whose size differs from its record: it was replaced by
a file this manifest knows nothing about.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from beit3.data.text_tokenizer import TextTokenizer, check_same_tokenizer
from beit3.core.files import atomic_file, read_json

INDEX_MANIFEST = "index_manifest.json"
MANIFEST_FORMAT = 1


def _manifest(folder: Path) -> dict:
    path = folder / INDEX_MANIFEST
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "files": {}}
    manifest = read_json(path)
    if not isinstance(manifest.get("files"), dict):
        manifest["files"] = {}
    return manifest


def record_tokenizer(index_path: str | os.PathLike, tokenizer: TextTokenizer | None) -> None:
    """Record that ``tokenizer`` wrote the (complete) index file; None: it holds no token ids, and
    a record of an earlier version of the file is dropped."""
    path = Path(index_path)
    manifest = _manifest(path.parent)
    if tokenizer is None and path.name not in manifest["files"]:
        return
    if tokenizer is None:
        del manifest["files"][path.name]
    else:
        manifest["files"][path.name] = {"text_tokenizer_sha256": tokenizer.digest,
                                         "spm": os.path.abspath(tokenizer.model_file),
                                         "bytes": path.stat().st_size}
    manifest["files"] = dict(sorted(manifest["files"].items()))
    with atomic_file(path.parent / INDEX_MANIFEST) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=1) + "\n")


def recorded_tokenizer(index_path: str | os.PathLike) -> dict | None:
    """``{"text_tokenizer_sha256", "spm", "bytes"}`` of the index file, or None when unknown."""
    path = Path(index_path)
    record = _manifest(path.parent)["files"].get(path.name)
    if not isinstance(record, dict) or not isinstance(record.get("text_tokenizer_sha256"), str):
        return None
    if not path.is_file() or path.stat().st_size != record.get("bytes"):
        return None
    return record


def check_index_tokenizer(index_paths: Sequence[str | os.PathLike], tokenizer: TextTokenizer) -> None:
    """Raise ``TokenizerMismatchError`` if an index file was tokenized by another model."""
    for path in index_paths:
        record = recorded_tokenizer(path)
        if record is not None:
            check_same_tokenizer(record["text_tokenizer_sha256"], record.get("spm", "?"),
                                 f"{path} was tokenized", tokenizer,
                                 fix="give that model as --spm, or rebuild the index files with "
                                     "beit3 data downstream --spm (this one)")
