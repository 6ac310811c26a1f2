import math
import random

import numpy as np
import pytest
import torch

from beit3.data.masking import PAIR_TEXT_MASK_PROB, TEXT_MASK_PROB, BlockMaskGenerator, default_num_masking_patches, mask_text

GRIDS = [(14, 75), (16, 102), (8, 26)]  # BEiT 224/16, giant 224/14 at 40%, a small grid at 40%


# ---------------------------------------------------------------- block-wise image masking

def test_default_num_masking_patches():
    assert default_num_masking_patches(14, 14) == 75  # BEiT's fixed config, not round(78.4)
    assert default_num_masking_patches(16, 16) == 102
    assert default_num_masking_patches(8, 8) == 26
    assert default_num_masking_patches(24, 24) == 230
    assert default_num_masking_patches(14, 14, ratio=0.5) == 98
    with pytest.raises(ValueError, match="ratio"):
        default_num_masking_patches(14, 14, ratio=1.5)


@pytest.mark.parametrize("grid,count", GRIDS)
def test_exact_count(grid, count):
    assert default_num_masking_patches(grid, grid) == count
    gen = BlockMaskGenerator(grid, count)
    rng = np.random.default_rng(0)
    for _ in range(300):
        mask = gen(rng)
        assert mask.shape == (grid, grid) and mask.dtype == np.bool_
        assert mask.sum() == count


def _share_with_two_masked_neighbours(mask: np.ndarray) -> float:
    """Fraction of masked patches with >= 2 masked 4-neighbours: ~0.45 for random 40% masks, ~1 for blocks."""
    p = np.pad(mask, 1)
    masked_neighbours = (p[:-2, 1:-1].astype(int) + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:])
    return float((masked_neighbours[mask] >= 2).mean())


@pytest.mark.parametrize("grid,count", GRIDS)
def test_masks_are_blocky(grid, count):
    gen = BlockMaskGenerator(grid, count)
    rng = np.random.default_rng(1)
    block = np.mean([_share_with_two_masked_neighbours(gen(rng)) for _ in range(200)])
    scattered = []
    for _ in range(200):
        m = np.zeros(grid * grid, dtype=bool)
        m[rng.choice(grid * grid, count, replace=False)] = True
        scattered.append(_share_with_two_masked_neighbours(m.reshape(grid, grid)))
    # measured (seed 1): block 0.97-0.99, random 0.43-0.48
    assert block >= 0.9
    assert block - np.mean(scattered) >= 0.4


