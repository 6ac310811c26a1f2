"""Predictions from a saved task model: in Python through one object, or ``beit3 predict``.

    p = beit3.load_predictor("runs/vqa/best")          # model + image transform + tokenizer
    p.vqa("cat.jpg", "what color is the cat?", k=3)    # [{"answer": "black", "score": 0.91}, ...]
    p.caption("cat.jpg")                               # {"caption": "...", "score": -0.42}
    p.classify("cat.jpg", k=5)                         # [{"label": 281, "class_name": "tabby", "score": 0.7}, ...]
    p.rank_images("a black cat", ["a.jpg", "b.jpg"])   # [{"image": "b.jpg", "score": 0.31}, ...] best first
    p.rank_texts("cat.jpg", ["a cat", "a dog"])        # [{"text": "a cat", "score": 0.28}, ...]
    p.nlvr2("left.jpg", "right.jpg", "two cats")       # {"answer": true, "score": 0.83}

    beit3 predict MODEL --image cat.jpg --question "what color is the cat?"     (vqa)
    beit3 predict MODEL --image photos/                                          (captioning, classification)
    beit3 predict MODEL --image photos/ --text "a black cat"                     (retrieval: rank the images)
    beit3 predict MODEL --image cat.jpg --text "a cat" --text "a dog"            (retrieval: rank the texts)
    beit3 predict MODEL --image left.jpg --image2 right.jpg --text "two cats"    (nlvr2)
    beit3 predict MODEL --requests requests.jsonl

MODEL is a folder written by ``save_pretrained`` or a fine-tuning run (its ``best/``). Each result
is printed as one JSON line. ``--image`` may be a folder (every image in it, by name; for VQA,
captioning, classification one line per image). A requests file holds one JSON object per line with
the same keys (``image``, ``question``, ``text``, ``texts``, ``images``, ``image2``, ``top_k``); its
relative paths are taken from the requests file's folder. Scores: VQA the answer's sigmoid (the
head is trained with BCE), classification the softmax, retrieval the cosine similarity, captioning
the beam's length-normalised log-probability, NLVR2 the softmax of "true".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from PIL import Image

from .data.downstream_datasets import load_image
from .data.text_tokenizer import TextTokenizer
from .data.transforms import eval_transform
from .errors import BadFileError, UserError
from .pretrained import Pretrained, load_pretrained

ImageInput = Union[str, os.PathLike, Image.Image]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
WHAT = {"vqa": "answers questions (--question)", "captioning": "writes captions",
        "classification": "classifies images", "retrieval": "ranks images for a text and texts for an image "
        "(--text)", "nlvr2": "judges a statement about an image pair (--image2, --text)"}


class Predictor:
    """A saved task model with its image transform and tokenizer; every method takes file paths or
    PIL images and returns plain Python values (what ``beit3 predict`` prints)."""

    def __init__(self, saved: Pretrained, device: Union[str, torch.device] = "cpu"):
        self.saved, self.device = saved, torch.device(device)
        self.model = saved.model.to(self.device).eval()
        self.task: Optional[str] = saved.task
        self.transform = eval_transform(saved.config["preprocess"])
        self.labels: Optional[list] = saved.config.get("labels")
        self.inference: dict = saved.config.get("inference") or {}
        spm = saved.path("tokenizer")
        self.tokenizer = TextTokenizer(spm) if spm is not None and os.path.isfile(spm) else None

    # -- inputs ------------------------------------------------------------------------------------
    def _need(self, task: str) -> None:
        if self.task != task:
            raise UserError(f"{self.saved.directory} holds a {self.task or 'backbone (no task head)'} model; "
                            f"a {task} model {WHAT[task]}")

    def images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """(B, 3, S, S) on the model's device; a missing or undecodable file raises ``UserError``."""
        return torch.stack([self.transform(_pil(x)) for x in images]).to(self.device)

    def _tokenizer(self) -> TextTokenizer:
        if self.tokenizer is None:
            raise BadFileError(self.saved.path("tokenizer") or self.saved.directory,
                               "the saved model has no tokenizer file")
        return self.tokenizer

    def texts(self, texts: Sequence[str], what: str = "text") -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, padding mask), each (B, L), cut to the model's text length as in training."""
        tok = self._tokenizer()
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise UserError(f"empty {what}: {t!r}")
        ids, pad = tok.batch_encode(list(texts), self.inference.get("max_text_len", 64))
        return ids.to(self.device), pad.to(self.device)

    # -- tasks -------------------------------------------------------------------------------------
    @torch.no_grad()
    def vqa(self, image: ImageInput, question: str, k: int = 5) -> list[dict]:
        """The ``k`` best answers with their scores (sigmoid of the logit), best first."""
        self._need("vqa")
        self._need_labels()
        text, pad = self.texts([question], "question")
        logits = self.model(image=self.images([image]), text=text, padding_mask=pad)[0].float()
        top = logits.topk(min(k, logits.numel()))
        scores = top.values.sigmoid().tolist()
        return [{"answer": self.labels[i], "score": s} for s, i in zip(scores, top.indices.tolist())]

    @torch.no_grad()
    def classify(self, image: ImageInput, k: int = 5) -> list[dict]:
        """The ``k`` most probable classes (softmax), best first."""
        self._need("classification")
        logits = self.model(image=self.images([image]))[0].float()
        top = logits.softmax(-1).topk(min(k, logits.numel()))
        names = self.labels or [None] * logits.numel()
        return [{"label": i, "class_name": names[i], "score": s}
                for s, i in zip(top.values.tolist(), top.indices.tolist())]

    @torch.no_grad()
    def caption(self, image: ImageInput, num_beams: Optional[int] = None) -> dict:
        """Beam search as the evaluation decodes (``finetune.captioning.generate``)."""
        from .finetune.captioning import DecodeConfig, generate
        self._need("captioning")
        tok, inf = self._tokenizer(), self.inference
        dc = DecodeConfig(num_beams=num_beams or inf.get("num_beams", 3), max_len=inf.get("max_text_len", 32),
                          length_penalty=inf.get("length_penalty", 0.6), bos_id=tok.bos_id, eos_id=tok.eos_id,
                          pad_id=tok.pad_id, mask_id=tok.mask_id)
        tokens, scores = generate(self.model, self.images([image]), self.model.cfg.depth, dc)
        return {"caption": tok.decode(tokens[0]), "score": float(scores[0])}

    @torch.no_grad()
    def embed_images(self, images: Sequence[ImageInput], batch: int = 16) -> torch.Tensor:
        """(N, D) l2-normalised image features of the retrieval dual encoder."""
        self._need("retrieval")
        return torch.cat([self.model(image=self.images(images[i:i + batch]))["image"].float()
                          for i in range(0, len(images), batch)])

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch: int = 64) -> torch.Tensor:
        """(N, D) l2-normalised text features of the retrieval dual encoder."""
        self._need("retrieval")
        out = []
        for i in range(0, len(texts), batch):
            ids, pad = self.texts(texts[i:i + batch])
            out.append(self.model(text=ids, padding_mask=pad)["text"].float())
        return torch.cat(out)

    def rank_images(self, text: str, images: Sequence[ImageInput]) -> list[dict]:
        """``images`` by cosine similarity to ``text``, best first."""
        if not images:
            raise UserError("no images to rank")
        scores = (self.embed_images(images) @ self.embed_texts([text])[0]).tolist()
        return sorted(({"image": _name(x), "score": s} for x, s in zip(images, scores)), key=lambda r: -r["score"])

    def rank_texts(self, image: ImageInput, texts: Sequence[str]) -> list[dict]:
        """``texts`` by cosine similarity to ``image``, best first."""
        if not texts:
            raise UserError("no texts to rank")
        scores = (self.embed_texts(texts) @ self.embed_images([image])[0]).tolist()
        return sorted(({"text": t, "score": s} for t, s in zip(texts, scores)), key=lambda r: -r["score"])

    @torch.no_grad()
    def nlvr2(self, image: ImageInput, image2: ImageInput, text: str) -> dict:
        """Is ``text`` true of the pair? ``score``: the probability of true."""
        self._need("nlvr2")
        ids, pad = self.texts([text], "statement")
        logits = self.model(image=self.images([image]), image2=self.images([image2]), text=ids, padding_mask=pad)
        p_true = float(logits[0].float().softmax(-1)[1])
        return {"answer": p_true > 0.5, "score": p_true}

    def _need_labels(self) -> None:
        if not self.labels:
            raise BadFileError(os.path.join(self.saved.directory, "config.json"),
                               "has no answer list (a best/ folder written by an older beit3: evaluate it "
                               "with `beit3 evaluate`, or save it again with labels=)")


