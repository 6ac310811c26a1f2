"""BEiT-3's vision and text paths as standalone encoders, holding only the weights each path uses.

An image-only input of BEiT-3 meets only the vision experts (A) of every layer, a text-only input
only the language experts (B); in the paper layout attention is shared and both paths use it. Each
path is then a plain pre-LN Transformer with Sub-LN: a timm ``VisionTransformer`` (``qkv_bias``,
``scale_attn_norm``, ``scale_mlp_norm``) for images, timm ``Block``s over a token table for text.
From a base checkpoint the vision encoder holds 85.9M parameters, the text encoder 135.1M (49.2M of
them the token table), against 221.0M for the whole released model.

Outputs (``EncoderFeatures``):
  tokens    every token after the final LayerNorm, as the full model returns them;
  pooled    vision: the CLS token after the final norm (``pool="cls"``, what the official retrieval
            head reads), or the mean of the patch tokens after it (``pool="mean"``);
            text: the first (BOS) token after the final norm;
  features  outputs of the layers in ``out_indices`` (in layer order), before the final norm (as
            BEiT's dense-task heads take them): vision (B, D, h, w) feature maps, text (B, L, D).
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from beit3.weights.official import load_backbone
from beit3.model.pretrained import build_loaded
from beit3.model.config import BEiT3Config
from beit3.model.embeddings import POS_OFFSET
from beit3.model.saved import WEIGHTS_FILE, read_config


@dataclass
class EncoderFeatures:
    tokens: Tensor  # (B, L, D) after the final norm
    pooled: Tensor  # (B, D)
    features: list = field(default_factory=list)  # per out_index: (B, D, h, w) vision, (B, L, D) text


def _mlp_ratio(cfg: BEiT3Config) -> float:
    ratio = cfg.ffn_dim / cfg.embed_dim
    if int(cfg.embed_dim * ratio) != cfg.ffn_dim:  # timm sizes the MLP as int(dim * mlp_ratio)
        raise ValueError(f"ffn_dim {cfg.ffn_dim} is not reproducible as int({cfg.embed_dim} * mlp_ratio)")
    return ratio


def _norm_layer(cfg: BEiT3Config):
    return functools.partial(nn.LayerNorm, eps=cfg.layer_norm_eps)


def timm_vit_kwargs(cfg: BEiT3Config, final_norm: bool = True) -> dict:
    """JSON-serialisable ``VisionTransformer`` arguments for the vision path; pass
    ``norm_layer=functools.partial(nn.LayerNorm, eps=cfg.layer_norm_eps)`` beside them (timm's
    string norm names all mean eps=1e-6)."""
    return dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
                depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=_mlp_ratio(cfg), qkv_bias=True,
                scale_attn_norm=True, scale_mlp_norm=True, class_token=True, no_embed_class=False,
                global_pool="token", fc_norm=False, final_norm=final_norm, num_classes=0)


def _text_blocks(cfg: BEiT3Config) -> nn.ModuleList:
    return nn.ModuleList(
        Block(cfg.embed_dim, cfg.num_heads, mlp_ratio=_mlp_ratio(cfg), qkv_bias=True, scale_attn_norm=True,
              scale_mlp_norm=True, norm_layer=_norm_layer(cfg)) for _ in range(cfg.depth))


# -- weights: our state dict -> one path -----------------------------------------------------------------
_BLOCK_NAMES = [  # ours (expert E) -> timm Block
    (r"layers\.(\d+)\.attn\.norm\.{E}\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"layers\.(\d+)\.attn\.qkv\.{E}\.(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"layers\.(\d+)\.attn\.inner_norm\.{E}\.(weight|bias)", r"blocks.\1.attn.norm.\2"),
    (r"layers\.(\d+)\.attn\.proj\.{E}\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"layers\.(\d+)\.ffn\.{F}\.norm\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"layers\.(\d+)\.ffn\.{F}\.fc1\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"layers\.(\d+)\.ffn\.{F}\.ffn_layernorm\.(weight|bias)", r"blocks.\1.mlp.norm.\2"),
    (r"layers\.(\d+)\.ffn\.{F}\.fc2\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"norm\.{F}\.(weight|bias)", r"norm.\1"),
]


def _path_blocks(sd: Mapping[str, Tensor], expert: str) -> dict[str, Tensor]:
    """The block and final-norm weights of one path: expert "A" (vision) or "B" (language); the paper
    layout's attention is "shared"."""
    attn = "(?:shared|" + expert + ")"
    table = [(re.compile(p.replace("{E}", attn).replace("{F}", expert) + "$"), r) for p, r in _BLOCK_NAMES]
    out = {}
    for key, value in sd.items():
        for pattern, repl in table:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
    return out