def test_seeded_determinism_and_seed_dependence():
    gen = BlockMaskGenerator(14, 75)
    a = [gen(np.random.default_rng(123)) for _ in range(3)]
    b = [gen(np.random.default_rng(123)) for _ in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    masks = {gen(np.random.default_rng(s)).tobytes() for s in range(50)}
    assert len(masks) == 50


def test_rectangular_grid_and_bad_count():
    gen = BlockMaskGenerator((10, 20), 80)
    assert gen(np.random.default_rng(0)).shape == (10, 20)
    with pytest.raises(ValueError, match="num_masking_patches=197"):
        BlockMaskGenerator(14, 197)


class _PythonRandomAsGenerator:
    """The numpy Generator methods BlockMaskGenerator uses, served from python's `random` and a
    numpy RandomState, the two streams BEiT's original code draws from."""

    def __init__(self, seed):
        self.py = random.Random(seed)
        self.np = np.random.RandomState(seed)

    def random(self):
        return self.py.random()

    def integers(self, low, high, endpoint):
        assert endpoint
        return self.py.randint(low, high)

    def choice(self, a, size, replace):
        return a[self.np.choice(len(a), size, replace=replace)]


def _beit_reference_mask(h, w, num_mask, seed, min_patches=16, min_aspect=0.3):
    """BEiT (v2) block-wise masking, written from its description: python `random` picks blocks,
    numpy's global-style RandomState tops up to the exact count in row-major order."""
    py, rs = random.Random(seed), np.random.RandomState(seed)
    log_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
    masked = set()
    while len(masked) < num_mask:
        budget = num_mask - len(masked)
        added = set()
        for _ in range(10):
            area = py.uniform(min_patches, budget)
            aspect = math.exp(py.uniform(*log_ratio))
            bh, bw = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if bw < w and bh < h:
                top, left = py.randint(0, h - bh), py.randint(0, w - bw)
                block = {(i, j) for i in range(top, top + bh) for j in range(left, left + bw)}
                if 0 < len(block - masked) <= budget:
                    added = block - masked
                    break
        if not added:
            break
        masked |= added
    free = [(i, j) for i in range(h) for j in range(w) if (i, j) not in masked]
    missing = num_mask - len(masked)
    if missing:
        masked |= {free[k] for k in rs.choice(len(free), missing, replace=False)}
    ref = np.zeros((h, w), dtype=bool)
    for i, j in masked:
        ref[i, j] = True
    return ref


@pytest.mark.parametrize("grid,count", GRIDS + [((6, 9), 20)])
def test_matches_beit_reference(grid, count):
    h, w = (grid, grid) if isinstance(grid, int) else grid
    gen = BlockMaskGenerator((h, w), count)
    for seed in range(60):
        ours = gen(_PythonRandomAsGenerator(seed))
        np.testing.assert_array_equal(ours, _beit_reference_mask(h, w, count, seed), err_msg=f"seed {seed}")


# ---------------------------------------------------------------- BERT-style text masking

PAD, BOS, EOS, UNK, MASK, VOCAB = 1, 0, 2, 3, 99, 100
SPECIALS = (BOS, PAD, EOS, UNK, MASK)


def _batch(batch=512, length=64, seed=0):
    """Random ids with <s> ... </s>, right padding to random lengths, and some <unk> inside."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, MASK, (batch, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    padding = torch.arange(length)[None] >= lengths[:, None]
    ids[torch.rand(batch, length, generator=g) < 0.02] = UNK
    ids[:, 0] = BOS
    ids[torch.arange(batch), lengths - 1] = EOS
    ids[padding] = PAD
    return ids, padding


def _mask(ids, padding, prob, seed=0):
    return mask_text(ids, padding, prob, MASK, VOCAB, SPECIALS, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prob", [TEXT_MASK_PROB, PAIR_TEXT_MASK_PROB])
def test_text_mask_rate_and_split(prob):
    ids, padding = _batch()
    inputs, labels = _mask(ids, padding, prob)
    chosen = labels != -100
    maskable = ~padding & ~torch.isin(ids, torch.tensor(SPECIALS))
    assert not (chosen & ~maskable).any()  # never specials or padding
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])

    n, k = int(maskable.sum()), int(chosen.sum())
    assert abs(k / n - prob) < 4 * math.sqrt(prob * (1 - prob) / n)
    to_mask = (inputs[chosen] == MASK).float().mean().item()
    unchanged = (inputs[chosen] == ids[chosen]).float().mean().item()
    replaced = 1 - to_mask - unchanged
    std = math.sqrt(0.1 * 0.9 / k)
    assert abs(to_mask - 0.8) < 4 * math.sqrt(0.8 * 0.2 / k)
    # a random replacement equal to the original counts as unchanged: 1/95 of the 10%
    assert abs(replaced - 0.1 * (1 - 1 / 95)) < 4 * std
    assert abs(unchanged - 0.1 * (1 + 1 / 95)) < 4 * std
    swapped = inputs[chosen & (inputs != MASK) & (inputs != ids)]
    assert not torch.isin(swapped, torch.tensor(SPECIALS)).any() and (swapped < VOCAB).all()


def test_text_mask_at_least_one_per_sequence():
    ids, padding = _batch(batch=256, length=8)
    ids[:3, 1:] = PAD  # rows of only <s>: nothing maskable
    padding[:3, 1:] = True
    _, labels = _mask(ids, padding, 0.01)
    per_row = (labels != -100).sum(dim=1)
    assert (per_row[:3] == 0).all()
    assert (per_row[3:] >= 1).all()


def test_text_mask_deterministic_and_checks_inputs():
    ids, padding = _batch(batch=16)
    a, b = _mask(ids, padding, 0.15, seed=5), _mask(ids, padding, 0.15, seed=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], _mask(ids, padding, 0.15, seed=6)[1])
    with pytest.raises(ValueError, match="padding_mask"):
        _mask(ids, padding.long(), 0.15)
    with pytest.raises(ValueError, match="mask_prob"):
        _mask(ids, padding, 1.5)
