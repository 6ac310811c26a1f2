"""The VQ-KD codebook: l2-normalised codes updated by an exponential moving average (BEiT v2, Sec. 2.2).

Encoder outputs and codes both live on the unit sphere, so the nearest code is the one with the
largest dot product. The codebook gets no gradient: after each training batch every code moves
towards the normalised mean of the vectors assigned to it,

    w_k <- l2norm(decay * w_k + (1 - decay) * l2norm(mean{z_i : idx_i = k})),

and codes that received nothing stay where they are. The encoder is trained through a
straight-through estimator plus a commitment loss ``beta * ||sg[z_q] - z||^2``.

State-dict names follow unilm/beit2 ``norm_ema_quantizer.py`` so that the published tokenizers load
strictly: ``quantize.embedding.{weight, cluster_size, embed_avg, initted}`` and
``quantize.cluster_size`` (the usage statistic).

Changes from beit2, none visible in the checkpoint layout:
* in eval mode nothing is written and no collective runs, so tokenising during BEiT pretraining
  cannot desynchronise ranks;
* after the k-means initialisation rank 0's codebook is broadcast, so all ranks start from the same
  codes (beit2 let every rank cluster its own batch);
* optional (``restart_after`` > 0, off by default as in beit2): a code that has been assigned
  nothing for ``restart_after`` consecutive training batches is moved onto a random encoder output
  of the current batch (the dead-code restart of Jukebox, Dhariwal et al. 2020). Small codebooks
  trained briefly collapse without it: while the decoder is still fitting the mean target, the
  encoder's outputs drift away from most k-means codes and those codes never get an assignment again.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum_(t: Tensor, sync: bool = True) -> Tensor:
    """Sum ``t`` over ranks in place when ``sync`` and ``torch.distributed`` is initialised."""
    if sync and _dist_ready():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def kmeans_cosine(samples: Tensor, num_clusters: int, num_iters: int = 10,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Spherical k-means. samples: (N, D) unit vectors. Returns means (K, D) unit vectors and
    counts (K,) of the last assignment; an empty cluster keeps its previous mean."""
    n = samples.shape[0]
    # Fewer samples than clusters (tiny batches): draw with replacement, as beit2 does.
    pick = (torch.randperm(n, generator=generator)[:num_clusters] if n >= num_clusters
            else torch.randint(0, n, (num_clusters,), generator=generator))
    means = samples[pick.to(samples.device)]
    counts = torch.zeros(num_clusters, device=samples.device)
    for _ in range(num_iters):
        assign = (samples @ means.t()).argmax(dim=-1)  # (N,)
        counts = torch.bincount(assign, minlength=num_clusters).to(samples.dtype)
        sums = torch.zeros_like(means).index_add_(0, assign, samples)
        new_means = F.normalize(sums, dim=-1)
        means = torch.where((counts == 0)[:, None], means, new_means)
    return means, counts


class EmbeddingEMA(nn.Module):
    """The code table. ``weight``: (K, D) unit rows. ``cluster_size`` (K,) and ``embed_avg`` (K, D)
    hold EMAs of the per-code counts and sums; the update rule above reads neither, they are kept
    because the published checkpoints carry them and they are handy statistics."""

    def __init__(self, num_codes: int, dim: int, kmeans_init: bool):
        super().__init__()
        # Without k-means the codes start as random unit vectors; with it they are set on the
        # first training batch and ``initted`` records that this has happened.
        weight = torch.zeros(num_codes, dim) if kmeans_init else F.normalize(torch.randn(num_codes, dim), dim=-1)
        self.register_buffer("weight", weight)
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_avg", weight.clone())
        self.register_buffer("initted", torch.tensor([0.0 if kmeans_init else 1.0]))

    def forward(self, indices: Tensor) -> Tensor:
        return F.embedding(indices, self.weight)


