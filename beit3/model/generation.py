"""Caption generation as unilm/beit3 decodes: beam search with [MASK] at the position predicted.

Decoding predicts position t by feeding [MASK] there, exactly the training situation: the input
at step t is ``[token t-1, MASK]``. With the KV cache (``CachedDecoder``) each step runs two text
tokens through the model; the image is encoded once per sample (not per beam) and its keys and
values are repeated for the beams. The cache keeps keys/values of real tokens only: the [MASK]
entry is dropped after each step. ``beam_search`` runs every sample's beams as one batch of
B x K rows; ``FullDecoder`` recomputes everything each step and serves as the reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

# -- decoding ------------------------------------------------------------------------------------
@dataclass
class DecodeConfig:
    num_beams: int = 3
    max_len: int = 32  # tokens including <s> and </s> (unilm/beit3 --num_max_bpe_tokens)
    length_penalty: float = 0.6
    bos_id: int = 0
    eos_id: int = 2
    pad_id: int = 1
    mask_id: int = 3
    # Never generate <s>, <pad> or [MASK]. unilm/beit3 bans nothing; these ids are never targets of
    # the captioning loss, so a trained head ranks them low anyway, and decoding would drop them.
    ban_special: bool = True

    def __post_init__(self):
        if self.num_beams < 1 or self.max_len < 3:
            raise ValueError(f"need num_beams >= 1 and max_len >= 3, got {self.num_beams}, {self.max_len}")


class Decoder(Protocol):
    def first(self) -> Tensor:
        """Log-probabilities (B * K, V) of the token at position 1, beams of a sample adjacent."""

    def next(self, tokens: Tensor, beam_idx: Tensor) -> Tensor:
        """tokens (B * K, t): the beams' tokens 0..t-1 after re-ordering by ``beam_idx`` (B * K,);
        returns log-probabilities (B * K, V) of position t."""


ModelFn = Callable[..., Tensor]  # CaptioningModel.forward (or a DeepSpeed engine around it)


class CachedDecoder:
    """Incremental decoding with the per-layer KV cache of ``BEiT3.forward_streams``."""

    def __init__(self, model: ModelFn, image: Tensor, depth: int, cfg: DecodeConfig):
        self.model, self.image, self.depth, self.cfg = model, image, depth, cfg
        self.cache: list[dict] = []

    def first(self) -> Tensor:
        B, K, c = self.image.shape[0], self.cfg.num_beams, self.cfg
        self.cache = [{} for _ in range(self.depth)]
        text = torch.tensor([[c.bos_id, c.mask_id]], device=self.image.device).expand(B, 2)
        logits = self.model(image=self.image, text=text, kv_cache=self.cache)  # (B, 2, V)
        for layer in self.cache:  # drop [MASK], then one copy per beam
            for key in ("k", "v"):
                layer[key] = layer[key][:, :, :-1].repeat_interleave(K, dim=0)
        return F.log_softmax(logits[:, 1].float(), dim=-1).repeat_interleave(K, dim=0)

    def next(self, tokens: Tensor, beam_idx: Tensor) -> Tensor:
        t = tokens.shape[1]
        for layer in self.cache:
            for key in ("k", "v"):
                layer[key] = layer[key].index_select(0, beam_idx)
        mask = torch.full_like(tokens[:, :1], self.cfg.mask_id)
        text = torch.cat([tokens[:, -1:], mask], dim=1)  # positions t-1, t
        logits = self.model(image=None, text=text, kv_cache=self.cache, text_start=t - 1)
        for layer in self.cache:
            for key in ("k", "v"):
                layer[key] = layer[key][:, :, :-1]
        return F.log_softmax(logits[:, 1].float(), dim=-1)


class FullDecoder:
    """Recomputes image and text at every step: slow, and the reference the cache must match."""

    def __init__(self, model: ModelFn, image: Tensor, cfg: DecodeConfig):
        self.model, self.cfg = model, cfg
        self.image = image.repeat_interleave(cfg.num_beams, dim=0)

    def first(self) -> Tensor:
        bos = torch.full((self.image.shape[0], 1), self.cfg.bos_id, device=self.image.device)
        return self._step(bos)

    def next(self, tokens: Tensor, beam_idx: Tensor) -> Tensor:
        return self._step(tokens)

    def _step(self, tokens: Tensor) -> Tensor:
        text = torch.cat([tokens, torch.full_like(tokens[:, :1], self.cfg.mask_id)], dim=1)
        logits = self.model(image=self.image, text=text)  # (B * K, t + 1, V)
        return F.log_softmax(logits[:, -1].float(), dim=-1)


@torch.no_grad()
def beam_search(decoder: Decoder, batch_size: int, cfg: DecodeConfig,
                stop: Callable[[bool], bool] = bool) -> tuple[Tensor, Tensor]:
    """Batched beam search of unilm/beit3 ``CaptioningHandler.eval_batch`` (one kept hypothesis).

    Each step looks at the best continuations of a sample (over all its beams, sorted): in that
    order a ``</s>`` closes a hypothesis, scored sum(log p) / length ** length_penalty (length
    counts ``<s>`` and ``</s>``), and any other token extends one of the next K beams, until K are
    filled (unilm looks at 3K; each beam has one ``</s>``, so the first 2K always fill K). Also with
    K = 1, where this is not greedy: a ``</s>`` ranked first closes a hypothesis and the next token
    goes on. At position ``max_len - 2`` every candidate closes, scored with its own log p, and
    ``</s>`` takes its place: unilm keeps a [MASK] placeholder there and writes ``</s>`` after it,
    which decodes to the same text. A sample stops once its best closed hypothesis is at least
    the best candidate's score / (max_len - 1) ** length_penalty (unilm's ``BeamHypotheses.is_done``:
    ``max_len - 1`` is the longest hypothesis), or when no beam is left.

    ``cfg.ban_special``: never generate ``<s>``, ``<pad>``, ``[MASK]``. ``stop(all samples done)``
    decides whether to leave the loop early; under ZeRO-3 it must agree across ranks (every
    forward is a collective).

    Returns tokens (B, max_len) (``<s>`` ... ``</s>``, then padding) and their scores (B,).
    """
    B, K, L, lp = batch_size, cfg.num_beams, cfg.max_len, cfg.length_penalty
    logp = decoder.first()
    device = logp.device
    banned = torch.tensor([cfg.bos_id, cfg.pad_id, cfg.mask_id] if cfg.ban_special else [], device=device,
                          dtype=torch.long)
    tokens = torch.full((B * K, 1), cfg.bos_id, dtype=torch.long, device=device)
    beam_scores = torch.full((B, K), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0  # the K beams start identical: keep one
    best = torch.full((B,), float("-inf"), device=device)
    best_tokens = torch.full((B, L), cfg.pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(1, L - 1):
        logp = logp.index_fill(1, banned, float("-inf"))
        step = _select(beam_scores, logp, cfg, last=t == L - 2)
        done |= torch.isfinite(best) & (best >= step.top_score / (L - 1) ** lp)
        _close(step, tokens, best, best_tokens, done, cfg, t)
        beam_scores = step.next_scores
        done |= ~torch.isfinite(beam_scores).any(dim=1)
        if t == L - 2 or stop(bool(done.all())):
            break
        flat = (torch.arange(B, device=device)[:, None] * K + step.next_beam).view(-1)  # (B * K,)
        tokens = torch.cat([tokens[flat], step.next_word.view(-1, 1)], dim=1)
        logp = decoder.next(tokens, flat)
    return best_tokens, best


@dataclass
class _Step:
    top_score: Tensor  # (B,) best candidate score
    cand_score: Tensor  # (B, C) sorted candidates
    cand_beam: Tensor  # (B, C)
    closes: Tensor  # (B, C) bool: an </s> that closes a hypothesis
    next_scores: Tensor  # (B, K), -inf for a beam left empty
    next_beam: Tensor  # (B, K)
    next_word: Tensor  # (B, K)


def _select(beam_scores: Tensor, logp: Tensor, cfg: DecodeConfig, last: bool = False) -> _Step:
    """``last``: every candidate closes a hypothesis (unilm's ``cur_len + 1 == max_len``)."""
    B, K = beam_scores.shape
    V = logp.shape[-1]
    cand = (beam_scores.view(-1, 1) + logp).view(B, K * V)
    score, idx = cand.topk(min(2 * K, K * V), dim=1)  # sorted, best first
    C = score.shape[1]
    beam, word = idx // V, idx % V
    finite = torch.isfinite(score)
    is_eos = (word == cfg.eos_id) | last
    extends = ~is_eos & finite
    filled_before = torch.cumsum(extends.long(), dim=1) - extends.long()  # beams filled before this one
    closes = is_eos & finite & (filled_before < K)
    keep = extends & (filled_before < K)
    # The first K kept candidates, in order; a row with fewer gets empty beams (-inf).
    order = torch.argsort((~keep).long() * C + torch.arange(C, device=logp.device), dim=1)[:, :K]
    sel_keep = keep.gather(1, order)
    next_scores = torch.where(sel_keep, score.gather(1, order), torch.full_like(score[:, :K], float("-inf")))
    next_beam = torch.where(sel_keep, beam.gather(1, order), torch.zeros_like(order))
    next_word = torch.where(sel_keep, word.gather(1, order), torch.full_like(order, cfg.pad_id))
    return _Step(score[:, 0], score, beam, closes, next_scores, next_beam, next_word)


def _close(step: _Step, tokens: Tensor, best: Tensor, best_tokens: Tensor, done: Tensor,
           cfg: DecodeConfig, t: int) -> None:
    """Record the best hypothesis closed at position t of every sample that is not done."""
    B, K = step.next_beam.shape
    normed = (step.cand_score / (t + 1) ** cfg.length_penalty).masked_fill(~step.closes, float("-inf"))
    cand_best, j = normed.max(dim=1)
    better = (cand_best > best) & ~done
    if not bool(better.any()):
        return
    rows = better.nonzero().view(-1)
    src = rows * K + step.cand_beam[rows, j[rows]]
    best[rows] = cand_best[rows]
    best_tokens[rows] = cfg.pad_id
    best_tokens[rows, :t] = tokens[src]
    best_tokens[rows, t] = cfg.eos_id


def generate(model: ModelFn, image: Tensor, depth: int, cfg: DecodeConfig, use_cache: bool = True,
             stop: Callable[[bool], bool] = bool) -> tuple[Tensor, Tensor]:
    """Captions for a batch of images (B, C, H, W): tokens (B, max_len) and scores (B,)."""
    decoder = CachedDecoder(model, image, depth, cfg) if use_cache else FullDecoder(model, image, cfg)
    return beam_search(decoder, image.shape[0], cfg, stop)
