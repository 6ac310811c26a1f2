"""Reference models of the same size as a BEiT3Config, doing the same pretraining work.

* ``TorchscaleMDM``: the official BEiT-3 backbone (``torchscale.model.BEiT3``, the released
  layout: every projection and LayerNorm per modality, q/k/v as three matmuls, attention in plain
  bmm + softmax) with MLM and MIM heads as Linear layers on the masked tokens, the loss of
  ``beit3.jobs.pretrain.objective.MaskedDataModeling``.
* ``TimmMIM``: timm's ``VisionTransformer`` of the same vision width, depth, heads and FFN (fused
  SDPA attention), with the MIM head on the masked patches; image-only batches.

Both take ``forward(batch, targets) -> (loss, metrics)`` like our objective, so the trainers and
the FLOP count are shared.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from beit3.model.config import BEiT3Config


def _ce(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), target)


class TorchscaleMDM(nn.Module):
    def __init__(self, cfg: BEiT3Config, num_visual_tokens: int, checkpoint_activations: bool):
        super().__init__()
        with warnings.catch_warnings():  # torchscale imports timm's deprecated timm.models.layers
            warnings.simplefilter("ignore", FutureWarning)
            from torchscale.architecture.config import EncoderConfig  # optional: only --compare torchscale
            from torchscale.model.BEiT3 import BEiT3 as TorchscaleBEiT3  # optional: only --compare torchscale

        args = EncoderConfig(
            multiway=True, layernorm_embedding=False, normalize_output=True, no_output_layer=True,
            vocab_size=cfg.vocab_size, img_size=cfg.img_size, patch_size=cfg.patch_size,
            in_chans=cfg.in_chans, encoder_embed_dim=cfg.embed_dim, encoder_attention_heads=cfg.num_heads,
            encoder_ffn_embed_dim=cfg.ffn_dim, encoder_layers=cfg.depth,
            max_source_positions=cfg.max_text_positions, layernorm_eps=cfg.layer_norm_eps,
            drop_path_rate=0.0, checkpoint_activations=checkpoint_activations)
        self.beit3 = TorchscaleBEiT3(args)
        self.mlm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size)
        self.mim_head = nn.Linear(cfg.embed_dim, num_visual_tokens)
        self.num_image_tokens = 1 + cfg.num_patches

    @property
    def layers(self) -> nn.ModuleList:
        return self.beit3.encoder.layers

    def forward(self, batch: dict, targets: dict) -> tuple[Tensor, dict]:
        losses, N1 = [], self.num_image_tokens
        if "images" in batch:
            p = batch["images"]
            x = self.beit3(visual_tokens=p["image"], vision_masked_position=p["image_mask"])["encoder_out"]
            losses.append(self._mim(x[:, 1:N1], p["image_mask"], targets["images"]))
        if "texts" in batch:
            p = batch["texts"]
            x = self.beit3(textual_tokens=p["text"], text_padding_position=p.get("padding_mask"))["encoder_out"]
            losses.append(self._mlm(x, p["labels"]))
        if "pairs" in batch:
            p = batch["pairs"]
            mask = p.get("image_mask")
            x = self.beit3(textual_tokens=p["text"], visual_tokens=p["image"], vision_masked_position=mask,
                           text_padding_position=p.get("padding_mask"))["encoder_out"]  # (B, N1 + Lt, D)
            losses.append(self._mlm(x[:, N1:], p["labels"]))
            if mask is not None and "pairs" in targets:
                losses.append(self._mim(x[:, 1:N1], mask, targets["pairs"]))
        return torch.stack(losses).mean(), {}

    def _mim(self, patches: Tensor, mask: Tensor, target: Tensor) -> Tensor:
        return _ce(self.mim_head(patches[mask]), target[mask])

    def _mlm(self, text: Tensor, labels: Tensor) -> Tensor:
        sel = labels != -100
        return _ce(self.mlm_head(text[sel]), labels[sel])


def timm_mlp_ratio(cfg: BEiT3Config) -> float:
    """timm's Mlp hidden size is int(dim * mlp_ratio): the ratio that gives exactly ffn_dim."""
    ratio = cfg.ffn_dim / cfg.embed_dim
    if int(cfg.embed_dim * ratio) != cfg.ffn_dim:
        ratio = (cfg.ffn_dim + 0.5) / cfg.embed_dim
    return ratio


class TimmMIM(nn.Module):
    def __init__(self, cfg: BEiT3Config, num_visual_tokens: int, grad_checkpointing: bool):
        super().__init__()
        self.vit = VisionTransformer(
            img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=0,
            embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=timm_mlp_ratio(cfg),
            qkv_bias=True, class_token=True, global_pool="token")
        self.vit.set_grad_checkpointing(grad_checkpointing)
        self.mim_head = nn.Linear(cfg.embed_dim, num_visual_tokens)

    @property
    def layers(self) -> nn.Sequential:
        return self.vit.blocks

    @property
    def fused_attn(self) -> bool:
        return bool(self.vit.blocks[0].attn.fused_attn)

    def forward(self, batch: dict, targets: dict) -> tuple[Tensor, dict]:
        if set(batch) != {"images"}:
            raise ValueError(f"TimmMIM takes image-only batches; got parts {sorted(batch)}")
        p = batch["images"]
        # timm's ViT has no mask token: the masked patches stay visible. The matmuls are the same.
        x = self.vit.forward_features(p["image"])  # (B, 1 + N, D), final norm applied
        mask = p["image_mask"]
        return _ce(self.mim_head(x[:, 1:][mask]), targets["images"][mask]), {}
