"""Fine-tuning batches: which samples each rank takes in an epoch or an evaluation, and the collate
that trims text padding."""
from __future__ import annotations

import math

import torch
from torch.utils.data import default_collate


def collate(items: list[dict]) -> dict:
    """``default_collate``, then the text cut to its longest caption: the index readers pad every
    text to max_text_len, and attention over padding is wasted work."""
    batch = default_collate(items)
    if "padding_mask" in batch:
        keep = int((~batch["padding_mask"]).sum(dim=1).max())
        batch["text"], batch["padding_mask"] = batch["text"][:, :keep], batch["padding_mask"][:, :keep]
    return batch


def epoch_batches(n: int, batch: int, rank: int, world: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's micro-batches of an epoch: one permutation per (seed, epoch) cut into global
    batches of ``world x batch``, of which rank r takes the r-th slice (the tail that does not
    fill a global batch is dropped). A step thus sees the same samples on 2 ranks x b as on one
    rank x 2b (or x b with 2 accumulation steps), and the contrastive loss the same negatives."""
    g = torch.Generator().manual_seed(seed * 10_007 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    step = world * batch
    return [order[i + rank * batch:i + (rank + 1) * batch] for i in range(0, n // step * step, step)]


def eval_shard(n: int, rank: int, world: int) -> list[int]:
    """Contiguous, equal shards (the last padded by wrapping): every rank runs the same number of
    batches, which ZeRO-3 needs, and the first n gathered rows are the dataset in order."""
    per = math.ceil(n / world)
    return [(rank * per + i) % n for i in range(per)]
