"""Synthetic pretraining batches in the loader's format, for timing without data loading.

Shapes and masking follow the real pipeline (block-wise 40% image masks, 15% / 50% text masks from
``beit3.data.masking``); the pixel values and token ids are random.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from beit3.model.config import BEiT3Config
from beit3.data.masking import PAIR_TEXT_MASK_PROB, TEXT_MASK_PROB, BlockMaskGenerator, default_num_masking_patches, mask_text

# The fairseq / XLM-R id layout of beit3.data.text_tokenizer: bos, pad, eos, unk, ..., mask = last.
BOS, PAD, SPECIAL_IDS = 0, 1, (0, 1, 2, 3)


@dataclass(frozen=True)
class BatchMix:
    """Samples per part of one micro-batch, and the text length (``text_padding``: the fraction of
    each text that is padding; 0 = none, which lets SDPA take a mask-free kernel)."""
    images: int
    texts: int
    pairs: int
    text_len: int
    text_padding: float = 0.0
    mask_pair_images: bool = False

    def __post_init__(self):
        for name in ("images", "texts", "pairs"):
            if getattr(self, name) < 0:
                raise ValueError(f"--batch-{name} {getattr(self, name)}: expected >= 0")
        if self.samples == 0:
            raise ValueError("empty batch mix: --batch-images, --batch-texts and --batch-pairs are all 0")
        if (self.texts or self.pairs) and self.text_len < 2:
            raise ValueError(f"--text-len {self.text_len}: expected >= 2")
        if not 0.0 <= self.text_padding < 1.0:
            raise ValueError(f"--text-padding {self.text_padding}: expected a fraction in [0, 1)")

    @property
    def samples(self) -> int:
        return self.images + self.texts + self.pairs

    @property
    def image_only(self) -> bool:
        return self.texts == 0 and self.pairs == 0

    def as_image_only(self) -> "BatchMix":
        """Images only, as many as the whole mix (the mix itself if it is image-only already)."""
        return self if self.image_only else dataclasses.replace(self, images=self.samples, texts=0, pairs=0)

    def scaled(self, per_part: int) -> "BatchMix":
        """``per_part`` samples in every part present in this mix (micro-batch search)."""
        return dataclasses.replace(self, **{k: per_part if getattr(self, k) else 0
                                            for k in ("images", "texts", "pairs")})

    def describe(self) -> str:
        parts = [f"{n} {k}" for k, n in (("images", self.images), ("texts", self.texts), ("pairs", self.pairs)) if n]
        text = f", text {self.text_len}" if not self.image_only else ""
        pad = f" ({self.text_padding:.0%} padding)" if self.text_padding and not self.image_only else ""
        return " + ".join(parts) + text + pad


def synthetic_batch(cfg: BEiT3Config, mix: BatchMix, num_visual_tokens: int,
                    seed: int = 0) -> tuple[dict, dict]:
    """(batch, targets): batch as ``MaskedDataModeling.forward`` takes it, images (B, C, H, W) in
    [-1, 1]; targets {"images": (B, N) long[, "pairs": (B, N)]} random visual tokens."""
    if mix.text_len > cfg.max_text_len and not mix.image_only:
        raise ValueError(f"--text-len {mix.text_len}: the model's position table holds {cfg.max_text_len}")
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    masker = BlockMaskGenerator(cfg.grid_size, default_num_masking_patches(cfg.grid_size, cfg.grid_size))
    batch, targets = {}, {}
    if mix.images:
        batch["images"] = _images(cfg, mix.images, masker, g, rng)
        targets["images"] = torch.randint(num_visual_tokens, (mix.images, cfg.num_patches), generator=g)
    if mix.texts:
        batch["texts"] = _texts(cfg, mix, mix.texts, TEXT_MASK_PROB, g)
    if mix.pairs:
        im = _images(cfg, mix.pairs, masker, g, rng)
        if not mix.mask_pair_images:
            del im["image_mask"]
        else:
            targets["pairs"] = torch.randint(num_visual_tokens, (mix.pairs, cfg.num_patches), generator=g)
        del im["tokenizer_image"]
        batch["pairs"] = {**im, **_texts(cfg, mix, mix.pairs, PAIR_TEXT_MASK_PROB, g)}
    return batch, targets


def _images(cfg: BEiT3Config, n: int, masker: BlockMaskGenerator, g: torch.Generator,
            rng: np.random.Generator) -> dict:
    img = torch.rand(n, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    mask = torch.from_numpy(np.stack([masker(rng).reshape(-1) for _ in range(n)]))  # (n, N) bool
    return {"image": img * 2 - 1, "tokenizer_image": img, "image_mask": mask}


def _texts(cfg: BEiT3Config, mix: BatchMix, n: int, prob: float, g: torch.Generator) -> dict:
    L = mix.text_len
    real = max(2, L - round(mix.text_padding * L))  # bos + at least one word
    mask_id = cfg.vocab_size - 1
    ids = torch.randint(len(SPECIAL_IDS), mask_id, (n, L), generator=g)  # (n, L) word ids
    ids[:, 0] = BOS
    pad = torch.zeros(n, L, dtype=torch.bool)
    pad[:, real:] = True
    ids[pad] = PAD
    inputs, labels = mask_text(ids, pad, prob, mask_id, cfg.vocab_size, SPECIAL_IDS, g)
    return {"text": inputs, "padding_mask": pad, "labels": labels}
