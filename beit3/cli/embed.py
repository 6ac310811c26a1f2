"""``beit3 embed`` and ``beit3 search``: feature vectors of many images or texts, and their nearest neighbours.

    beit3 embed MODEL --input photos/ --output runs/emb/images.npy
    beit3 embed MODEL --input captions.txt --output runs/emb/texts.npy --dtype float16
    beit3 embed MODEL --input 'shards/{00000..00099}.tar' --output images.safetensors --batch-size 256
    torchrun --nproc-per-node 8 -m beit3.cli embed MODEL --input ... --output ...
    beit3 search MODEL --index runs/emb/images.npy --text "a red circle" --top-k 5
    beit3 search MODEL --index runs/emb/texts.npy --image cat.jpg
    beit3 search MODEL --index runs/emb/images.npy --queries queries.txt
    beit3 search --eval pairs.jsonl --images runs/emb/images.npy --texts runs/emb/texts.npy

``embed``: see ``beit3.jobs.embed`` (chunks, resume, ranks) and ``beit3.data.embed_inputs`` (the
inputs and their ids). ``search`` prints one JSON line per neighbour, ``{"query", "rank", "id",
"score"}`` (cosine similarity), best first; MODEL defaults to the one the index's summary names.
``--queries``: a .txt (one text a line) or a JSON-lines file of ``{"text": ...}`` or ``{"image":
path}``, each with an optional ``"id"``. ``--eval``: recall@1/5/10 both ways of an image matrix
and a text matrix, given their pairs as JSON lines ``{"image": ID, "text": ID}``, printed as one
JSON line. A bad input is one line and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import torch

from beit3.data.embed_inputs import open_inputs
from beit3.inference.embed import embed_images, embed_texts, load_retrieval
from beit3.jobs.embed import EmbedConfig, IncompleteError, run
from beit3.core.errors import UserError, report
from beit3.core.files import sigterm_as_exit
from beit3.core.settings import add_dataclass_flags, add_flag, check_args, given
from beit3.inference.predictor import Predictor
from beit3.inference.search import BACKENDS, check_dims, neighbours, read_pairs, recall, resolve_backend
from beit3.inference.vectors import read_vectors


# -- beit3 embed -----------------------------------------------------------------------------------
def embed_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="beit3 embed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help=EmbedConfig.__dataclass_fields__["model"].metadata["help"])
    add_dataclass_flags(ap, EmbedConfig, skip=("model",))
    return ap


def main_embed(argv: Optional[list[str]] = None) -> int:
    args = embed_parser().parse_args(argv)
    try:
        cfg = EmbedConfig(**given(args, EmbedConfig))
    except UserError as e:
        return report("beit3 embed", e, 2)
    try:
        with sigterm_as_exit():
            run(cfg)
    except IncompleteError as e:
        print(f"beit3 embed: error: {e}", file=sys.stderr)
        return 1
    except UserError as e:
        print(f"beit3 embed: error: {e}", file=sys.stderr)
        return 2
    return 0


# -- beit3 search ----------------------------------------------------------------------------------
def search_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="beit3 search", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="the retrieval model that embedded the index (default: the one "
                                             "its summary names)")
    ap.add_argument("--index", help="the matrix to search (NAME.npy or NAME.safetensors, NAME.ids.txt beside)")
    ap.add_argument("--text", action="append", help="a text query (may be given several times)")
    ap.add_argument("--image", action="append", help="an image query: file or http(s) URL (several times)")
    ap.add_argument("--queries", help="a .txt (one text a line) or .jsonl ({\"text\"} or {\"image\"}, optional \"id\")")
    add_flag(ap, "--top-k", type=int, default=5, help="neighbours a query", ge=1)
    ap.add_argument("--backend", choices=BACKENDS, default="auto", help="faiss (IndexFlatIP) when installed, "
                                                                         "else torch; both exact")
    ap.add_argument("--eval", help="pairs file: recall of --images against --texts (JSON lines "
                                   "{\"image\": ID, \"text\": ID})")
    ap.add_argument("--images", help="--eval: the image matrix")
    ap.add_argument("--texts", help="--eval: the text matrix")
    ap.add_argument("--spm", help="SentencePiece model of a checkpoint file MODEL")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return ap


def main_search(argv: Optional[list[str]] = None) -> int:
    parser = search_parser()
    args = parser.parse_args(argv)
    try:
        check_args(parser, args)
        if args.eval is not None:
            print(json.dumps(_recall(args)), flush=True)
            return 0
        for line in _search(args):
            print(json.dumps(line), flush=True)
    except UserError as e:
        print(f"beit3 search: error: {e}", file=sys.stderr)
        return 2
    return 0


def _recall(args: argparse.Namespace) -> dict:
    if args.images is None or args.texts is None:
        raise UserError("--eval needs the two matrices: --images IMAGES.npy --texts TEXTS.npy")
    pairs = read_pairs(args.eval)
    return recall(read_vectors(args.images, "--images"), read_vectors(args.texts, "--texts"), pairs)


def _search(args: argparse.Namespace):
    if args.index is None:
        raise UserError("no --index given (the matrix `beit3 embed` wrote)")
    if args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")
    if args.queries is not None and (args.text or args.image):
        raise UserError("give --queries or --text/--image, not both")
    backend = resolve_backend(args.backend)
    index = read_vectors(args.index)
    queries = _queries(args)
    model = args.model or index.summary.get("model")
    if model is None:
        raise UserError(f"no MODEL given and {index.files.summary} does not name one")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    p = load_retrieval(model, device, args.spm)
    check_dims(index, p.model.cfg.embed_dim, model)
    found = neighbours(index, torch.stack(_embed_queries(p, queries)), args.top_k, backend)
    for (name, _), hits in zip(queries, found):
        for hit in hits:
            yield {"query": name, **hit}


def _queries(args: argparse.Namespace) -> list[tuple[str, tuple[str, str]]]:
    """[(name, (modality, text or image path))] in the order given."""
    if args.queries is not None:
        return _read_queries(args.queries)
    found = [(t, ("text", t)) for t in args.text or []] + [(i, ("image", i)) for i in args.image or []]
    if not found:
        raise UserError("no query: give --text, --image or --queries")
    return found


def _read_queries(path: str) -> list[tuple[str, tuple[str, str]]]:
    if not path.endswith((".txt", ".jsonl")) or not os.path.isfile(path):
        raise UserError(f"--queries {path}: expected an existing .txt or .jsonl file")
    inputs = open_inputs(path)  # the reader of beit3 embed's inputs: a text's name is itself in a .txt
    return [(value if inputs.kind == "text" else key, (inputs.modality, value))
            for chunk in inputs.chunks for key, value in chunk.items]


def _embed_queries(p: Predictor, queries: list) -> list[torch.Tensor]:
    """One vector per query, in order (texts and images each in one batch)."""
    texts = [i for i, (_, (m, _)) in enumerate(queries) if m == "text"]
    images = [i for i, (_, (m, _)) in enumerate(queries) if m == "image"]
    out: list = [None] * len(queries)
    for rows, embed in ((texts, embed_texts), (images, embed_images)):
        if rows:
            for i, v in zip(rows, embed(p, [queries[i][1][1] for i in rows])):
                out[i] = v
    return out
