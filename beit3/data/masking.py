"""Masks for BEiT-3's masked data modeling: block-wise image masks and BERT-style text masks.

BEiT-3 (paper, Sec. 2.3) masks 15% of the tokens of monomodal texts, 50% of the text tokens of
image-text pairs, and 40% of image patches with the block-wise strategy of BEiT. These are the
defaults of the pretraining loader's settings (``PretrainDataConfig``: ``--text-mask-prob``,
``--pair-text-mask-prob``, ``--image-mask-ratio``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

TEXT_MASK_PROB = 0.15  # monomodal text (BEiT-3 paper, Sec. 2.3)
PAIR_TEXT_MASK_PROB = 0.5  # text of an image-text pair: the image makes recovery easier (Sec. 2.3)
IMAGE_MASK_RATIO = 0.4  # block-wise, image-only and image-text inputs alike (Sec. 2.3)
BEIT_NUM_MASKING_PATCHES_14x14 = 75  # BEiT's `--num_mask_patches 75` for 224/16 (14x14 = 196 patches)
IGNORE_INDEX = -100  # label of positions that carry no MLM loss (torch cross_entropy default)


def default_num_masking_patches(height: int, width: int, ratio: float = IMAGE_MASK_RATIO) -> int:
    """Number of patches to mask on a ``height`` x ``width`` grid.

    A 14x14 grid at ratio 0.4 gives 75, the fixed value of BEiT's pre-training config (38.3%, not
    round(0.4 * 196) = 78); every other grid gives ``round(ratio * height * width)`` with halves
    rounded up (16x16 -> 102, 8x8 -> 26).
    """
    if height < 1 or width < 1 or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"need a grid >= 1x1 and 0 <= ratio <= 1, got {height}x{width}, ratio={ratio}")
    if (height, width) == (14, 14) and ratio == IMAGE_MASK_RATIO:
        return BEIT_NUM_MASKING_PATCHES_14x14
    return math.floor(ratio * height * width + 0.5)


class BlockMaskGenerator:
    """BEiT's block-wise masking (unilm ``beit2/masking_generator.py``), randomness from a numpy Generator.

    Rectangles of at least ``min_num_patches`` patches with log-uniform aspect ratio in
    [min_aspect, max_aspect] are added (10 tries per block) until ``num_masking_patches`` are masked;
    as in BEiT v2, random unmasked patches then top the count up so that it is always exact.
    """

    def __init__(self, input_size: int | tuple[int, int], num_masking_patches: int,
                 min_num_patches: int = 16, max_num_patches: int | None = None,
                 min_aspect: float = 0.3, max_aspect: float | None = None):
        self.height, self.width = (input_size, input_size) if isinstance(input_size, int) else input_size
        num_patches = self.height * self.width
        if not 0 <= num_masking_patches <= num_patches:
            raise ValueError(f"num_masking_patches={num_masking_patches} must lie in [0, {num_patches}] "
                             f"for a {self.height}x{self.width} grid")
        if min_aspect <= 0:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (f"BlockMaskGenerator({self.height}x{self.width}, {self.num_masking_patches} masked, "
                f"blocks of {self.min_num_patches}..{self.max_num_patches} patches)")

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """Return a bool mask of shape (height, width), True at exactly ``num_masking_patches`` patches."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masking_patches:
            max_mask_patches = min(self.num_masking_patches - count, self.max_num_patches)
            delta = self._add_block(mask, max_mask_patches, rng)
            if delta == 0:
                break
            count += delta
        # Blocks never overshoot (a block adds at most max_mask_patches), but they can stall short.
        missing = self.num_masking_patches - count
        if missing > 0:
            free = np.flatnonzero(~mask)
            mask.flat[rng.choice(free, missing, replace=False)] = True
        return mask

    def _add_block(self, mask: np.ndarray, max_mask_patches: int, rng: np.random.Generator) -> int:
        """Mask one random rectangle adding 1..max_mask_patches new patches; return how many (0: gave up)."""
        for _ in range(10):
            # low + (high - low) * u, as random.uniform, which also allows low > high
            target_area = self.min_num_patches + (max_mask_patches - self.min_num_patches) * rng.random()
            lo, hi = self.log_aspect_ratio
            aspect_ratio = math.exp(lo + (hi - lo) * rng.random())
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h, endpoint=True))
                left = int(rng.integers(0, self.width - w, endpoint=True))
                block = mask[top: top + h, left: left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:
                    block[...] = True
                    return new
        return 0


def mask_text(ids: torch.Tensor, padding_mask: torch.Tensor, mask_prob: float, mask_id: int,
              vocab_size: int, special_ids: Sequence[int],
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masked language modeling on a padded batch.

    Each maskable token (not padding, not in ``special_ids``) is chosen with probability
    ``mask_prob``; a sequence with maskable tokens but none chosen gets one chosen at random, so
    every such sequence has a loss. Chosen tokens become ``mask_id`` (80%), a random non-special id
    (10%) or stay unchanged (10%).

    ids: LongTensor (B, L); padding_mask: BoolTensor (B, L), True at padding.
    Returns ``inputs`` LongTensor (B, L) and ``labels`` LongTensor (B, L): the original id at chosen
    positions, -100 elsewhere.
    """
    _check_text_mask_args(ids, padding_mask, mask_prob, mask_id, vocab_size)
    device = ids.device
    special = torch.tensor(sorted(set(special_ids) | {mask_id}), dtype=torch.long, device=device)
    maskable = ~padding_mask & ~torch.isin(ids, special)

    chosen = (torch.rand(ids.shape, generator=generator, device=device) < mask_prob) & maskable
    # Random numbers are drawn for every row, so the stream does not depend on the batch content.
    fallback_score = torch.rand(ids.shape, generator=generator, device=device).masked_fill(~maskable, -1.0)
    needs_one = maskable.any(dim=1) & ~chosen.any(dim=1)
    fallback = torch.zeros_like(chosen).scatter_(1, fallback_score.argmax(dim=1, keepdim=True), True)
    chosen |= fallback & needs_one[:, None]

    action = torch.rand(ids.shape, generator=generator, device=device)
    replaceable = _non_special_ids(vocab_size, special)
    random_ids = replaceable[torch.randint(len(replaceable), ids.shape, generator=generator, device=device)]
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    return inputs, labels


def _non_special_ids(vocab_size: int, special: torch.Tensor) -> torch.Tensor:
    all_ids = torch.arange(vocab_size, device=special.device)
    allowed = all_ids[~torch.isin(all_ids, special)]
    if len(allowed) == 0:
        raise ValueError(f"vocab_size={vocab_size} has no non-special id to draw random replacements from")
    return allowed


def _check_text_mask_args(ids: torch.Tensor, padding_mask: torch.Tensor, mask_prob: float,
                          mask_id: int, vocab_size: int) -> None:
    if ids.dim() != 2 or ids.dtype != torch.long:
        raise ValueError(f"ids must be a LongTensor (B, L), got {ids.dtype} of shape {tuple(ids.shape)}")
    if padding_mask.shape != ids.shape or padding_mask.dtype != torch.bool:
        raise ValueError(f"padding_mask must be a BoolTensor of shape {tuple(ids.shape)}, "
                         f"got {padding_mask.dtype} of shape {tuple(padding_mask.shape)}")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must lie in [0, 1], got {mask_prob}")
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id={mask_id} must lie in [0, vocab_size={vocab_size})")
