"""``beit3 predict``: answers, captions, classes, rankings from a saved task model, as JSON lines.

    beit3 predict MODEL --image cat.jpg --question "what color is the cat?"     (vqa)
    beit3 predict MODEL --image photos/                                          (captioning, classification)
    beit3 predict MODEL --image photos/ --text "a black cat"                     (retrieval: rank the images)
    beit3 predict MODEL --image cat.jpg --text "a cat" --text "a dog"            (retrieval: rank the texts)
    beit3 predict MODEL --image left.jpg --image2 right.jpg --text "two cats"    (nlvr2)
    beit3 predict MODEL --image room.jpg --output masks/                        (segmentation: masks/room_seg.png)
    beit3 predict MODEL --requests requests.jsonl

MODEL is a folder written by ``save_pretrained`` or a fine-tuning run (its ``best/``). Each result
is printed as one JSON line. ``--image`` may be given several times, each a file, an http(s) URL or
a folder (every image in it, by name); VQA, captioning, classification and segmentation print one
line per image, retrieval ranks them all, NLVR2 takes one. A requests file holds one JSON object per
line with the same keys (``image``, ``question``, ``text``, ``texts``, ``images``, ``image2``,
``top_k``, ``num_beams``, ``ban_special``); its relative paths are taken from the requests file's
folder. A segmentation model writes each image's mask as ``<output>/<image name>_seg.png`` in the
annotation format (class id + 1 a pixel, 0 none; paletted, so it also shows the classes in colour)
and prints its path and the classes covering most of the image. An http(s) image must arrive whole
within ``--download-timeout`` seconds. The work is done by ``beit3.inference.predictor.Predictor``
(scores explained there); a bad input is one line and exit code 2.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Iterable, Optional

import torch

from beit3.core.errors import BadFileError, UserError, first_line
from beit3.core.files import atomic_write_bytes, check_output_dir
from beit3.core.settings import add_flag, check_args
from beit3.data.ade20k import annotation_image
from beit3.inference.predictor import URL_TIMEOUT, Predictor, load_predictor

REQUEST_KEYS = {"image": str, "images": list, "image2": str, "question": str, "text": str, "texts": list,
                "top_k": int, "num_beams": int, "ban_special": bool}

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def folder_images(folder: str) -> list[str]:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise UserError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return [os.path.join(folder, n) for n in names]


def _paths(image: Optional[str]) -> list[str]:
    if image is None:
        return []
    return folder_images(image) if os.path.isdir(image) else [image]


def write_mask(p: Predictor, image: str, output: str, k: int) -> dict:
    """Segment ``image``, write its mask PNG into ``output``; the JSON line's content."""
    result = p.segment(image, k)
    mask = result["mask"]
    path = os.path.join(output, os.path.splitext(os.path.basename(image))[0] + "_seg.png")
    if os.path.abspath(path) == os.path.abspath(image):
        raise UserError(f"the mask of {image} would replace it; give another --output folder")
    buf = io.BytesIO()
    annotation_image(mask.numpy()).save(buf, format="PNG")
    os.makedirs(output, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return {"image": image, "mask": path, "size": [mask.shape[1], mask.shape[0]], "classes": result["classes"]}


def check_request(req: dict) -> None:
    """Every key known and of its type: strings, lists of strings, positive integers, a boolean."""
    unknown = sorted(set(req) - set(REQUEST_KEYS))
    if unknown:
        raise UserError(f"unknown request keys {unknown}; known: {sorted(REQUEST_KEYS)}")
    for key, value in req.items():
        kind = REQUEST_KEYS[key]
        if value is None:
            continue
        if kind is list:
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                what = "image paths or URLs" if key == "images" else "strings"
                raise UserError(f"{key} must be a list of {what}, got {value!r:.80}")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{key} must be a positive integer, got {value!r:.80}")
        elif not isinstance(value, kind):
            raise UserError(f"{key} must be a {'boolean' if kind is bool else 'string'}, got {value!r:.80}")


def run_request(p: Predictor, req: dict, top_k: int = 5, output: str = ".") -> Iterable[dict]:
    """The results of one request (keys as the command's flags) as JSON-ready dicts; segmentation
    masks go to ``output``."""
    check_request(req)
    for key, tasks in (("question", ("vqa",)), ("image2", ("nlvr2",)), ("text", ("retrieval", "nlvr2")),
                       ("texts", ("retrieval",)), ("num_beams", ("captioning",)), ("ban_special", ("captioning",))):
        if req.get(key) is not None and p.task not in tasks:
            p.require_task(tasks[0])  # a model of another task: say which task the key belongs to
    k = req.get("top_k") or top_k
    images = _paths(req.get("image")) + [path for x in req.get("images") or [] for path in _paths(x)]
    texts = ([req["text"]] if req.get("text") is not None else []) + list(req.get("texts") or [])
    if p.task == "vqa":
        if req.get("question") is None:
            raise UserError("a vqa model needs a question (--question)")
        for img in _one_or_more(images):
            yield {"image": img, "question": req["question"], "answers": p.vqa(img, req["question"], k)}
    elif p.task == "captioning":
        for img in _one_or_more(images):
            yield {"image": img, **p.caption(img, req.get("num_beams"), req.get("ban_special"))}
    elif p.task == "classification":
        for img in _one_or_more(images):
            yield {"image": img, "top_k": p.classify(img, k)}
    elif p.task == "retrieval":
        yield from _retrieval(p, images, texts, k)
    elif p.task == "segmentation":
        for img in _one_or_more(images):
            yield write_mask(p, img, output, k)
    elif p.task == "nlvr2":
        if len(images) != 1 or req.get("image2") is None or len(texts) != 1:
            several = f" (got {len(images)} images)" if len(images) > 1 else ""
            raise UserError(f"an nlvr2 model judges one pair: one --image, one --image2 and one --text{several}")
        yield {"image": images[0], "image2": req["image2"], "text": texts[0],
               **p.nlvr2(images[0], req["image2"], texts[0])}
    else:
        raise UserError(f"{p.saved.directory} holds a backbone without a task head: nothing to predict")


def _retrieval(p: Predictor, images: list[str], texts: list[str], k: int) -> Iterable[dict]:
    if len(texts) == 1 and images:
        yield {"text": texts[0], "ranking": p.rank_images(texts[0], images)[:k]}
    elif len(images) == 1 and texts:
        yield {"image": images[0], "ranking": p.rank_texts(images[0], texts)[:k]}
    else:
        raise UserError("a retrieval model ranks images for one --text, or texts (--text ...) for one --image")


def _one_or_more(images: list[str]) -> list[str]:
    if not images:
        raise UserError("no image given (--image FILE or FOLDER)")
    return images


def read_requests(path: str) -> Iterable[tuple[str, dict]]:
    """(where, request) per non-empty line; relative image paths are taken from the file's folder."""
    if not os.path.isfile(path):
        raise BadFileError(path, "no such requests file")
    base = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path} line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadFileError(path, f"line {n} is not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                         f"{e.start + 1})") from None
            if not line.strip():
                continue
            try:
                req = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(req, dict):
                raise UserError(f"{where}: expected a JSON object")
            for key in ("image", "image2"):
                if isinstance(req.get(key), str):
                    req[key] = _beside(base, req[key])
            if isinstance(req.get("images"), list):
                req["images"] = [_beside(base, x) if isinstance(x, str) else x for x in req["images"]]
            yield where, req