class NormEMAVectorQuantizer(nn.Module):
    def __init__(self, num_codes: int, dim: int, beta: float = 1.0, decay: float = 0.99,
                 kmeans_init: bool = True, kmeans_iters: int = 10, restart_after: int = 0):
        super().__init__()
        self.num_codes, self.dim = num_codes, dim
        self.beta, self.decay, self.kmeans_iters = beta, decay, kmeans_iters
        self.restart_after = restart_after
        self.embedding = EmbeddingEMA(num_codes, dim, kmeans_init)
        self.register_buffer("cluster_size", torch.zeros(num_codes))  # EMA of code usage
        # Consecutive training batches without an assignment; not saved (beit2's layout has none).
        self.register_buffer("unused_steps", torch.zeros(num_codes, dtype=torch.long), persistent=False)
        # Data-parallel training keeps one codebook on every rank by summing the updates over the
        # process group. Off for a job run by one rank alone inside a larger group (the demo's
        # tokenizer, trained by rank 0 of a pretraining job): the other ranks are not there to sum.
        self.sync_ranks = True

    def _sync(self) -> bool:
        return self.sync_ranks and _dist_ready()

    def assign(self, z: Tensor) -> Tensor:
        """z: (..., D), any norm. Returns the nearest code's index, shape (...), without side effects."""
        z = F.normalize(z.float(), dim=-1)
        return (z @ self.embedding.weight.t()).argmax(dim=-1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z: (B, N, D) encoder features. Returns z_q (B, N, D) carrying z's gradient (straight
        through), indices (B, N) long, and the commitment loss (scalar). In training mode the
        codebook is first k-means initialised if needed, then EMA-updated."""
        z = F.normalize(z.float(), dim=-1)
        flat = z.reshape(-1, self.dim)  # (B*N, D)
        if self.training and not bool(self.embedding.initted.item()):
            self._kmeans_init(flat.detach())
        indices = (flat @ self.embedding.weight.t()).argmax(dim=-1)  # (B*N,)
        z_q = self.embedding(indices).view_as(z)
        if self.training:
            counts = self._ema_update(flat.detach(), indices)
            if self.restart_after > 0:
                self._restart_unused(flat.detach(), counts)
        loss = self.beta * F.mse_loss(z_q.detach(), z)
        z_q = z + (z_q - z).detach()  # straight-through estimator
        return z_q, indices.view(z.shape[:-1]), loss

    @torch.no_grad()
    def _kmeans_init(self, flat: Tensor) -> None:
        means, counts = kmeans_cosine(flat, self.num_codes, self.kmeans_iters)
        if self._sync():
            dist.broadcast(means, src=0)
            dist.broadcast(counts, src=0)
        self.embedding.weight.copy_(means)
        self.embedding.cluster_size.copy_(counts)
        self.embedding.embed_avg.copy_(means * counts[:, None])
        self.embedding.initted.fill_(1.0)

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, indices: Tensor) -> Tensor:
        """flat: (M, D) unit vectors, indices: (M,). Counts and sums are summed over ranks first,
        so every rank applies the same update to the same codebook. Returns the counts (K,)."""
        counts = torch.bincount(indices, minlength=self.num_codes).to(flat.dtype)  # (K,)
        sums = torch.zeros(self.num_codes, self.dim, device=flat.device).index_add_(0, indices, flat)
        all_reduce_sum_(counts, self.sync_ranks)
        all_reduce_sum_(sums, self.sync_ranks)
        d = self.decay
        self.cluster_size.mul_(d).add_(counts, alpha=1 - d)
        self.embedding.cluster_size.mul_(d).add_(counts, alpha=1 - d)
        self.embedding.embed_avg.mul_(d).add_(sums, alpha=1 - d)
        weight = self.embedding.weight
        target = F.normalize(sums / counts.clamp(min=1)[:, None], dim=-1)
        target = torch.where((counts == 0)[:, None], weight, target)
        weight.copy_(F.normalize(d * weight + (1 - d) * target, dim=-1))
        return counts

    @torch.no_grad()
    def _restart_unused(self, flat: Tensor, counts: Tensor) -> None:
        """Move codes unused for ``restart_after`` batches onto random rows of flat (M, D)."""
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        dead = (self.unused_steps >= self.restart_after).nonzero().squeeze(1)  # same on all ranks
        if dead.numel() == 0:
            return
        picks = flat[torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)]
        if self._sync():
            dist.broadcast(picks, src=0)
        self.embedding.weight[dead] = picks
        self.unused_steps[dead] = 0