def vision_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our BEiT3 state dict -> timm ``VisionTransformer`` state dict of the vision path."""
    pos = sd["vision_embed.pos_embed"][POS_OFFSET:]  # CLS + patches: the rows the model reads
    return {"cls_token": sd["vision_embed.cls_token"], "pos_embed": pos.unsqueeze(0),
            "patch_embed.proj.weight": sd["vision_embed.proj.weight"],
            "patch_embed.proj.bias": sd["vision_embed.proj.bias"], **_path_blocks(sd, "A")}


def text_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our BEiT3 state dict -> ``TextEncoder`` state dict of the language path."""
    return {"tokens.weight": sd["text_embed.tokens.weight"], "pos_embed": sd["text_embed.pos_embed"][POS_OFFSET:],
            **_path_blocks(sd, "B")}


# -- the encoders -------------------------------------------------------------------------------------------
class VisionEncoder(nn.Module):
    """The vision path: a timm ``VisionTransformer`` (``.vit``) with BEiT-3's Sub-LN blocks."""

    def __init__(self, cfg: BEiT3Config, out_indices: Sequence[int] = (), pool: str = "cls",
                 final_norm: bool = True):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool={pool!r}: expected 'cls' or 'mean'")
        _check_indices(out_indices, cfg.depth)
        self.cfg, self.pool, self.out_indices = cfg, pool, sorted(set(out_indices))
        self.vit = VisionTransformer(**timm_vit_kwargs(cfg, final_norm), norm_layer=_norm_layer(cfg))

    def forward(self, image: Tensor) -> EncoderFeatures:
        """image: (B, C, H, W) at ``cfg.img_size``."""
        if self.out_indices:
            tokens, maps = self.vit.forward_intermediates(image, indices=self.out_indices, norm=False,
                                                          output_fmt="NCHW")
        else:
            tokens, maps = self.vit.forward_features(image), []
        pooled = tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)
        return EncoderFeatures(tokens, pooled, list(maps))


    def forward_intermediates(self, image: Tensor, indices: Union[int, Sequence[int], None] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's ``VisionTransformer.forward_intermediates``: the patch tokens of the ``indices``
        layers (int: the last n; list: those) as (B, D, h, w) maps (``output_fmt="NLC"``: (B, N, D)),
        before the final norm unless ``norm``; with the final tokens unless ``intermediates_only``."""
        return self.vit.forward_intermediates(image, indices=indices, return_prefix_tokens=return_prefix_tokens,
                                              norm=norm, stop_early=stop_early, output_fmt=output_fmt,
                                              intermediates_only=intermediates_only)

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False) -> list[int]:
        """Drop the layers after the last of ``indices`` (and the final norm with ``prune_norm``), as
        timm's; returns the absolute indices kept. ``forward`` then returns the pruned model's tokens."""
        kept = self.vit.prune_intermediate_layers(list(indices) if not isinstance(indices, int) else indices,
                                                  prune_norm=prune_norm)
        self.out_indices = [i for i in self.out_indices if i < len(self.vit.blocks)]
        return kept


class TextEncoder(nn.Module):
    """The language path: token and position tables, timm ``Block``s with Sub-LN, a final norm."""

    def __init__(self, cfg: BEiT3Config, out_indices: Sequence[int] = (), final_norm: bool = True):
        super().__init__()
        _check_indices(out_indices, cfg.depth)
        self.cfg, self.out_indices = cfg, sorted(set(out_indices))
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.max_text_len, cfg.embed_dim))  # position p at row p
        self.blocks = _text_blocks(cfg)
        self.norm = _norm_layer(cfg)(cfg.embed_dim) if final_norm else nn.Identity()

    def forward(self, text: Tensor, padding_mask: Optional[Tensor] = None) -> EncoderFeatures:
        """text: (B, L) ids; padding_mask: (B, L) bool, True = padding (never attended, zeroed input)."""
        if text.shape[1] > self.pos_embed.shape[0]:
            raise ValueError(f"text has {text.shape[1]} tokens; at most {self.pos_embed.shape[0]} fit")
        x = self.tokens(text) + self.pos_embed[: text.shape[1]]  # (B, L, D)
        mask = None
        # An ONNX graph takes the masked path whatever the mask holds (the eager shortcut is data-dependent).
        if padding_mask is not None and (torch.onnx.is_in_onnx_export() or bool(padding_mask.any())):
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
            mask = (~padding_mask)[:, None, None, :]  # (B, 1, 1, L), True = may attend
        features = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, attn_mask=mask)
            if i in self.out_indices:
                features.append(x)
        x = self.norm(x)
        return EncoderFeatures(x, x[:, 0], features)


def _check_indices(out_indices: Sequence[int], depth: int) -> None:
    bad = [i for i in out_indices if not 0 <= i < depth]
    if bad:
        raise ValueError(f"out_indices {bad} outside the model's layers [0, {depth})")


# -- builders ---------------------------------------------------------------------------------------------
Source = Union[str, Mapping[str, Tensor], nn.Module]


def saved_model_weights(checkpoint: Source, preset_or_config: Union[str, BEiT3Config, None]):
    """A saved-model folder (``save_pretrained``, a fine-tuning run's ``best/``, a pretraining run's
    ``final/``), or a run folder holding one, as (its weights file, its config unless one is given);
    any other source as it is (a DeepSpeed checkpoint directory, a file, a state dict)."""
    if not isinstance(checkpoint, (str, os.PathLike)) or not os.path.isdir(checkpoint):
        return checkpoint, preset_or_config
    for sub in ("", "best", "final"):
        folder = os.path.join(checkpoint, sub)
        if os.path.isfile(os.path.join(folder, WEIGHTS_FILE)):
            saved = read_config(folder)
            found = BEiT3Config.from_dict(saved["model"])
            return os.path.join(folder, saved.get("weights", WEIGHTS_FILE)), preset_or_config or found
    return checkpoint, preset_or_config


def vision_encoder(checkpoint: Source, preset_or_config: Union[str, BEiT3Config, None] = None,
                   out_indices: Optional[Sequence[int]] = None, pool: str = "cls", img_size: Optional[int] = None,
                   allow_pickle: bool = False, prefix: Optional[str] = None) -> VisionEncoder:
    """The vision path of ``checkpoint`` (a ``BEiT3``, one of our state dicts or files, a saved-model or
    run folder, an official checkpoint or a DeepSpeed directory), in eval mode. ``img_size`` overrides
    the config's image size (patch positions interpolated). ``preset_or_config`` None infers the sizes
    from the weights (``num_heads`` from the preset of that width)."""
    checkpoint, preset_or_config = saved_model_weights(checkpoint, preset_or_config)
    loaded = load_backbone(checkpoint, preset_or_config, allow_pickle, prefix, img_size=img_size, path="vision")
    make = functools.partial(VisionEncoder, loaded.config, out_indices or (), pool, loaded.final_norm)
    return build_loaded(make, {"vit." + k: v for k, v in vision_state_dict(loaded.state_dict).items()}).eval()


def text_encoder(checkpoint: Source, preset_or_config: Union[str, BEiT3Config, None] = None,
                 out_indices: Optional[Sequence[int]] = None, allow_pickle: bool = False,
                 prefix: Optional[str] = None) -> TextEncoder:
    """The language path of ``checkpoint`` (as ``vision_encoder``), in eval mode."""
    checkpoint, preset_or_config = saved_model_weights(checkpoint, preset_or_config)
    loaded = load_backbone(checkpoint, preset_or_config, allow_pickle, prefix, path="text")
    make = functools.partial(TextEncoder, loaded.config, out_indices or (), loaded.final_norm)
    return build_loaded(make, text_state_dict(loaded.state_dict)).eval()


__all__ = ["EncoderFeatures", "TextEncoder", "VisionEncoder", "saved_model_weights", "text_encoder", "text_state_dict",
           "timm_vit_kwargs", "vision_encoder", "vision_state_dict"]
