"""Captioning: UniLM masking, the captioning loss, and batched beam search with the KV cache."""
import itertools
import math

import pytest
import torch

from beit3 import BEiT3Config
from beit3.finetune.captioning import (
    CachedDecoder, DecodeConfig, FullDecoder, beam_search, caption_loss, generate, mask_caption,
)
from beit3.finetune.heads import CaptioningModel

V, MASK = 40, 39  # vocabulary and its [MASK] id (the last, as TextTokenizer lays it out)


def _model(layout, seed=0):
    torch.manual_seed(seed)
    cfg = BEiT3Config.from_preset("tiny", layout=layout, vocab_size=V, depth=3, vl_layers=1, embed_dim=64,
                                  num_heads=2, ffn_dim=128, img_size=32, max_text_positions=32)
    model = CaptioningModel(cfg).eval()
    with torch.no_grad():  # a peaked output distribution, so that decoding makes real choices
        model.mlm_head.weight.normal_(0, 0.5)
    return model


def _dc(num_beams, max_len=9, length_penalty=0.6):
    return DecodeConfig(num_beams=num_beams, max_len=max_len, length_penalty=length_penalty, mask_id=MASK)


# -- masking and loss ---------------------------------------------------------------------------
def test_mask_caption_counts_positions_and_replacements():
    B, L = 400, 12
    lengths = torch.randint(2, L + 1, (B,), generator=torch.Generator().manual_seed(0))
    pad = torch.arange(L)[None] >= lengths[:, None]
    ids = torch.randint(4, 30, (B, L)).masked_fill(pad, 1)
    ids[:, 0] = 0
    ids[torch.arange(B), lengths - 1] = 2  # </s>
    g = torch.Generator().manual_seed(1)
    inputs, masked = mask_caption(ids, pad, 0.6, MASK, V, g)
    expected = torch.clamp(torch.floor(lengths * 0.6 + 0.5).long(), min=1)
    expected = torch.minimum(expected, lengths - 1)
    assert torch.equal(masked.sum(1), expected)
    assert not masked[:, 0].any() and not (masked & pad).any()
    assert masked[torch.arange(B), lengths - 1].any()  # </s> gets chosen (the model learns to stop)
    chosen = inputs[masked]
    frac_mask = (chosen == MASK).float().mean().item()
    frac_kept = (chosen == ids[masked]).float().mean().item()
    assert 0.75 < frac_mask < 0.85 and 0.07 < frac_kept < 0.14  # 80% [MASK], 10% kept (+ random hits)
    assert torch.equal(inputs[~masked], ids[~masked])
    again, masked2 = mask_caption(ids, pad, 0.6, MASK, V, torch.Generator().manual_seed(1))
    assert torch.equal(again, inputs) and torch.equal(masked2, masked)


def test_caption_loss_is_smoothed_kl_and_drops_the_worst():
    torch.manual_seed(0)
    logits, target = torch.randn(10, V), torch.randint(0, V, (10,))
    eps = 0.1
    q = torch.full((10, V), eps / (V - 1)).scatter(1, target[:, None], 1 - eps)
    per_token = (q * (q.log() - logits.log_softmax(-1))).sum(1)
    assert caption_loss(logits, target, eps).item() == pytest.approx(per_token.mean().item(), rel=1e-5)
    kept = per_token.sort().values[:8]
    assert caption_loss(logits, target, eps, drop_worst_ratio=0.2).item() == pytest.approx(kept.mean().item(), rel=1e-5)


@pytest.mark.parametrize("layout", ["paper", "released"])
def test_training_forward_is_causal_over_the_caption(layout):
    """A masked position's prediction depends on the image and the tokens up to it, never on later ones."""
    model = _model(layout)
    image = torch.randn(2, 3, 32, 32)
    text = torch.randint(4, 30, (2, 8))
    text[:, 0] = 0
    with torch.no_grad():
        a = model(image=image, text=text)  # (B, 8, V)
        later = text.clone()
        later[:, 5:] = MASK
        b = model(image=image, text=later)
        other_image = model(image=torch.randn(2, 3, 32, 32), text=text)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    assert not torch.allclose(a[:, :5], other_image[:, :5])


# -- decoding -----------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["paper", "released"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_decoding_equals_recomputing_everything(layout, num_beams):
    model = _model(layout)
    image = torch.randn(3, 3, 32, 32)
    dc = _dc(num_beams)
    tokens, scores = generate(model, image, model.cfg.depth, dc, use_cache=True)
    ref_tokens, ref_scores = generate(model, image, model.cfg.depth, dc, use_cache=False)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-4)
    assert (tokens[:, 0] == 0).all() and ((tokens == 2).sum(1) == 1).all()  # <s> ... </s> once


