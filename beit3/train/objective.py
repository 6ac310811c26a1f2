"""The BEiT-3 pretraining objective: masked data modeling on images, texts and image-text pairs.

    images: predict the visual token (VQ-KD code) of every masked patch        (MIM head, D -> 8192)
    texts : predict the SentencePiece id of every masked token                 (MLM head, D -> vocab)
    pairs : predict masked text tokens with the image visible; optionally also
            masked image patches of the pair                                   (both heads)

Each part's loss is the mean cross entropy over its predicted tokens; the training loss is the mean
over the parts present in the batch. Optional BEiT v2 patch aggregation pretrains the CLS token: a
shallow 2-layer head sees the final CLS and an intermediate layer's patches and predicts the same
masked visual tokens through the shared MIM head.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..config import BEiT3Config
from ..model import BEiT3


def prepare_batch(batch: dict, vocab_size: int) -> dict:
    """The checks and index tensors of a pretraining batch that need its values, done on the CPU
    before the batch is moved (so the step on the device never waits for the host):

    * token ids outside ``[0, vocab_size)`` raise a ValueError naming the part;
    * a ``padding_mask`` with no padding is dropped (SDPA may then run a mask-free kernel);
    * ``image_mask_index`` / ``label_index``: the flat positions of the masked patches and of the
      text tokens to predict, so the heads gather a known number of rows instead of indexing with a
      boolean mask, whose result size the host would have to read back from the device.

    Returns a new dict; the tensors are shared with ``batch``."""
    out = {}
    for part, p in batch.items():
        p = dict(p)
        if "text" in p:
            ids = p["text"]
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
                bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
                raise ValueError(f"pretraining batch part {part!r} holds token id {bad}; expected ids in "
                                 f"[0, {vocab_size}) (does the SentencePiece model match the model's vocab_size?)")
            if p.get("padding_mask") is not None and not bool(p["padding_mask"].any()):
                p["padding_mask"] = None
            if "labels" in p:
                p["label_index"] = (p["labels"].reshape(-1) != -100).nonzero().squeeze(1)
        if p.get("image_mask") is not None:
            p["image_mask_index"] = p["image_mask"].reshape(-1).nonzero().squeeze(1)
        out[part] = p
    return out


def _gather(x: Tensor, index: Optional[Tensor], mask: Tensor) -> Tensor:
    """Rows of ``x`` (B, N, ...) where ``mask`` (B, N) is True, as (M, ...): through the flat
    ``index`` of ``prepare_batch`` when given (no device sync), else boolean indexing."""
    if index is None:
        return x[mask]
    return x.reshape(-1, *x.shape[2:]).index_select(0, index)


class PatchAggregation(nn.Module):
    def __init__(self, cfg: BEiT3Config, depth: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, mlp_ratio=cfg.ffn_dim / cfg.embed_dim, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps)) for _ in range(depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)

    def forward(self, cls: Tensor, patches: Tensor) -> Tensor:  # (B, 1, D), (B, N, D) -> (B, N, D)
        x = torch.cat([cls, patches], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 1:]


class MaskedDataModeling(nn.Module):
    """BEiT3 backbone (``.model``) + MLM and MIM heads. The visual tokenizer is *not* a submodule:
    it stays outside the DeepSpeed engine and its targets are passed in."""

    def __init__(self, cfg: BEiT3Config, num_visual_tokens: int = 8192, patch_aggregation: bool = False,
                 aggregation_layer: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        self.model = BEiT3(cfg)
        self.mlm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size)
        self.mim_head = nn.Linear(cfg.embed_dim, num_visual_tokens)
        self.aggregation_layer = None
        if patch_aggregation:
            # BEiT v2 takes layer 9 of 12 (3/4 of the depth).
            self.aggregation_layer = aggregation_layer if aggregation_layer is not None else cfg.depth * 3 // 4 - 1
            self.aggregation = PatchAggregation(cfg)
        for head in (self.mlm_head, self.mim_head):
            trunc_normal_(head.weight, std=cfg.init_std)
            nn.init.zeros_(head.bias)

    def forward(self, batch: dict, targets: dict) -> tuple[Tensor, dict]:
        """batch: the loader's dict of parts (see beit3.data.pretrain_loader); targets: part ->
        (B, N) long visual tokens for the parts whose images are masked. Returns the loss and
        detached metrics (loss/<part>, acc/<part>, and token counts)."""
        losses, metrics = [], {}
        if "images" in batch:
            p = batch["images"]
            out = self.model.forward_streams(image=p["image"], image_mask=p["image_mask"],
                                             out_layers=self._agg_layers())
            self._mim(out, p, targets["images"], "image", losses, metrics)
        if "texts" in batch:
            p = batch["texts"]
            out = self.model.forward_streams(text=p["text"], text_padding_mask=p.get("padding_mask"))
            self._mlm(out.text, p, "text", losses, metrics)
        if "pairs" in batch:
            p = batch["pairs"]
            mask = p.get("image_mask")
            out = self.model.forward_streams(image=p["image"], image_mask=mask, text=p["text"],
                                             text_padding_mask=p.get("padding_mask"))
            self._mlm(out.text, p, "pair", losses, metrics)
            if mask is not None and "pairs" in targets:
                self._mim(out, p, targets["pairs"], "pair_image", losses, metrics, aggregate=False)
        if not losses:
            raise ValueError("empty pretraining batch: no images, texts or pairs")
        loss = torch.stack(losses).mean()
        metrics["loss"] = loss.detach()
        return loss, metrics

    def _agg_layers(self) -> tuple:
        return () if self.aggregation_layer is None else (self.aggregation_layer,)

    def _mim(self, out, part: dict, target: Tensor, name: str, losses: list, metrics: dict,
             aggregate: bool = True) -> None:
        mask, index = part["image_mask"], part.get("image_mask_index")
        hidden = _gather(out.image[:, 1:], index, mask)  # (M, D) masked patches
        tgt = _gather(target, index, mask)
        logits = self.mim_head(hidden)
        self._record(logits, tgt, name, losses, metrics)
        if aggregate and self.aggregation_layer is not None:
            patches = out.hidden[self.aggregation_layer][0][:, 1:]
            agg = _gather(self.aggregation(out.image[:, :1], patches), index, mask)
            self._record(self.mim_head(agg), tgt, name + "_cls", losses, metrics)

    def _mlm(self, text_hidden: Tensor, part: dict, name: str, losses: list, metrics: dict) -> None:
        labels, index = part["labels"], part.get("label_index")
        sel = labels != -100 if index is None else None
        self._record(self.mlm_head(_gather(text_hidden, index, sel)), _gather(labels, index, sel), name,
                     losses, metrics)

    @staticmethod
    def _record(logits: Tensor, target: Tensor, name: str, losses: list, metrics: dict) -> None:
        loss = F.cross_entropy(logits.float(), target)
        losses.append(loss)
        metrics[f"loss/{name}"] = loss.detach()
        metrics[f"acc/{name}"] = (logits.detach().argmax(-1) == target).float().mean()
        metrics[f"tokens/{name}"] = torch.tensor(float(target.numel()))
