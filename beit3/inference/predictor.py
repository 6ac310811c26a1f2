"""One object for predictions from a saved task model: the model, its image transform and tokenizer.

    p = beit3.load_predictor("runs/vqa/best")          # a save_pretrained folder or a run's best/
    p.vqa("cat.jpg", "what color is the cat?", k=3)    # [{"answer": "black", "score": 0.91}, ...]
    p.caption("cat.jpg")                               # {"caption": "...", "score": -0.42}
    p.classify("cat.jpg", k=5)                         # [{"label": 281, "class_name": "tabby", "score": 0.7}, ...]
    p.rank_images("a black cat", ["a.jpg", "b.jpg"])   # [{"image": "b.jpg", "score": 0.31}, ...] best first
    p.rank_texts("cat.jpg", ["a cat", "a dog"])        # [{"text": "a cat", "score": 0.28}, ...]
    p.nlvr2("left.jpg", "right.jpg", "two cats")       # {"answer": true, "score": 0.83}
    p.segment("room.jpg")                               # {"mask": (H, W) class ids, "classes": [...]}

An image is a file path, an ``http(s)://`` URL (whole within ``url_timeout`` seconds, default
``URL_TIMEOUT``, a stalled or trickling server included), a PIL image, a numpy array (H, W, 3) or
(H, W) of uint8, as HF pipelines take them, or the bytes of an image file; ``vqa``, ``classify`` and
``caption`` also take a list of images and return a list of results (batched embeddings of many
images or texts: ``beit3.inference.embed``). Images are transformed as the evaluation does
(the saved preprocessing); texts are cut to the model's text length as in training. Scores: VQA the
answer's sigmoid (the head is trained with BCE), classification the softmax, retrieval the cosine
similarity, captioning the beam's length-normalised log-probability, NLVR2 the softmax of "true".
Segmentation gives a class a pixel at the image's own size (sliding windows, as the evaluation) and
each class's share. A missing or undecodable image, an empty text, a model of another task and a saved folder that does
not hold together (no preprocessing, labels that do not fit the head, a broken tokenizer) raise
``UserError`` with one line.
"""

from __future__ import annotations

import io
import os
import urllib.error
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from beit3.core.errors import BadFileError, UserError, first_line
from beit3.data.downstream.datasets import load_image
from beit3.data.remote import Timeouts, download
from beit3.data.text_tokenizer import TextTokenizer
from beit3.data.transforms import eval_transform
from beit3.model.generation import DecodeConfig, generate
from beit3.model.pretrained import load_pretrained
from beit3.model.saved import CONFIG_FILE, Pretrained
from beit3.model.segmentation import slide_logits
from beit3.model.upernet import resize

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, bytes]
URL_TIMEOUT = 30.0  # seconds an image URL may take to arrive whole (the default of Predictor.url_timeout)
HEAD_SIZE = {"vqa": "num_answers", "classification": "num_classes"}  # the head_args entry that labels name
WHAT = {"vqa": "answers questions (--question)", "captioning": "writes captions",
        "classification": "classifies images", "retrieval": "ranks images for a text and texts for an image "
        "(--text)", "nlvr2": "judges a statement about an image pair (--image2, --text)",
        "segmentation": "labels every pixel of an image"}


