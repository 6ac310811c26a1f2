"""Captioning: UniLM masking, the captioning loss, and batched beam search with the KV cache."""
import itertools
import math

import pytest
import torch

from beit3 import BEiT3Config
from beit3.jobs.finetune.captioning import caption_loss, mask_caption
from beit3.model.generation import CachedDecoder, DecodeConfig, FullDecoder, beam_search, generate
from beit3.model.heads import CaptioningModel

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


def _logp_at_mask(model, image, seq):
    """log p of the token after ``seq`` (at a [MASK] placed after it), the whole sequence recomputed
    through the backbone with a captioning mask built here."""
    n_img = 1 + model.cfg.num_patches
    text = torch.tensor([seq + [MASK]])
    q, k = torch.arange(n_img + text.shape[1])[:, None], torch.arange(n_img + text.shape[1])[None]
    allowed = (k < n_img) | ((q >= n_img) & (k <= q))  # to the image; causal among text
    h = model.beit3.forward_streams(image=image, text=text, attn_mask=allowed, fusion=True).text
    return model.mlm_head(h[0, -1]).log_softmax(-1)


def _unilm_eval_batch(logp_fn, num_beams, max_len, length_penalty):
    """Independent reference: unilm/beit3 ``CaptioningHandler.eval_batch`` with ``utils.BeamHypotheses``
    (one kept hypothesis, ``early_stopping=False``) for one sample, ported loop for loop; no KV
    cache. ``logp_fn(tokens)``: (V,) log p of the next token. Returns unilm's decoded row, the
    hypothesis (whose last slot is the [MASK] placeholder unilm never overwrites) then </s>, and its score."""
    K, topn = num_beams, 3
    seqs, beam_scores = [[0]] * K, [0.0] + [-1e9] * (K - 1)
    hyps, worst = [], 1e9  # BeamHypotheses(n_hyp=1, max_len, length_penalty, early_stopping=False)
    cur_len = 2
    while cur_len <= max_len:
        scores = torch.stack([logp_fn(s) + b for s, b in zip(seqs, beam_scores)])
        vocab = scores.shape[1]
        scores = scores.view(-1)
        next_scores, next_words = torch.topk(scores, topn * K)
        if hyps and worst >= next_scores.max().item() / (max_len - 1) ** length_penalty:  # is_done
            break
        next_beam = []
        for idx, score in zip(next_words.tolist(), next_scores.tolist()):
            beam_id, word_id = divmod(idx, vocab)
            if (word_id == 2 and cur_len + 1 <= max_len) or cur_len + 1 == max_len:
                hyp = seqs[beam_id][:cur_len - 1] + [MASK]  # decoding_results[..., :cur_len]
                s = score / len(hyp) ** length_penalty
                if not hyps or s > worst:  # BeamHypotheses.add with n_hyp = 1
                    hyps, worst = [(s, hyp)], s
            else:
                next_beam.append((score, word_id, beam_id))
            if len(next_beam) == K:
                break
        if cur_len + 1 == max_len:
            break  # unilm runs one more step over padded beams; it adds nothing
        seqs = [seqs[b] + [w] for _, w, b in next_beam]
        beam_scores = [s for s, _, _ in next_beam]
        cur_len += 1
    score, hyp = hyps[0]
    return hyp + [2], score


@pytest.mark.parametrize("layout,num_beams", [("paper", 1), ("released", 1), ("paper", 3)])
def test_beam_search_equals_unilms_eval_batch(layout, num_beams):
    model = _model(layout, seed=3)
    image = torch.randn(3, 3, 32, 32)
    dc = DecodeConfig(num_beams=num_beams, max_len=9, length_penalty=0.6, mask_id=MASK, ban_special=False)
    tokens, scores = generate(model, image, model.cfg.depth, dc, use_cache=True)
    lengths = []
    with torch.no_grad():
        for b in range(3):
            ref, ref_score = _unilm_eval_batch(lambda s: _logp_at_mask(model, image[b:b + 1], s), num_beams, 9, 0.6)
            assert ref[-2] == MASK  # the placeholder, which decoding skips; ours writes </s> there
            ref = ref[:-2] + [2]
            row = tokens[b].tolist()
            assert row[:len(ref)] == ref and all(x == 1 for x in row[len(ref):]), (row, ref)
            assert scores[b].item() == pytest.approx(ref_score, rel=1e-4)
            lengths.append(len(ref))
    assert max(lengths) > 3  # real captions, not an immediate </s>


