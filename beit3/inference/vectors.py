"""Saved embedding matrices: one ``.npy`` or ``.safetensors`` matrix and the files beside it.

    images.npy          (N, D) float32 or float16, one row per input, in input order
    images.ids.txt      the N ids, one a line, in the same order
    images.json         what made it: model, input, modality, dims, count, skipped, seconds, ...
    images.chunks/      while ``beit3 embed`` works: its finished chunks (removed once the matrix is written)

A ``.safetensors`` matrix holds one tensor, ``embeddings``. Every file is written beside its target
and renamed over it when complete (``files.atomic_file``). ``read_vectors`` checks that the ids file
has one id per row before anything is searched.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
import numpy as np
from safetensors.numpy import load_file, save_file

from beit3.core.errors import BadFileError, UserError, first_line
from beit3.core.files import atomic_file, read_json

SUFFIXES = (".npy", ".safetensors")
KEY = "embeddings"  # the tensor's name in a .safetensors matrix
DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class VectorFiles:
    """The paths of one saved matrix (``matrix``) and of the files beside it."""
    matrix: str

    @property
    def stem(self) -> str:
        return os.path.splitext(self.matrix)[0]

    @property
    def ids(self) -> str:
        return self.stem + ".ids.txt"

    @property
    def summary(self) -> str:
        return self.stem + ".json"

    @property
    def chunks(self) -> str:
        return self.stem + ".chunks"

    @property
    def format(self) -> str:
        return os.path.splitext(self.matrix)[1][1:]


def files_of(path: str, flag: str = "--output") -> VectorFiles:
    if not path.endswith(SUFFIXES):
        raise UserError(f"{flag} {path}: expected a .npy or .safetensors file name")
    return VectorFiles(path)


@dataclass
class Vectors:
    """A saved matrix (a read-only memory map for ``.npy``), its ids and its summary ({} if none)."""
    matrix: np.ndarray
    ids: list[str]
    files: VectorFiles
    summary: dict = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return int(self.matrix.shape[1])


def read_vectors(path: str, flag: str = "--index") -> Vectors:
    """The matrix at ``path`` with its ids; a missing, foreign or inconsistent file is one line."""
    files = files_of(path, flag)
    if not os.path.isfile(path):
        raise BadFileError(path, f"no such embedding matrix ({flag}; `beit3 embed` writes one)")
    matrix = _read_matrix(files)
    if matrix.ndim != 2 or matrix.dtype.kind != "f":
        raise BadFileError(path, f"expected a 2-d float matrix, got {matrix.dtype} of shape {tuple(matrix.shape)}")
    if not os.path.isfile(files.ids):
        raise BadFileError(files.ids, f"the ids of {path} are missing (one id a line)")
    with open(files.ids, encoding="utf-8") as f:
        ids = f.read().splitlines()
    if len(ids) != matrix.shape[0]:
        raise BadFileError(files.ids, f"has {len(ids):,} ids for the {matrix.shape[0]:,} rows of {path}")
    summary = read_json(files.summary) if os.path.isfile(files.summary) else {}
    return Vectors(matrix, ids, files, summary)


def _read_matrix(files: VectorFiles) -> np.ndarray:
    try:
        if files.format == "npy":
            return np.load(files.matrix, mmap_mode="r", allow_pickle=False)
        tensors = load_file(files.matrix)
    except Exception as e:  # noqa: BLE001 - numpy's and safetensors' many ways of saying "not mine"
        raise BadFileError(files.matrix, f"not a readable .{files.format} matrix ({first_line(e)})") from None
    if KEY not in tensors:
        raise BadFileError(files.matrix, f"has no {KEY!r} tensor (found {sorted(tensors)[:5]})")
    return tensors[KEY]


def write_matrix(files: VectorFiles, parts, rows: int, dims: int, dtype: str) -> None:
    """Write the ``parts`` ((n, dims) arrays, in order, ``rows`` in all) as one matrix. A ``.npy``
    is filled part by part through a memory map, so the whole never needs to be in memory."""
    kind = DTYPES[dtype]
    with atomic_file(files.matrix) as tmp:
        if files.format == "npy":
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=kind, shape=(rows, dims))
            at = 0
            for part in parts:
                out[at:at + len(part)] = part
                at += len(part)
            out.flush()
            del out
        else:
            whole = np.concatenate([np.asarray(p, dtype=kind) for p in parts] or [np.zeros((0, dims), kind)])
            save_file({KEY: whole.reshape(rows, dims)}, tmp)


def write_ids(files: VectorFiles, ids: list[str]) -> None:
    with atomic_file(files.ids) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(f"{i}\n" for i in ids)

