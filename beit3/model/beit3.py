"""BEiT-3: a Multiway Transformer over image patches and text tokens.

One model, several modes, chosen by the inputs of each call:

    model(image=x)                                   vision encoder   -> (B, 1 + N, D)
    model(text=ids, text_padding_mask=pad)           text encoder     -> (B, L, D)
    model(image=x, text=ids, text_padding_mask=pad)  fusion encoder   -> (B, 1 + N + L, D), image first
    two separate calls                               dual encoder (retrieval)

``forward_streams`` returns the image and text streams separately (no final concatenation) and
optionally the hidden states of chosen layers; heads and the pretraining objective use it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from beit3.model.config import BEiT3Config
from beit3.model.block import MultiwayBlock
from beit3.model.activation_checkpointing import CHECKPOINT_MODES, checkpoint_block
from beit3.model.embeddings import TextEmbedding, VisionEmbedding
from beit3.model.init import subln_scale, trunc_normal_
from beit3.model.intermediates import Indices, vision_intermediates
from beit3.model.multiway import Multiway, Streams, join
from beit3.model.saved import save_pretrained


@dataclass
class EncoderOutput:
    image: Optional[Tensor]  # (B, 1 + N, D) after the final LayerNorm
    text: Optional[Tensor]  # (B, L, D)
    hidden: dict = field(default_factory=dict)  # layer index -> Streams, before the final norm

    @property
    def joined(self) -> Tensor:
        return join((self.image, self.text))


class BEiT3(nn.Module):
    def __init__(self, cfg: BEiT3Config):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.vision_embed = VisionEmbedding(cfg.img_size, cfg.patch_size, cfg.in_chans, d)
        self.text_embed = TextEmbedding(cfg.vocab_size, d, cfg.max_text_positions)
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear
        self.layers = nn.ModuleList(MultiwayBlock(cfg, i, rates[i]) for i in range(cfg.depth))
        self.norm = Multiway(lambda: nn.LayerNorm(d, eps=cfg.layer_norm_eps))  # encoder.layer_norm
        self.checkpoint_every = 0  # activation checkpointing: every k-th layer, 0 = off
        self.checkpoint_mode = "full"  # what a checkpointed layer keeps: see set_grad_checkpointing
        self.init_weights()

    # -- initialisation ------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """BEiT / BEiT v2 pretraining's scheme, carried over to the text tables: linear, conv and
        embedding weights, the position tables and the CLS/mask tokens from a normal of std
        ``init_std`` cut at +-std (``beit3.model.init``); zero biases; LayerNorm 1/0. unilm/beit3 and
        torchscale initialise embeddings, position tables, the patch conv and the tokens otherwise
        (docs/model.md).
        With ``subln_init_scale`` the fc1/fc2/v/out weights and biases are then multiplied by
        sqrt(log 2N): torchscale's Sub-LN (Magneto) initialisation, the pretraining default."""
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                trunc_normal_(m.weight, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.vision_embed.cls_token, self.vision_embed.mask_token,
                  self.vision_embed.pos_embed, self.text_embed.pos_embed):
            trunc_normal_(p, std)
        if self.cfg.subln_init_scale:
            self._subln_scale(subln_scale(self.cfg.depth))

    def _subln_scale(self, s: float) -> None:
        d = self.cfg.embed_dim
        for layer in self.layers:
            for qkv in set(layer.attn.qkv.experts):
                qkv.weight[2 * d:].mul_(s)  # the v rows of the fused projection
                qkv.bias[2 * d:].mul_(s)
            ffns = [*set(layer.ffn.experts)] + ([layer.ffn_vl] if layer.ffn_vl is not None else [])
            linears = [p for p in set(layer.attn.proj.experts)] + [f.fc1 for f in ffns] + [f.fc2 for f in ffns]
            for lin in linears:
                lin.weight.mul_(s)
                lin.bias.mul_(s)

    # -- activation checkpointing ---------------------------------------------------------------
    def save_pretrained(self, directory: str, **files) -> str:
        """A self-contained folder (config.json, model.safetensors, optionally the tokenizer and the
        image preprocessing: ``beit3.model.pretrained.save_pretrained``); ``beit3.from_pretrained`` loads it."""
        return save_pretrained(self, directory, **files)

    def set_grad_checkpointing(self, enable: bool = True, every: int = 1, mode: str = "full") -> None:
        """Recompute every ``every``-th layer in backward (0 / False = off).

        mode "full": a checkpointed layer keeps only its input and backward runs its forward again
        (one more forward's matmul FLOPs). "selective": it also keeps its matmul and attention
        outputs and backward recomputes only the LayerNorms, GELU and adds, no matmul. Measured in
        tests/test_selective_checkpoint.py: selective keeps ~53% of the activations of no
        checkpointing, full ~6%.
        """
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"activation checkpointing mode {mode!r}: expected one of {CHECKPOINT_MODES}")
        if enable and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"activation checkpointing every {every!r} layers: expected an integer >= 1")
        self.checkpoint_every = every if enable else 0
        self.checkpoint_mode = mode

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, image: Optional[Tensor] = None, text: Optional[Tensor] = None,
                text_padding_mask: Optional[Tensor] = None, image_mask: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None) -> Tensor:
        """Final hidden states (B, L, D), image tokens first in fusion."""
        return self.forward_streams(image, text, text_padding_mask, image_mask, attn_mask).joined

    def forward_streams(self, image: Optional[Tensor] = None, text: Optional[Tensor] = None,
                        text_padding_mask: Optional[Tensor] = None, image_mask: Optional[Tensor] = None,
                        attn_mask: Optional[Tensor] = None, out_layers: Sequence[int] = (),
                        kv_cache: Optional[list] = None, text_start: int = 0,
                        fusion: Optional[bool] = None, num_layers: Optional[int] = None) -> EncoderOutput:
        """
        image: (B, C, H, W) float; text: (B, L) long; text_padding_mask: (B, L) bool, True = padding.
        image_mask: (B, N) bool, True = patch replaced by the mask token (masked image modeling).
        attn_mask: bool (L, L) or (B, L, L) over the joined sequence, True = may attend (as SDPA);
            e.g. causal text for captioning.
        out_layers: layer indices whose outputs (before the final norm) are returned in ``hidden``.
        kv_cache / text_start / fusion: incremental decoding (see beit3.jobs.finetune captioning): a list
            with one dict per layer, the position of the first text token, and whether the cached
            context holds an image (routes to the VL-FFN).
        num_layers: run only the first this many layers (dense features that stop early).
        """
        self._check_inputs(image, text, text_padding_mask, image_mask)
        img = None if image is None else self.vision_embed(image, image_mask)
        txt = None if text is None else self.text_embed(text, text_start)
        if txt is not None and text_padding_mask is not None:
            txt = txt.masked_fill(text_padding_mask.unsqueeze(-1), 0.0)  # as torchscale
        xs: Streams = (img, txt)
        mask = self._attention_mask(xs, text_padding_mask, attn_mask)
        if fusion is None:
            fusion = img is not None and txt is not None
        hidden = {}
        layers = self.layers if num_layers is None else self.layers[:num_layers]
        for i, layer in enumerate(layers):
            cache = None if kv_cache is None else kv_cache[i]
            if self.checkpoint_every and self.training and i % self.checkpoint_every == 0 and cache is None:
                xs = checkpoint_block(layer, xs, mask, fusion, self.checkpoint_mode)
            else:
                xs = layer(xs, mask, fusion, cache)
            if i in out_layers:
                hidden[i] = xs
        img, txt = self.norm(xs)
        return EncoderOutput(img, txt, hidden)

    def forward_intermediates(self, image: Tensor, indices: Indices = None, return_prefix_tokens: bool = False,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """The vision path's patch tokens of the ``indices`` layers as (B, D, h, w) maps, with the
        arguments of timm's ``forward_intermediates`` (``beit3.model.intermediates``)."""
        return vision_intermediates(self, image, indices, return_prefix_tokens, norm, stop_early, output_fmt,
                                    intermediates_only)

    @staticmethod
    def _attention_mask(xs: Streams, text_padding_mask: Optional[Tensor],
                        attn_mask: Optional[Tensor]) -> Optional[Tensor]:
        """Boolean SDPA mask (B, 1, Lq, Lk) or None, True = may attend; padded keys never attended."""
        mask = None
        # A mask whenever a padding mask is given: asking the device whether any token is padding
        # would make the host wait for it every step. Callers with no padding pass None (as
        # ``beit3.jobs.pretrain.objective.prepare_batch`` does), which lets SDPA take a mask-free kernel.
        if text_padding_mask is not None:
            keep = ~text_padding_mask  # (B, Lt)
            if xs[0] is not None:
                keep = torch.cat([keep.new_ones(keep.shape[0], xs[0].shape[1]), keep], dim=1)
            mask = keep[:, None, None, :]  # (B, 1, 1, L)
        if attn_mask is not None:
            am = attn_mask.bool()
            am = am[None, None] if am.dim() == 2 else am[:, None]  # (B|1, 1, Lq, Lk)
            mask = am if mask is None else mask & am
        return mask

    def _check_inputs(self, image, text, text_padding_mask, image_mask) -> None:
        """Shapes and dtypes only: reading values (are the token ids in range?) would make the host
        wait for the device every step. The data path checks values on the CPU before the batch
        moves (``beit3.jobs.pretrain.objective.prepare_batch``; the tokenizers produce ids in range)."""
        cfg = self.cfg
        if image is None and text is None:
            raise ValueError("BEiT3.forward needs an image, a text, or both")
        if image is not None:
            if image.dim() != 4 or image.shape[1] != cfg.in_chans or tuple(image.shape[2:]) != (cfg.img_size,) * 2:
                raise ValueError(f"image has shape {tuple(image.shape)}; expected (B, {cfg.in_chans}, "
                                 f"{cfg.img_size}, {cfg.img_size}) for this model")
            if image_mask is not None and tuple(image_mask.shape) != (image.shape[0], cfg.num_patches):
                raise ValueError(f"image_mask has shape {tuple(image_mask.shape)}; expected "
                                 f"({image.shape[0]}, {cfg.num_patches})")
        if text is not None:
            if text.dim() != 2 or text.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"text must be (B, L) integer ids; got {tuple(text.shape)} {text.dtype}")
            if text.shape[1] > cfg.max_text_len:
                raise ValueError(f"text has {text.shape[1]} tokens; this model's position table holds "
                                 f"at most {cfg.max_text_len}")
            if text_padding_mask is not None and text_padding_mask.shape != text.shape:
                raise ValueError(f"text_padding_mask has shape {tuple(text_padding_mask.shape)}; "
                                 f"expected {tuple(text.shape)} like text")
            if image is not None and image.shape[0] != text.shape[0]:
                raise ValueError(f"image batch {image.shape[0]} != text batch {text.shape[0]}")
