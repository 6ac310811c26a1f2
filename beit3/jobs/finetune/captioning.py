"""Image captioning's training as unilm/beit3 does it: UniLM-style masked caption training.

``mask_caption`` replaces a share of the caption's tokens (80% [MASK], 10% random, 10% kept), which
are predicted under the captioning attention mask (text -> image full, text -> text causal, see
``beit3.model.heads.captioning_attention_mask``); ``caption_loss`` is label-smoothed and, late in
training, drops the worst 20% of tokens (``BertCaptioningLoss``). Decoding is the library's
(``beit3.model.generation``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

CAPTION_MASK_PROB = 0.6  # run_beit3_finetuning.py --captioning_mask_prob default (the recipes use 0.7)


def mask_caption(ids: Tensor, padding_mask: Tensor, mask_prob: float, mask_id: int, vocab_size: int,
                 generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """unilm/beit3 ``CaptioningDataset._masking_on_text_tokens`` on a padded batch.

    A caption of n tokens ``[<s>] w1 .. wk [</s>]`` gets exactly clamp(round(n * mask_prob), 1, n - 1)
    positions chosen among 1..n-1: the ``</s>`` can be chosen (so the model learns to stop), ``<s>``
    never. Chosen tokens become ``mask_id`` (80%), a random ordinary id (10%) or stay (10%).

    ids, padding_mask: (B, L). Returns ``inputs`` (B, L) long and ``masked_pos`` (B, L) bool.
    """
    if not 0.0 < mask_prob <= 1.0:
        raise ValueError(f"mask_prob must lie in (0, 1], got {mask_prob}")
    if not 4 < mask_id < vocab_size:
        raise ValueError(f"mask_id={mask_id} must lie in (4, vocab_size={vocab_size})")
    n = (~padding_mask).sum(dim=1)  # (B,)
    if int(n.min()) < 2:
        raise ValueError("every caption needs at least <s> and one more token to mask")
    k = torch.clamp(torch.floor(n.double() * mask_prob + 0.5).long(), min=1)
    k = torch.minimum(k, n - 1)
    score = torch.rand(ids.shape, generator=generator, device=ids.device)
    score[:, 0] = 2.0  # never <s>
    score = score.masked_fill(padding_mask, 3.0)  # never padding
    rank = score.argsort(dim=1).argsort(dim=1)  # 0 = smallest score
    masked_pos = rank < k[:, None]
    action = torch.rand(ids.shape, generator=generator, device=ids.device)
    random_ids = torch.randint(4, mask_id, ids.shape, generator=generator, device=ids.device)  # not <s> <pad> </s> <unk>
    inputs = torch.where(masked_pos & (action < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(masked_pos & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return inputs, masked_pos


def caption_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.1, drop_worst_ratio: float = 0.0) -> Tensor:
    """``BertCaptioningLoss``: KL divergence to the smoothed one-hot target ((1 - eps) on the
    label, eps / (V - 1) elsewhere) per token; optionally the ``drop_worst_ratio`` share of tokens
    with the largest loss is left out (unilm/beit3 does so after ``--drop_worst_after`` steps).

    logits: (M, V); targets: (M,) long.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    V = logits.shape[-1]
    eps = label_smoothing
    smooth = torch.full_like(logp, eps / (V - 1)).scatter_(1, targets[:, None], 1.0 - eps)
    loss = F.kl_div(logp, smooth, reduction="none").sum(dim=1)  # (M,)
    if drop_worst_ratio > 0:
        keep = int(loss.shape[0] * (1 - drop_worst_ratio))
        loss = loss.topk(max(keep, 1), largest=False).values
    return loss.mean()
