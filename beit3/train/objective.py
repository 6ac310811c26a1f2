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
            self._mim(out, p["image_mask"], targets["images"], "image", losses, metrics)
        if "texts" in batch:
            p = batch["texts"]
            out = self.model.forward_streams(text=p["text"], text_padding_mask=p["padding_mask"])
            self._mlm(out.text, p["labels"], "text", losses, metrics)
        if "pairs" in batch:
            p = batch["pairs"]
            mask = p.get("image_mask")
            out = self.model.forward_streams(image=p["image"], image_mask=mask, text=p["text"],
                                             text_padding_mask=p["padding_mask"])
            self._mlm(out.text, p["labels"], "pair", losses, metrics)
            if mask is not None and "pairs" in targets:
                self._mim(out, mask, targets["pairs"], "pair_image", losses, metrics, aggregate=False)
        if not losses:
            raise ValueError("empty pretraining batch: no images, texts or pairs")
        loss = torch.stack(losses).mean()
        metrics["loss"] = loss.detach()
        return loss, metrics

    def _agg_layers(self) -> tuple:
        return () if self.aggregation_layer is None else (self.aggregation_layer,)

    def _mim(self, out, mask: Tensor, target: Tensor, name: str, losses: list, metrics: dict,
             aggregate: bool = True) -> None:
        hidden = out.image[:, 1:][mask]  # (M, D) masked patches
        tgt = target[mask]
        logits = self.mim_head(hidden)
        self._record(logits, tgt, name, losses, metrics)
        if aggregate and self.aggregation_layer is not None:
            patches = out.hidden[self.aggregation_layer][0][:, 1:]
            agg = self.aggregation(out.image[:, :1], patches)[mask]
            self._record(self.mim_head(agg), tgt, name + "_cls", losses, metrics)

    def _mlm(self, text_hidden: Tensor, labels: Tensor, name: str, losses: list, metrics: dict) -> None:
        sel = labels != -100
        self._record(self.mlm_head(text_hidden[sel]), labels[sel], name, losses, metrics)

    @staticmethod
    def _record(logits: Tensor, target: Tensor, name: str, losses: list, metrics: dict) -> None:
        loss = F.cross_entropy(logits.float(), target)
        losses.append(loss)
        metrics[f"loss/{name}"] = loss.detach()
        metrics[f"acc/{name}"] = (logits.detach().argmax(-1) == target).float().mean()
        metrics[f"tokens/{name}"] = torch.tensor(float(target.numel()))
