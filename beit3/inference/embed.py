"""Batched retrieval embeddings: the feature vectors of a retrieval dual encoder for many images or texts.

    p = beit3.load_predictor("runs/ret/best")
    beit3.embed_images(p, ["a.jpg", "b.jpg"], batch_size=32)   # (2, D) float32 on the CPU, l2-normalised
    beit3.embed_texts("runs/ret/best", ["a cat", "a dog"])      # a saved folder or run works too

The vectors are ``Predictor.embed_images`` / ``embed_texts``'s (the evaluation's image transform and
tokenizer, the dual encoder's heads, l2-normalised), ``batch_size`` at a time: a batch gives each
input's one-by-one vector to float rounding (tests/test_embed.py measures it). ``load_retrieval``
takes a saved folder, a fine-tuning run, an official unilm/beit3 retrieval checkpoint file (with its
SentencePiece model, ``spm``) or a registry name (``beit3_base_patch16_384_coco_retrieval``,
downloaded with ``beit3.spm`` as ``beit3 download`` does). ``decode_images`` and ``usable_texts``
report the inputs that cannot be used instead of raising, for jobs that skip them (``beit3 embed``).
"""
from __future__ import annotations

import os
from concurrent.futures import Executor
from typing import Optional, Sequence, Union

import torch
from torch import nn

from beit3.weights import hub
from beit3.model.config import check_text_vocab
from beit3.data.text_tokenizer import TextTokenizer
from beit3.data.transforms import vl_preprocess
from beit3.core.errors import BadFileError, UserError, first_line
from beit3.model.heads import RetrievalModel
from beit3.model import Multiway
from beit3.inference.predictor import ImageInput, Predictor, load_predictor
from beit3.model.saved import Pretrained, saved_config
from beit3.weights.official import load_backbone
from beit3.model.pretrained import build_loaded

HEADS = ("vision_head.weight", "language_head.weight")  # official names, and ours
NEEDS = "embeddings come from a retrieval model (a dual encoder with vision_head and language_head)"
OFFICIAL_TEXT_LEN = 64  # unilm/beit3's num_max_bpe_tokens for retrieval
Source = Union[str, os.PathLike, Predictor, nn.Module]


# -- loading ---------------------------------------------------------------------------------------
def check_retrieval(p: Predictor) -> Predictor:
    """``p`` itself if it holds a retrieval model; else ``UserError`` naming what it holds."""
    if p.task != "retrieval":
        raise UserError(f"{p.saved.directory} holds a {p.task or 'backbone (no task head)'} model; {NEEDS}")
    return p


def load_retrieval(source: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
                   spm: Optional[str] = None, allow_pickle: bool = False) -> Predictor:
    """A :class:`Predictor` of the retrieval model in ``source``: a saved folder or fine-tuning run,
    a checkpoint file (ours or unilm/beit3's; ``spm`` its SentencePiece model), or a registry name.
    Anything else, or a model without retrieval heads, raises ``UserError`` with one line."""
    source = os.fspath(source)
    if os.path.isdir(source):
        return check_retrieval(load_predictor(source, device))
    if os.path.isfile(source):
        return from_checkpoint(source, spm, device, allow_pickle)
    if os.sep not in source and not os.path.splitext(source)[1]:
        return _from_registry(source, spm, device)
    raise BadFileError(source, "not a saved model folder, a checkpoint file or a registry name "
                               "(`beit3 list-models --task retrieval`)")


def _from_registry(name: str, spm: Optional[str], device) -> Predictor:
    m = hub.info(name)  # an unknown name: one line with the close ones
    if m.task != "retrieval":
        raise UserError(f"{name} is a {m.task or 'backbone'} checkpoint; {NEEDS} "
                        f"(`beit3 list-models --task retrieval`)")
    spm = spm or hub.download("beit3.spm")
    preset = {"preset": m.preset, "img_size": m.img_size}
    return from_checkpoint(hub.download(name), spm, device, False, preset)


def from_checkpoint(path: str, spm: Optional[str], device: Union[str, torch.device] = "cpu",
                    allow_pickle: bool = False, preset: Optional[dict] = None) -> Predictor:
    """A Predictor over a checkpoint file with retrieval heads (an official ``*_retrieval.pth``, or a
    state dict of ours): the evaluation's square resize to the weights' image size, mean = std = 0.5,
    texts cut at 64 tokens as unilm/beit3 trains them. ``preset``: {"preset", "img_size"} of a
    registry entry (the head count is not in the weights)."""
    if spm is None:
        raise UserError(f"{path} is a checkpoint file, which carries no tokenizer: give its SentencePiece "
                        f"model (--spm; the official one: `beit3 download beit3.spm`)")
    tokenizer = _tokenizer(spm)
    try:
        loaded = load_backbone(path, (preset or {}).get("preset"), allow_pickle=allow_pickle,
                               img_size=(preset or {}).get("img_size"))
    except ValueError as e:
        raise BadFileError(path, first_line(e)) from None
    missing = [k for k in HEADS if k not in loaded.extras]
    if missing:
        raise BadFileError(path, f"has no retrieval head ({' and '.join(missing)} not found); {NEEDS}")
    cfg = loaded.config.replace(drop_path_rate=0.0)
    try:
        check_text_vocab(tokenizer.vocab_size, cfg.vocab_size, path)
    except ValueError as e:
        raise BadFileError(spm, first_line(e)) from None
    model = _retrieval_model(path, loaded, cfg)
    config = saved_config(model, vl_preprocess(cfg.img_size), inference={"max_text_len": OFFICIAL_TEXT_LEN},
                          tokenizer=True)
    config["tokenizer"] = os.path.abspath(spm)  # joined with the folder, an absolute path is itself
    saved = Pretrained(model, config, os.path.dirname(os.path.abspath(path)))
    model.pretrained = saved
    return Predictor(saved, device)