def test_one_beam_is_not_greedy_as_in_unilm():
    """An </s> ranked first closes a hypothesis and the next token goes on (unilm looks at 3
    candidates per beam): here the longer caption wins after length normalisation."""
    table = torch.full((7, 7), -20.0)
    table[0, 2], table[0, 3] = math.log(0.5), math.log(0.45)  # after <s>: </s> first, then word 3
    table[3, 4], table[3, 2] = math.log(0.95), math.log(0.01)
    table[4, 2] = math.log(0.99)
    table[[5, 6], 2] = 0.0
    table = table.log_softmax(-1)
    ref, ref_score = _unilm_eval_batch(lambda s: table[s[-1]], 1, 7, 0.6)
    dc = DecodeConfig(num_beams=1, max_len=7, length_penalty=0.6, mask_id=6, ban_special=False)
    tokens, scores = beam_search(MarkovDecoder(table[None], 1, 1), 1, dc)
    assert ref[:-2] + [2] == [0, 3, 4, 2] == tokens[0, :4].tolist()  # greedy would stop at [0, 2]
    assert scores[0].item() == pytest.approx(ref_score, rel=1e-5)


def test_ban_special_keeps_specials_out():
    model = _model("paper", seed=3)
    with torch.no_grad():  # make <s>, <pad> and [MASK] the likeliest tokens everywhere
        model.mlm_head.bias[[0, 1, MASK]] = 50.0
    image = torch.randn(2, 3, 32, 32)
    tokens, _ = generate(model, image, model.cfg.depth, _dc(3))
    body = tokens[:, 1:][tokens[:, 1:] != 1]
    assert not ((body == 0) | (body == MASK)).any() and ((tokens == 2).sum(1) == 1).all()
    free, _ = generate(model, image, model.cfg.depth, DecodeConfig(num_beams=3, max_len=9, mask_id=MASK,
                                                                   ban_special=False))
    assert ((free[:, 1:] == 0) | (free[:, 1:] == MASK)).any()


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
    """unilm's hypotheses: </s> at a position p <= max_len - 3, scored over p + 1 tokens; or any
    token at position max_len - 2, scored with its log p over max_len - 1 tokens, </s> taking its place."""
    best, best_seq = -math.inf, None
    for n in range(0, max_len - 2):  # n words at positions 1..n
        for seq in itertools.product(words, repeat=n):
            full = [0, *seq]
            s = sum(table[full[i], full[i + 1]].item() for i in range(len(full) - 1))
            last = [2] if n < max_len - 3 else [*words, 2]  # what may stand at position n + 1
            for x in last:
                score = (s + table[full[-1], x].item()) / (n + 2) ** lp
                if score > best:
                    best, best_seq = score, full + [2]
    return best, best_seq


def test_wide_beam_search_finds_the_exhaustive_optimum():
    """With as many beams as prefixes, beam search (its early stop included) is exact."""
    torch.manual_seed(0)
    vocab, words, max_len, lp = 7, [3, 4, 5], 7, 0.6
    tables = torch.randn(5, vocab, vocab).mul(2).log_softmax(-1)  # 5 samples, p(next | last)
    dc = DecodeConfig(num_beams=27, max_len=max_len, length_penalty=lp, mask_id=6)
    table_b = tables.clone()
    table_b[:, :, [0, 1, 6]] = -math.inf
    tokens, scores = beam_search(MarkovDecoder(table_b, 5, 27), 5, dc)
    lengths = set()
    for i in range(5):
        best, seq = _exhaustive_best(tables[i], words, max_len, lp)
        assert scores[i].item() == pytest.approx(best, rel=1e-5)
        assert tokens[i, :len(seq)].tolist() == seq
        lengths.add(len(seq))
    assert len(lengths) > 1  # the optimum is not always the longest or the shortest caption


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