class Predictor:
    """A saved task model with its image transform and tokenizer; every method takes file paths or
    PIL images and returns plain Python values (what ``beit3 predict`` prints)."""

    def __init__(self, saved: Pretrained, device: Union[str, torch.device] = "cpu"):
        self.saved, self.device = saved, torch.device(device)
        self.model = saved.model.to(self.device).eval()
        self.task: Optional[str] = saved.task
        self.transform = _transform(saved)
        self.labels: Optional[list] = _labels(saved)
        self.inference: dict = saved.config.get("inference") or {}
        spm = saved.path("tokenizer")
        self.tokenizer = _tokenizer(spm) if spm is not None and os.path.isfile(spm) else None
        self.url_timeout: Optional[float] = None  # seconds for an image URL (None: URL_TIMEOUT)

    # -- inputs ------------------------------------------------------------------------------------
    def require_task(self, task: str) -> None:
        """Raise ``UserError`` naming the model's task unless it is ``task``."""
        if self.task != task:
            raise UserError(f"{self.saved.directory} holds a {self.task or 'backbone (no task head)'} model; "
                            f"a {task} model {WHAT[task]}")

    def images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """(B, 3, S, S) on the model's device; a missing or undecodable file raises ``UserError``."""
        if not isinstance(images, (list, tuple)):
            raise UserError(f"expected a list of images, got {type(images).__name__}")
        return torch.stack([self.image(x) for x in images]).to(self.device)

    def image(self, x: ImageInput) -> torch.Tensor:
        """(3, S, S) on the CPU: one image transformed as the evaluation does; a missing or
        undecodable image raises ``UserError``. Thread-safe, so a pool can decode a batch."""
        size = self.model.cfg.img_size
        out = self.transform(_pil(x, self.url_timeout))
        slides = self.task == "segmentation"  # its windows slide over any size the rescale gives
        if not slides and tuple(out.shape[-2:]) != (size, size):  # preprocessing without a resize (CIFAR's)
            raise UserError(f"image {_name(x)} is {out.shape[-1]}x{out.shape[-2]} pixels; this model "
                            f"takes {size}x{size} and its preprocessing does not resize")
        return out

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
        """The ``k`` best answers with their scores (sigmoid of the logit), best first (a list of
        images: one such list each)."""
        if _several(image):
            return [self.vqa(x, question, k) for x in image]
        self.require_task("vqa")
        self._need_labels()
        text, pad = self.texts([question], "question")
        logits = self.model(image=self.images([image]), text=text, padding_mask=pad)[0].float()
        top = logits.topk(min(k, logits.numel()))
        scores = top.values.sigmoid().tolist()
        return [{"answer": self.labels[i], "score": s} for s, i in zip(scores, top.indices.tolist())]

    @torch.no_grad()
    def classify(self, image: ImageInput, k: int = 5) -> list[dict]:
        """The ``k`` most probable classes (softmax), best first (a list of images: one list each)."""
        if _several(image):
            return [self.classify(x, k) for x in image]
        self.require_task("classification")
        logits = self.model(image=self.images([image]))[0].float()
        top = logits.softmax(-1).topk(min(k, logits.numel()))
        names = self.labels or [None] * logits.numel()
        return [{"label": i, "class_name": names[i], "score": s}
                for s, i in zip(top.values.tolist(), top.indices.tolist())]

    @torch.no_grad()
    def caption(self, image: ImageInput, num_beams: Optional[int] = None,
                ban_special: Optional[bool] = None) -> Union[dict, list[dict]]:
        """Beam search as the evaluation decodes (``finetune.captioning.generate``); ``num_beams``
        and ``ban_special`` (never generate <s>, <pad>, [MASK]) default to the saved inference
        settings. A list of images: one result each."""
        if _several(image):
            return [self.caption(x, num_beams, ban_special) for x in image]
        self.require_task("captioning")
        tok, inf = self._tokenizer(), self.inference
        dc = DecodeConfig(num_beams=num_beams or inf.get("num_beams", 3), max_len=inf.get("max_text_len", 32),
                          length_penalty=inf.get("length_penalty", 0.6), bos_id=tok.bos_id, eos_id=tok.eos_id,
                          pad_id=tok.pad_id, mask_id=tok.mask_id,
                          ban_special=inf.get("ban_special", True) if ban_special is None else ban_special)
        tokens, scores = generate(self.model, self.images([image]), self.model.cfg.depth, dc)
        return {"caption": tok.decode(tokens[0]), "score": float(scores[0])}

    @torch.no_grad()
    def embed_images(self, images: Sequence[ImageInput], batch: int = 16) -> torch.Tensor:
        """(N, D) l2-normalised image features of the retrieval dual encoder."""
        self.require_task("retrieval")
        return torch.cat([self.model(image=self.images(images[i:i + batch]))["image"].float()
                          for i in range(0, len(images), batch)])

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch: int = 64) -> torch.Tensor:
        """(N, D) l2-normalised text features of the retrieval dual encoder."""
        self.require_task("retrieval")
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
        self.require_task("nlvr2")
        ids, pad = self.texts([text], "statement")
        logits = self.model(image=self.images([image]), image2=self.images([image2]), text=ids, padding_mask=pad)
        p_true = float(logits[0].float().softmax(-1)[1])
        return {"answer": p_true > 0.5, "score": p_true}

    @torch.no_grad()
    def segment(self, image: ImageInput, k: int = 5) -> dict:
        """``mask``: (H, W) long class indices at the image's size; ``classes``: the ``k`` classes
        covering most of it, with their share of the pixels."""
        self.require_task("segmentation")
        pil = _pil(image, self.url_timeout)
        inf = self.inference
        logits = slide_logits(self.model, self.images([pil]), inf["slide_crop"], inf["slide_stride"])
        mask = resize(logits, (pil.height, pil.width)).argmax(1)[0].cpu()  # as the evaluation scores it
        share = torch.bincount(mask.flatten(), minlength=logits.shape[1]).double() / mask.numel()
        top = share.topk(min(k, int((share > 0).sum())))
        names = self.labels or [None] * logits.shape[1]
        return {"mask": mask, "classes": [{"label": i, "class_name": names[i], "share": s}
                                          for s, i in zip(top.values.tolist(), top.indices.tolist())]}

    def _need_labels(self) -> None:
        if not self.labels:
            raise BadFileError(os.path.join(self.saved.directory, "config.json"),
                               "has no answer list (a best/ folder written by an older beit3: evaluate it "
                               "with `beit3 evaluate`, or save it again with labels=)")