def _beside(base: str, image: str) -> str:
    """A requests file's image: a URL as it is, a relative path from the file's folder."""
    return image if image.lower().startswith(("http://", "https://")) else os.path.join(base, image)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="beit3 predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="saved model folder (save_pretrained) or fine-tuning run (its best/)")
    ap.add_argument("--image", action="append", help="an image file, http(s) URL or folder of images; may be "
                                                     "given several times")
    ap.add_argument("--image2", help="the second image (nlvr2)")
    ap.add_argument("--question", help="the question (vqa)")
    ap.add_argument("--text", action="append", help="a text (retrieval: once to rank images, several times to "
                                                    "rank them for one image; nlvr2: the statement)")
    ap.add_argument("--requests", help="JSON-lines file of requests (keys as these flags)")
    add_flag(ap, "--top-k", type=int, default=5, ge=1)
    add_flag(ap, "--num-beams", type=int, default=None, help="captioning beams (default: the model's)", ge=1)
    add_flag(ap, "--download-timeout", type=float, default=URL_TIMEOUT,
             help=f"seconds an http(s) image may take to arrive whole, a stalled or trickling server included "
                  f"(default {URL_TIMEOUT:g})", gt=0)
    ap.add_argument("--ban-special", action=argparse.BooleanOptionalAction, default=None,
                    help="captioning: never generate <s>, <pad>, [MASK] (default: the model's setting, else yes)")
    ap.add_argument("--output", default=".", help="folder for segmentation masks (default: the current folder)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return ap


def pick_device(requested: Optional[str]) -> str:
    """``--device`` (cuda, cuda:1, cpu), checked before the model is loaded; default cuda when visible."""
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(requested).type
    except RuntimeError as e:
        raise UserError(f"--device {requested}: {first_line(e)}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested} but no CUDA device is visible (torch.cuda.is_available() is False), "
                        f"or give --device cpu")
    return requested


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.requests is not None and any(v is not None for v in (args.image, args.question, args.text)):
            raise UserError("give --requests or --image/--question/--text, not both")
        check_args(parser, args)
        predictor = load_predictor(args.model, pick_device(args.device))
        predictor.url_timeout = args.download_timeout
        if predictor.task == "segmentation":
            check_output_dir(args.output)
        if args.requests is not None:
            requests = read_requests(args.requests)
        else:
            texts = args.text or []
            req = {"images": args.image, "image2": args.image2, "question": args.question,
                   "text": texts[0] if len(texts) == 1 else None, "texts": texts if len(texts) > 1 else None,
                   "num_beams": args.num_beams, "ban_special": args.ban_special}
            requests = [("command line", {k: v for k, v in req.items() if v is not None})]
        for where, req in requests:
            try:
                for result in run_request(predictor, req, args.top_k, args.output):
                    print(json.dumps(result), flush=True)
            except UserError as e:
                raise UserError(f"{where}: {e}" if where != "command line" else str(e)) from None
    except UserError as e:
        print(f"beit3 predict: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
