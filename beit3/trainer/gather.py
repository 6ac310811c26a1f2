"""All-gathering features across ranks for retrieval evaluation and the contrastive loss."""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor


def gather_features(t: Tensor, with_grad: bool = False) -> Tensor:
    """Concatenate ``t`` (N_r, ...) from every rank along dim 0, in rank order -> (sum N_r, ...).

    Returns ``t`` unchanged when ``torch.distributed`` is not initialised or has one rank.
    ``with_grad=True`` (training-time contrastive loss) gathers through
    ``torch.distributed.nn.functional.all_gather`` so gradients flow back to every rank's
    input; eval uses the plain collective. Ranks may hold different N_r (the last eval batch):
    the sizes are exchanged first and the rows padded for the collective, then trimmed.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    sizes = _gather_sizes(t)
    padded = _pad_rows(t, max(sizes))
    if with_grad:
        # Deprecated in favour of a private API (torch 2.x) but still the public autograd gather;
        # its FutureWarning would repeat at every training step.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            parts = dist_nn.all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.detach().contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _gather_sizes(t: Tensor) -> list[int]:
    # gloo gathers CPU tensors, NCCL CUDA ones: keep the size on the features' device.
    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t
    pad = t.new_zeros((rows - t.shape[0], *t.shape[1:]))
    return torch.cat([t, pad])