def _retrieval_model(path: str, loaded, cfg) -> RetrievalModel:
    def make() -> RetrievalModel:
        model = RetrievalModel(cfg)
        if not loaded.final_norm:  # normalize_output=False checkpoints
            model.beit3.norm = Multiway(nn.Identity)
        return model

    weights = {"beit3." + k: v for k, v in loaded.state_dict.items()}
    weights.update({k: loaded.extras[k] for k in HEADS})
    weights["logit_scale"] = loaded.extras.get("logit_scale", torch.zeros(()))  # not used by embeddings
    try:
        return build_loaded(make, weights).eval()
    except RuntimeError as e:
        raise BadFileError(path, f"does not fit a retrieval model: {first_line(e)}") from None


def _tokenizer(spm: str) -> TextTokenizer:
    if not os.path.isfile(spm):
        raise BadFileError(spm, "no such SentencePiece model file (--spm)")
    try:
        return TextTokenizer(spm)
    except ValueError as e:
        raise BadFileError(spm, f"not a usable SentencePiece model ({first_line(e)})") from None


def as_predictor(source: Source, device: Union[str, torch.device, None] = None) -> Predictor:
    """A retrieval :class:`Predictor` from a Predictor, a model loaded by ``from_pretrained`` (its
    ``pretrained`` record gives the transform and tokenizer) or a path / registry name."""
    if isinstance(source, Predictor):
        return check_retrieval(source)
    if isinstance(source, nn.Module):
        saved = getattr(source, "pretrained", None)
        if saved is None:
            raise UserError(f"a {type(source).__name__} without its saved folder: embeddings need the image "
                            f"preprocessing and tokenizer; load it with beit3.from_pretrained or load_predictor")
        here = next(source.parameters()).device
        return check_retrieval(Predictor(saved, device or here))
    return load_retrieval(source, device or "cpu")


# -- batches ---------------------------------------------------------------------------------------
@torch.no_grad()
def image_vectors(p: Predictor, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) transformed images -> (B, D) float32 l2-normalised features, on the CPU."""
    return p.model(image=pixels.to(p.device))["image"].float().cpu()


@torch.no_grad()
def text_vectors(p: Predictor, texts: Sequence[str]) -> torch.Tensor:
    """B non-empty texts -> (B, D) float32 l2-normalised features, on the CPU."""
    ids, pad = p.texts(texts)
    return p.model(text=ids, padding_mask=pad)["text"].float().cpu()


def decode_images(p: Predictor, images: Sequence[ImageInput], pool: Optional[Executor] = None
                  ) -> tuple[Optional[torch.Tensor], list[int], dict[int, str]]:
    """(pixels of the usable images or None, their positions in ``images``, {position: why} of the
    others). ``pool`` decodes in threads (PIL and the transforms release the GIL)."""
    results = list((pool.map if pool is not None else map)(lambda x: _try_image(p, x), images))
    kept = [i for i, r in enumerate(results) if isinstance(r, torch.Tensor)]
    bad = {i: r for i, r in enumerate(results) if not isinstance(r, torch.Tensor)}
    return (torch.stack([results[i] for i in kept]) if kept else None), kept, bad


def _try_image(p: Predictor, x: ImageInput) -> Union[torch.Tensor, str]:
    try:
        return p.image(x)
    except UserError as e:  # a missing, truncated or undecodable file, or one of another size
        return str(e)


def usable_texts(texts: Sequence[object]) -> tuple[list[int], dict[int, str]]:
    """(positions of the non-empty strings, {position: why} of the others)."""
    bad = {i: f"empty text: {t!r:.60}" if isinstance(t, str) else f"not a text: {t!r:.60}"
           for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()}
    return [i for i in range(len(texts)) if i not in bad], bad


# -- the Python API --------------------------------------------------------------------------------
def embed_images(model_or_predictor: Source, images: Sequence[ImageInput], batch_size: int = 32) -> torch.Tensor:
    """(N, D) float32 l2-normalised image features, ``batch_size`` images per forward. Images as
    ``Predictor`` takes them (paths, URLs, PIL images, uint8 arrays, encoded bytes); one that cannot be
    read raises ``UserError`` naming it (``beit3 embed`` skips and counts them instead)."""
    p = as_predictor(model_or_predictor)
    _check_batch(batch_size, images)
    out = [image_vectors(p, p.images(list(images[i:i + batch_size]))) for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, p.model.cfg.embed_dim)


def embed_texts(model_or_predictor: Source, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """(N, D) float32 l2-normalised text features, ``batch_size`` texts per forward (each padded to
    the longest of its batch; the padding is masked). An empty text raises ``UserError``."""
    if isinstance(texts, str):
        raise UserError("expected a list of texts, got one string")
    p = as_predictor(model_or_predictor)
    _check_batch(batch_size, texts)
    out = [text_vectors(p, list(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, p.model.cfg.embed_dim)


def _check_batch(batch_size: int, items: Sequence) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(items, Sequence):
        raise UserError(f"expected a list, got {type(items).__name__}")


__all__ = ["as_predictor", "check_retrieval", "decode_images", "embed_images", "embed_texts", "from_checkpoint",
           "image_vectors", "load_retrieval", "text_vectors", "usable_texts"]