def load_predictor(directory: str, device: Union[str, torch.device] = "cpu") -> Predictor:
    """A :class:`Predictor` for the model saved in ``directory`` (or a fine-tuning run's ``best/``)."""
    return Predictor(load_pretrained(directory), device)


def _pil(x: ImageInput) -> Image.Image:
    if isinstance(x, Image.Image):
        return x.convert("RGB")
    if os.path.isdir(x):
        raise UserError(f"image {x} is a folder; give one image file")
    return load_image(x)


def _name(x: ImageInput) -> Any:
    return os.fspath(x) if isinstance(x, (str, os.PathLike)) else repr(x)


# -- the command ------------------------------------------------------------------------------------
def folder_images(folder: str) -> list[str]:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise UserError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return [os.path.join(folder, n) for n in names]


def _paths(image: Optional[str]) -> list[str]:
    if image is None:
        return []
    return folder_images(image) if os.path.isdir(image) else [image]


def run_request(p: Predictor, req: dict, top_k: int = 5) -> Iterable[dict]:
    """The results of one request (keys as the command's flags) as JSON-ready dicts."""
    known = {"image", "images", "image2", "question", "text", "texts", "top_k", "num_beams"}
    unknown = sorted(set(req) - known)
    if unknown:
        raise UserError(f"unknown request keys {unknown}; known: {sorted(known)}")
    for key, tasks in (("question", ("vqa",)), ("image2", ("nlvr2",)), ("text", ("retrieval", "nlvr2")),
                       ("texts", ("retrieval",))):
        if req.get(key) is not None and p.task not in tasks:
            p._need(tasks[0])  # a model of another task: say which task the key belongs to
    k = int(req.get("top_k", top_k))
    images = _paths(req.get("image")) + list(req.get("images") or [])
    texts = ([req["text"]] if req.get("text") is not None else []) + list(req.get("texts") or [])
    if p.task == "vqa":
        if req.get("question") is None:
            raise UserError("a vqa model needs a question (--question)")
        for img in _one_or_more(images):
            yield {"image": img, "question": req["question"], "answers": p.vqa(img, req["question"], k)}
    elif p.task == "captioning":
        for img in _one_or_more(images):
            yield {"image": img, **p.caption(img, req.get("num_beams"))}
    elif p.task == "classification":
        for img in _one_or_more(images):
            yield {"image": img, "top_k": p.classify(img, k)}
    elif p.task == "retrieval":
        yield from _retrieval(p, images, texts, k)
    elif p.task == "nlvr2":
        if len(images) != 1 or req.get("image2") is None or len(texts) != 1:
            raise UserError("an nlvr2 model needs --image, --image2 and one --text")
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
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                req = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(req, dict):
                raise UserError(f"{where}: expected a JSON object")
            for key in ("image", "image2"):
                if isinstance(req.get(key), str):
                    req[key] = os.path.join(base, req[key])
            if isinstance(req.get("images"), list):
                req["images"] = [os.path.join(base, x) for x in req["images"]]
            yield where, req


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="beit3 predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="saved model folder (save_pretrained) or fine-tuning run (its best/)")
    ap.add_argument("--image", help="an image file, or a folder of images")
    ap.add_argument("--image2", help="the second image (nlvr2)")
    ap.add_argument("--question", help="the question (vqa)")
    ap.add_argument("--text", action="append", help="a text (retrieval: once to rank images, several times to "
                                                    "rank them for one image; nlvr2: the statement)")
    ap.add_argument("--requests", help="JSON-lines file of requests (keys as these flags)")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--num-beams", type=int, default=None, help="captioning beams (default: the model's)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.requests is not None and any(v is not None for v in (args.image, args.question, args.text)):
            raise UserError("give --requests or --image/--question/--text, not both")
        if args.top_k < 1:
            raise UserError(f"--top-k must be >= 1, got {args.top_k}")
        predictor = load_predictor(args.model, device)
        if args.requests is not None:
            requests = read_requests(args.requests)
        else:
            texts = args.text or []
            req = {"image": args.image, "image2": args.image2, "question": args.question,
                   "text": texts[0] if len(texts) == 1 else None, "texts": texts if len(texts) > 1 else None,
                   "num_beams": args.num_beams}
            requests = [("command line", {k: v for k, v in req.items() if v is not None})]
        for where, req in requests:
            try:
                for result in run_request(predictor, req, args.top_k):
                    print(json.dumps(result), flush=True)
            except UserError as e:
                raise UserError(f"{where}: {e}" if where != "command line" else str(e)) from None
    except UserError as e:
        print(f"beit3 predict: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
