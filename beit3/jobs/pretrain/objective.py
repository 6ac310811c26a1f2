"""The BEiT-3 pretraining objective: masked data modeling on images, texts and image-text pairs.

    images: predict the visual token (VQ-KD code) of every masked patch        (MIM head, D -> 8192)
    texts : predict the SentencePiece id of every masked token                 (MLM head, D -> vocab)
    pairs : predict masked text tokens with the image visible; optionally also
            masked image patches of the pair                                   (both heads)

Each part's loss is the mean cross entropy over its predicted tokens; the training loss is the mean
over the parts present in the batch. Optional BEiT v2 patch aggregation pretrains the CLS token: a
shallow 2-layer head sees the last layer's CLS and an early layer's patches and predicts the same
masked visual tokens through the shared final norm and MIM head; its loss is added to the image
part's, as beit2 adds it.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from beit3.model.config import BEiT3Config
from beit3.model import BEiT3
from beit3.model.init import trunc_normal_


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
    """BEiT v2's CLS pretraining head (unilm/beit2 ``VisionTransformerForMaskedImageModelingCLS``):
    two transformer blocks over [last layer's CLS | patches after ``early_layers`` layers], both
    before any final norm; their output goes through the backbone's final norm and the shared MIM
    head (``shared_lm_head=True``).

    As there, the blocks keep PyTorch's default initialisation (beit2 builds them after its
    ``_init_weights`` pass) and their attention output and fc2 weights are divided by
    sqrt(2 (early_layers + i + 1)); their drop path continues the backbone's linear rule. Unlike
    beit2's blocks they have no layer scale, as the BEiT-3 backbone has none.
    """

    def __init__(self, cfg: BEiT3Config, early_layers: int, depth: int = 2):
        super().__init__()
        n = max(cfg.depth, early_layers + depth)
        rates = [cfg.drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # beit2: linspace(0, dpr, n)
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, mlp_ratio=cfg.ffn_dim / cfg.embed_dim, qkv_bias=True,
                  drop_path=rates[early_layers + i], norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps))
            for i in range(depth))
        with torch.no_grad():
            for i, blk in enumerate(self.blocks):
                blk.attn.qkv.bias.zero_()  # beit2's q_bias and v_bias start at 0 (it has no k bias)
                blk.attn.proj.weight.div_(math.sqrt(2.0 * (early_layers + i + 1)))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (early_layers + i + 1)))

    def forward(self, cls: Tensor, patches: Tensor) -> Tensor:  # (B, 1, D), (B, N, D) -> (B, 1 + N, D)
        x = torch.cat([cls, patches], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return x


class MaskedDataModeling(nn.Module):
    """BEiT3 backbone (``.model``) + MLM and MIM heads. The visual tokenizer is *not* a submodule:
    it stays outside the DeepSpeed engine and its targets are passed in."""

    def __init__(self, cfg: BEiT3Config, num_visual_tokens: int = 8192, patch_aggregation: bool = False):
        super().__init__()
        self.cfg = cfg
        self.model = BEiT3(cfg)
        self.mlm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size)
        self.mim_head = nn.Linear(cfg.embed_dim, num_visual_tokens)
        self.early_layers = None
        if patch_aggregation:
            if cfg.early_layers > cfg.depth:
                raise ValueError(f"patch aggregation after {cfg.early_layers} layers, but the model has "
                                 f"{cfg.depth} (BEiT3Config.aggregation_early_layers)")
            self.early_layers = cfg.early_layers
            self.aggregation = PatchAggregation(cfg, self.early_layers)
        for head in (self.mlm_head, self.mim_head):
            trunc_normal_(head.weight, cfg.init_std)
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
        """Hidden states patch aggregation reads: the patches after ``early_layers`` layers and the
        last layer's CLS, both before the final norm (beit2's ``early_states`` and ``x[:, [0]]``)."""
        return () if self.early_layers is None else (self.early_layers - 1, self.cfg.depth - 1)

    def _mim(self, out, part: dict, target: Tensor, name: str, losses: list, metrics: dict,
             aggregate: bool = True) -> None:
        mask, index = part["image_mask"], part.get("image_mask_index")
        hidden = _gather(out.image[:, 1:], index, mask)  # (M, D) masked patches
        tgt = _gather(target, index, mask)
        loss = self._record(self.mim_head(hidden), tgt, name, metrics)
        if aggregate and self.early_layers is not None:
            cls = out.hidden[self.cfg.depth - 1][0][:, :1]
            patches = out.hidden[self.early_layers - 1][0][:, 1:]
            agg, _ = self.model.norm((self.aggregation(cls, patches), None))  # the shared final norm
            agg = _gather(agg[:, 1:], index, mask)
            # beit2 sums the two MIM losses (engine_for_pretraining: loss_1 + loss_2), so the image
            # part weighs as much as each other part and the CLS loss comes on top.
            loss = loss + self._record(self.mim_head(agg), tgt, name + "_cls", metrics)
        losses.append(loss)

    def _mlm(self, text_hidden: Tensor, part: dict, name: str, losses: list, metrics: dict) -> None:
        labels, index = part["labels"], part.get("label_index")
        sel = labels != -100 if index is None else None
        losses.append(self._record(self.mlm_head(_gather(text_hidden, index, sel)), _gather(labels, index, sel),
                                   name, metrics))

    @staticmethod
    def _record(logits: Tensor, target: Tensor, name: str, metrics: dict) -> Tensor:
        loss = F.cross_entropy(logits.float(), target)
        metrics[f"loss/{name}"] = loss.detach()
        metrics[f"acc/{name}"] = (logits.detach().argmax(-1) == target).float().mean()
        metrics[f"tokens/{name}"] = torch.tensor(float(target.numel()))
        return loss