def _slow_greedy(model, image, max_len):
    """Independent reference: one sample at a time, the whole sequence recomputed each step through
    the backbone with a mask built here, argmax at a [MASK] placed at the next position."""
    n_img = 1 + model.cfg.num_patches
    out = []
    for b in range(image.shape[0]):
        seq = [0]
        for t in range(1, max_len):
            text = torch.tensor([seq + [MASK]])
            q, k = torch.arange(n_img + text.shape[1])[:, None], torch.arange(n_img + text.shape[1])[None]
            allowed = (k < n_img) | ((q >= n_img) & (k <= q))  # to the image; causal among text
            h = model.beit3.forward_streams(image=image[b:b + 1], text=text, attn_mask=allowed, fusion=True).text
            logp = model.mlm_head(h[0, -1]).log_softmax(-1)
            logp[[0, 1, MASK]] = -math.inf  # never <s>, <pad>, [MASK]
            nxt = 2 if t == max_len - 1 else int(logp.argmax())
            seq.append(nxt)
            if nxt == 2:
                break
        out.append(seq)
    return out


@pytest.mark.parametrize("layout", ["paper", "released"])
def test_greedy_equals_an_independent_slow_reference(layout):
    model = _model(layout, seed=3)
    image = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = _slow_greedy(model, image, max_len=9)
    tokens, _ = generate(model, image, model.cfg.depth, _dc(1), use_cache=True)
    for row, seq in zip(tokens.tolist(), ref):
        assert row[:len(seq)] == seq and all(x == 1 for x in row[len(seq):])
    assert any(len(s) > 2 for s in ref)  # real captions, not an immediate </s>


def test_batched_beams_equal_one_sample_at_a_time():
    model = _model("paper", seed=1)
    image = torch.randn(3, 3, 32, 32)
    tokens, scores = generate(model, image, model.cfg.depth, _dc(3))
    for i in range(3):
        t, s = generate(model, image[i:i + 1], model.cfg.depth, _dc(3))
        assert torch.equal(t[0], tokens[i])
        torch.testing.assert_close(s[0], scores[i], atol=1e-5, rtol=1e-5)


class MarkovDecoder:
    """log p(next | last token) from a fixed table: beam search against exhaustive search."""

    def __init__(self, table, batch, beams):
        self.table, self.batch, self.beams = table, batch, beams

    def first(self):
        return self.table[:, 0].repeat_interleave(self.beams, dim=0)  # (B*K, V) after <s>

    def next(self, tokens, beam_idx):
        last = tokens[:, -1]
        b = torch.arange(tokens.shape[0]) // self.beams
        return self.table[b, last]


def _exhaustive_best(table, words, max_len, lp):
    best, best_seq = -math.inf, None
    for n in range(0, max_len - 1):  # n words, then </s> at position n + 1 <= max_len - 1
        for seq in itertools.product(words, repeat=n):
            full = [0, *seq, 2]
            s = sum(table[full[i], full[i + 1]].item() for i in range(len(full) - 1))
            score = s / len(full) ** lp
            if score > best:
                best, best_seq = score, full
    return best, best_seq


def test_wide_beam_search_finds_the_exhaustive_optimum():
    """With as many beams as prefixes, beam search (its early stop included) is exact."""
    torch.manual_seed(0)
    vocab, words, max_len, lp = 7, [3, 4, 5], 6, 0.6
    tables = torch.randn(5, vocab, vocab).mul(2).log_softmax(-1)  # 5 samples, p(next | last)
    dc = DecodeConfig(num_beams=27, max_len=max_len, length_penalty=lp, mask_id=6)
    table_b = tables.clone()
    table_b[:, :, [0, 1, 6]] = -math.inf
    tokens, scores = beam_search(MarkovDecoder(table_b, 5, 27), 5, dc)
    for i in range(5):
        best, seq = _exhaustive_best(tables[i], words, max_len, lp)
        assert scores[i].item() == pytest.approx(best, rel=1e-5)
        assert tokens[i, :len(seq)].tolist() == seq


def test_cache_holds_only_real_tokens():
    model = _model("released")
    image = torch.randn(2, 3, 32, 32)
    dec = CachedDecoder(model, image, model.cfg.depth, _dc(3))
    dec.first()
    n_img = 1 + model.cfg.num_patches
    assert dec.cache[0]["k"].shape == (6, 2, n_img + 1, 32)  # (B*K, H, image + <s>, hd); [MASK] dropped
    tokens = torch.tensor([[0, 5]] * 6)
    dec.next(tokens, torch.arange(6))
    assert dec.cache[-1]["v"].shape[2] == n_img + 2
    full = FullDecoder(model, image, _dc(3))
    torch.testing.assert_close(dec.next(torch.tensor([[0, 5, 7]] * 6), torch.arange(6)),
                               full.next(torch.tensor([[0, 5, 7]] * 6), None), atol=1e-5, rtol=1e-4)
