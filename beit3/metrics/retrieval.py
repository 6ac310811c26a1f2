"""Image-text retrieval recall (COCO / Flickr30k R@1/5/10), with the similarity built in chunks."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


@torch.no_grad()
def retrieval_recall(image_feats: Tensor, text_feats: Tensor, text_to_image: Tensor,
                     ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024) -> dict[str, float]:
    """Recall@k in both directions, as fractions in [0, 1].

    image_feats: (Ni, D), one row per distinct image; text_feats: (Nt, D); text_to_image: (Nt,)
    long, the row of each text's image. Similarity is the dot product, so pass normalised
    features for cosine similarity. An image->text query hits when any of its texts is in the
    top k; a text->image query when its image is. Only ``chunk_size`` rows of the (Ni, Nt)
    similarity exist at a time, on the device of the features (5k x 25k never materialises).

    Returns ``i2t_r{k}`` and ``t2i_r{k}`` for each k, and ``mean_recall`` (their mean, the
    "average score" unilm/beit3 selects checkpoints by).
    """
    _check_inputs(image_feats, text_feats, text_to_image, ks, chunk_size)
    text_to_image = text_to_image.to(image_feats.device)
    i2t = _image_to_text_hits(image_feats, text_feats, text_to_image, max(ks), chunk_size)
    t2i = _text_to_image_hits(image_feats, text_feats, text_to_image, max(ks), chunk_size)
    out = {}
    for name, hits in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            # Hit ranks are 0-based; a query whose hit lies beyond max(ks) carries max(ks).
            out[f"{name}_r{k}"] = (hits < k).double().mean().item()
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


def _image_to_text_hits(image_feats: Tensor, text_feats: Tensor, text_to_image: Tensor,
                        kmax: int, chunk_size: int) -> Tensor:
    """(Ni,) rank of the best-ranked matching text for each image, capped at ``kmax``."""
    k = min(kmax, text_feats.shape[0])
    ranks = []
    for start in range(0, image_feats.shape[0], chunk_size):
        sim = image_feats[start:start + chunk_size] @ text_feats.T  # (c, Nt)
        top = sim.topk(k, dim=1).indices  # (c, k)
        rows = torch.arange(start, start + sim.shape[0], device=sim.device)
        ranks.append(_first_hit(text_to_image[top] == rows[:, None], kmax))
    return torch.cat(ranks)


def _text_to_image_hits(image_feats: Tensor, text_feats: Tensor, text_to_image: Tensor,
                        kmax: int, chunk_size: int) -> Tensor:
    """(Nt,) rank of each text's image among all images, capped at ``kmax``."""
    k = min(kmax, image_feats.shape[0])
    ranks = []
    for start in range(0, text_feats.shape[0], chunk_size):
        sim = text_feats[start:start + chunk_size] @ image_feats.T  # (c, Ni)
        top = sim.topk(k, dim=1).indices  # (c, k)
        target = text_to_image[start:start + sim.shape[0]]
        ranks.append(_first_hit(top == target[:, None], kmax))
    return torch.cat(ranks)


def _first_hit(hit: Tensor, kmax: int) -> Tensor:
    """hit: (c, k) bool -> (c,) index of the first True, or ``kmax`` when none."""
    pos = torch.arange(hit.shape[1], device=hit.device).expand_as(hit)
    return torch.where(hit, pos, kmax).min(dim=1).values.cpu()


def _check_inputs(image_feats: Tensor, text_feats: Tensor, text_to_image: Tensor,
                  ks: Sequence[int], chunk_size: int) -> None:
    if image_feats.dim() != 2 or text_feats.dim() != 2 or image_feats.shape[1] != text_feats.shape[1]:
        raise ValueError(f"need image_feats (Ni, D) and text_feats (Nt, D), got "
                         f"{tuple(image_feats.shape)} and {tuple(text_feats.shape)}")
    n_img, n_txt = image_feats.shape[0], text_feats.shape[0]
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"retrieval needs at least one image and one text, got {n_img} and {n_txt}")
    if text_to_image.shape != (n_txt,) or text_to_image.dtype != torch.long:
        raise ValueError(f"text_to_image must be a long tensor of shape ({n_txt},), got "
                         f"{text_to_image.dtype} {tuple(text_to_image.shape)}")
    if text_to_image.min() < 0 or text_to_image.max() >= n_img:
        raise ValueError(f"text_to_image values must lie in [0, {n_img}), got "
                         f"[{text_to_image.min().item()}, {text_to_image.max().item()}]")
    orphans = (torch.bincount(text_to_image.cpu(), minlength=n_img) == 0).nonzero().flatten()
    if len(orphans):
        raise ValueError(f"{len(orphans)} images have no text (e.g. rows {orphans[:5].tolist()}); "
                         "image->text recall would count them as misses")
    if not ks or min(ks) < 1 or chunk_size < 1:
        raise ValueError(f"ks must be positive ints and chunk_size >= 1, got ks={ks}, chunk_size={chunk_size}")
