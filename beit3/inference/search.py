"""Nearest neighbours in a saved embedding matrix, and retrieval recall from two saved matrices.

``top_k`` is exact: cosine similarity as the dot product of l2-normalised float32 vectors, either
with torch (the matrix read ``block`` rows at a time, so a memory-mapped ``.npy`` larger than memory
can be searched) or with faiss's ``IndexFlatIP`` (exact inner product) when faiss is installed
(``pip install faiss-cpu``); ``backend="auto"`` takes faiss when it imports. Both give the same
neighbours (tests/test_embed.py). ``recall`` scores an image matrix and a text matrix against their
pairs (the retrieval index's captions and images) with the evaluation's own metric,
``beit3.metrics.retrieval.retrieval_recall``, so it equals what ``beit3 evaluate`` reports for
the same model.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from beit3.core.errors import BadFileError, UserError
from beit3.metrics.retrieval import retrieval_recall
from beit3.inference.vectors import Vectors

BACKENDS = ("auto", "torch", "faiss")
BLOCK = 65536  # matrix rows per matmul of the torch backend


def has_faiss() -> bool:
    try:
        import faiss  # noqa: F401  # optional: the faiss extra, which may be missing
    except ImportError:
        return False
    return True


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "faiss" and not has_faiss():
        raise UserError("--backend faiss: faiss is not installed (pip install faiss-cpu), or use --backend torch")
    return ("faiss" if has_faiss() else "torch") if backend == "auto" else backend


def top_k(matrix: np.ndarray, queries: torch.Tensor, k: int, backend: str = "auto",
          block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, rows), each (Q, min(k, N)), best first: the rows of ``matrix`` (N, D) most similar
    to each of ``queries`` (Q, D) by cosine similarity (both sides l2-normalised here)."""
    if matrix.ndim != 2 or queries.ndim != 2 or matrix.shape[1] != queries.shape[1]:
        raise UserError(f"queries of {queries.shape[-1]} dimensions cannot search a matrix of shape "
                        f"{tuple(matrix.shape)}: embed the queries with the model that made the matrix")
    k = min(k, matrix.shape[0])
    queries = F.normalize(queries.float().cpu(), dim=-1)
    if resolve_backend(backend) == "faiss":
        return _faiss_top_k(matrix, queries, k, block)
    return _torch_top_k(matrix, queries, k, block)


def _rows(matrix: np.ndarray, start: int, block: int) -> torch.Tensor:
    """Rows [start, start + block) as l2-normalised float32 (a float16 matrix is widened first)."""
    rows = np.array(matrix[start:start + block], dtype=np.float32)  # a copy: a memory map is read-only
    return F.normalize(torch.from_numpy(rows), dim=-1)


def _torch_top_k(matrix: np.ndarray, queries: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    best_s = torch.empty(queries.shape[0], 0)
    best_i = torch.empty(queries.shape[0], 0, dtype=torch.long)
    for start in range(0, matrix.shape[0], block):
        sims = queries @ _rows(matrix, start, block).T  # (Q, b)
        s, i = sims.topk(min(k, sims.shape[1]), dim=1)
        best_s, order = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
        best_i = torch.cat([best_i, i + start], 1).gather(1, order)
    return best_s, best_i


def _faiss_top_k(matrix: np.ndarray, queries: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    import faiss  # optional: the faiss extra; only this backend needs it
    index = faiss.IndexFlatIP(matrix.shape[1])
    for start in range(0, matrix.shape[0], block):
        index.add(np.ascontiguousarray(_rows(matrix, start, block).numpy()))
    scores, rows = index.search(np.ascontiguousarray(queries.numpy()), k)
    return torch.from_numpy(scores), torch.from_numpy(rows.astype(np.int64))


def neighbours(index: Vectors, queries: torch.Tensor, k: int, backend: str = "auto") -> list[list[dict]]:
    """For each query, its ``k`` nearest ids as ``{"rank", "id", "score"}`` (rank from 1)."""
    scores, rows = top_k(index.matrix, queries, k, backend)
    return [[{"rank": r + 1, "id": index.ids[i], "score": s} for r, (s, i) in enumerate(zip(srow, irow))]
            for srow, irow in zip(scores.tolist(), rows.tolist())]


# -- recall from saved matrices ------------------------------------------------------------------------
def read_pairs(path: str) -> list[tuple[str, str]]:
    """(image id, text id) per line of a JSON-lines file of ``{"image": ID, "text": ID}``."""
    if not os.path.isfile(path):
        raise BadFileError(path, "no such pairs file (--eval; JSON lines of {\"image\": ID, \"text\": ID})")
    pairs = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UserError(f"{path} line {n}: not JSON ({getattr(e, 'msg', e)})") from None
            if not isinstance(obj, dict) or not all(isinstance(obj.get(k), (str, int)) for k in ("image", "text")):
                raise UserError(f"{path} line {n}: expected {{\"image\": ID, \"text\": ID}}, got {raw[:80]!r}")
            pairs.append((str(obj["image"]), str(obj["text"])))
    if not pairs:
        raise UserError(f"{path}: no pairs")
    return pairs


def recall(images: Vectors, texts: Vectors, pairs: list[tuple[str, str]], ks=(1, 5, 10)) -> dict:
    """Recall@k both ways (``i2t_r{k}``, ``t2i_r{k}``, ``mean_recall``) of the saved matrices: each
    text's image is the one ``pairs`` gives it; every image needs a text and every text one image."""
    image_row = _row_of(images, "image")
    text_row = _row_of(texts, "text")
    image_of: dict[str, str] = {}
    for image, text in pairs:
        if image not in image_row or text not in text_row:
            which, key, where = ("image", image, images) if image not in image_row else ("text", text, texts)
            raise UserError(f"the pairs name {which} {key!r}, which {where.files.ids} does not list "
                            f"(skipped while embedding, or another input)")
        if image_of.setdefault(text, image) != image:
            raise UserError(f"the pairs give text {text!r} two images, {image_of[text]!r} and {image!r}")
    unpaired = [t for t in texts.ids if t not in image_of]
    if unpaired:
        raise UserError(f"{len(unpaired)} texts of {texts.files.ids} have no image in the pairs "
                        f"(first: {unpaired[0]!r})")
    text_to_image = torch.tensor([image_row[image_of[t]] for t in texts.ids], dtype=torch.long)
    orphans = sorted(set(range(len(images.ids))) - set(text_to_image.tolist()))
    if orphans:
        raise UserError(f"{len(orphans)} images of {images.files.ids} have no text in the pairs "
                        f"(first: {images.ids[orphans[0]]!r}): image-to-text recall needs one")
    out = retrieval_recall(_all_rows(images), _all_rows(texts), text_to_image, ks)
    return {**out, "images": len(images.ids), "texts": len(texts.ids)}


def _row_of(v: Vectors, what: str) -> dict[str, int]:
    rows: dict[str, int] = {}
    for r, key in enumerate(v.ids):
        if rows.setdefault(key, r) != r:
            raise BadFileError(v.files.ids, f"lists {what} id {key!r} twice (lines {rows[key] + 1} and {r + 1})")
    return rows


def _all_rows(v: Vectors) -> torch.Tensor:
    return _rows(v.matrix, 0, v.matrix.shape[0])


def check_dims(index: Vectors, dims: int, model: Optional[str] = None) -> None:
    if index.dims != dims:
        raise UserError(f"{index.files.matrix} holds {index.dims}-dimensional vectors, the model "
                        f"{model or ''} gives {dims}: search with the model that embedded it")