def load_predictor(directory: str, device: Union[str, torch.device] = "cpu") -> Predictor:
    """A :class:`Predictor` for the model saved in ``directory`` (or a fine-tuning run's ``best/``)."""
    return Predictor(load_pretrained(directory), device)


def _several(image: Any) -> bool:
    return isinstance(image, (list, tuple))


def _transform(saved: Pretrained):
    where = os.path.join(saved.directory, CONFIG_FILE)
    p = saved.config.get("preprocess")
    if not isinstance(p, dict):
        raise BadFileError(where, "has no 'preprocess' entry (the image preprocessing of the evaluation)")
    try:
        return eval_transform(p)
    except (KeyError, ValueError, TypeError) as e:
        raise BadFileError(where, f"'preprocess' {p}: {first_line(e)}") from None


def _labels(saved: Pretrained) -> Optional[list]:
    """The saved labels, which must name every output of the head."""
    labels = saved.config.get("labels")
    n = (saved.config.get("head_args") or {}).get(HEAD_SIZE.get(saved.task, ""))
    if labels is not None and (not isinstance(labels, list) or (n is not None and len(labels) != n)):
        got = f"{len(labels)} labels" if isinstance(labels, list) else f"labels of type {type(labels).__name__}"
        raise BadFileError(os.path.join(saved.directory, CONFIG_FILE),
                           f"{got} for a {saved.task} head of {n} outputs: the labels belong to another model")
    return labels


def _tokenizer(path: str) -> TextTokenizer:
    try:
        return TextTokenizer(path)
    except ValueError as e:  # sentencepiece cannot parse it, or its ids are laid out otherwise
        raise BadFileError(path, f"not a usable SentencePiece model ({first_line(e)})") from None


def _pil(x: ImageInput, url_timeout: Optional[float] = None) -> Image.Image:
    if isinstance(x, Image.Image):
        return x.convert("RGB")
    if isinstance(x, np.ndarray):
        return _from_array(x)
    if isinstance(x, bytes):
        return _from_bytes(x, f"<{len(x):,} bytes>")
    if not isinstance(x, (str, os.PathLike)):
        raise UserError(f"image {x!r:.60}: expected a file path, an http(s) URL, a PIL image or a uint8 "
                        f"numpy array (H, W, 3) (or an image file's bytes), not {type(x).__name__}")
    if isinstance(x, str) and x.lower().startswith(("http://", "https://")):
        return _from_url(x, url_timeout or URL_TIMEOUT)
    if os.path.isdir(x):
        raise UserError(f"image {x} is a folder; give one image file")
    return load_image(x)


def _from_array(x: np.ndarray) -> Image.Image:
    """An (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 array (HWC, as PIL and HF pipelines take it)."""
    if x.dtype != np.uint8 or not (x.ndim == 2 or (x.ndim == 3 and x.shape[2] in (1, 3, 4))):
        raise UserError(f"image array of shape {tuple(x.shape)} and dtype {x.dtype}: expected uint8 pixels "
                        f"(H, W, 3) or (H, W), channels last")
    return Image.fromarray(x[:, :, 0] if x.ndim == 3 and x.shape[2] == 1 else x).convert("RGB")


def _from_url(url: str, timeout: float) -> Image.Image:
    try:  # within the deadline as a whole: a server trickling a byte at a time never ends a plain read
        data = download(url, Timeouts(connect=timeout, read=timeout, total=timeout))
    except urllib.error.HTTPError as e:
        raise UserError(f"image {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"image {url}: cannot be read ({getattr(e, 'reason', None) or e})") from None
    return _from_bytes(data, url)


def _from_bytes(data: bytes, name: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except Image.DecompressionBombError as e:  # refused before decoding: no memory spent on it
        raise UserError(f"image {name} is too large to decode safely: {first_line(e)}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"cannot decode image {name} ({len(data):,} bytes): {first_line(e)}") from None


def _name(x: ImageInput) -> Any:
    if isinstance(x, (str, os.PathLike)):
        return os.fspath(x)
    if isinstance(x, np.ndarray):
        return f"<array {tuple(x.shape)} {x.dtype}>"
    if isinstance(x, Image.Image):
        return f"<PIL image {x.size[0]}x{x.size[1]} {x.mode}>"
    if isinstance(x, bytes):
        return f"<{len(x):,} bytes>"
    return repr(x)
