"""Model core: parameter counts, expert routing, padding, attention, masks, positions, init."""
import math

import pytest
import torch
import torch.nn.functional as F

from beit3 import BEiT3, BEiT3Config, PRESETS
from beit3.model.attention import MultiwayAttention
from beit3.model.params import count_parameters


def expected_counts(cfg: BEiT3Config) -> dict:
    """Independent formula for every component."""
    D, Fd, depth = cfg.embed_dim, cfg.ffn_dim, cfg.depth
    experts = 1 if cfg.layout == "paper" else 2
    attn = experts * (2 * D + 3 * D * D + 3 * D + 2 * D + D * D + D)
    ffn = 2 * D + D * Fd + Fd + 2 * Fd + Fd * D + D
    vl = cfg.vl_layers if cfg.layout == "paper" else 0
    emb = (cfg.vocab_size * D + cfg.in_chans * cfg.patch_size**2 * D + D + 2 * D
           + (cfg.num_patches + 3) * D + cfg.max_text_positions * D)
    return dict(vision_ffn=depth * ffn, language_ffn=depth * ffn, vl_ffn=vl * ffn,
                attention=depth * attn, embeddings=emb, final_norm=4 * D)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("layout", ["paper", "released"])
def test_parameter_counts_match_formula(preset, layout):
    cfg = BEiT3Config.from_preset(preset, layout=layout)
    with torch.device("meta"):
        counts = count_parameters(BEiT3(cfg))
    exp = expected_counts(cfg)
    for k, v in exp.items():
        assert counts[k] == v, (k, counts[k], v)
    assert counts["total"] == sum(exp.values())


def test_parameter_counts_match_official_models():
    with torch.device("meta"):
        base = count_parameters(BEiT3(BEiT3Config.from_preset("base", layout="released")))
        large = count_parameters(BEiT3(BEiT3Config.from_preset("large", layout="released")))
        giant = count_parameters(BEiT3(BEiT3Config.from_preset("giant")))
    assert base["total"] == 220_987_392  # unilm/beit3 base backbone: 220.99M
    assert round(large["total"] / 1e6, 1) == 672.7
    # Giant, paper layout (BEiT-3 paper, Table 1): 692M V-FFN, 692M L-FFN, 52M VL-FFN, 317M attention.
    assert round(giant["vision_ffn"] / 1e6) == 693 and round(giant["language_ffn"] / 1e6) == 693
    assert round(giant["vl_ffn"] / 1e6) == 52
    assert round(giant["attention"] / 1e6) == 318
    assert 1.8e9 < giant["total"] < 1.95e9


def _inputs(cfg, B=2, L=9, pad_from=6):
    image = torch.randn(B, 3, cfg.img_size, cfg.img_size)
    text = torch.randint(4, 500, (B, L))
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[-1, pad_from:] = True
    return image, text, pad


def _grad_norms(model, **inputs):
    model.zero_grad(set_to_none=True)
    model(**inputs).square().mean().backward()
    out = {}
    for name, p in model.named_parameters():
        out[name] = 0.0 if p.grad is None else p.grad.abs().sum().item()
    return out


def _touched(grads, pattern):
    return [n for n, g in grads.items() if pattern in n and g > 0]


@pytest.mark.parametrize("layout", ["paper", "released"])
def test_routing_gives_gradients_to_exactly_the_experts_used(layout):
    cfg = BEiT3Config.from_preset("tiny", layout=layout, depth=3, vl_layers=1)
    model = BEiT3(cfg)
    image, text, pad = _inputs(cfg)
    vl = cfg.first_vl_layer

    g = _grad_norms(model, image=image)
    assert _touched(g, ".ffn.A.") and not _touched(g, ".ffn.B.") and not _touched(g, "ffn_vl")
    assert not _touched(g, "text_embed") and not _touched(g, "norm.B")
    if layout == "released":
        assert _touched(g, ".attn.qkv.A") and not _touched(g, ".attn.qkv.B")

    g = _grad_norms(model, text=text, text_padding_mask=pad)
    assert _touched(g, ".ffn.B.") and not _touched(g, ".ffn.A.") and not _touched(g, "ffn_vl")
    assert not _touched(g, "vision_embed") and not _touched(g, "norm.A")

    g = _grad_norms(model, image=image, text=text, text_padding_mask=pad)
    for i in range(cfg.depth):
        uses_vl = layout == "paper" and i >= vl
        assert bool(_touched(g, f"layers.{i}.ffn_vl.")) == uses_vl
        assert bool(_touched(g, f"layers.{i}.ffn.A.")) == (not uses_vl)
        assert bool(_touched(g, f"layers.{i}.ffn.B.")) == (not uses_vl)
    if layout == "paper":
        assert vl == 2 and _touched(g, "layers.2.ffn_vl.fc1")


@pytest.mark.parametrize("layout", ["paper", "released"])
def test_padding_does_not_change_real_tokens(layout):
    cfg = BEiT3Config.from_preset("tiny", layout=layout)
    model = BEiT3(cfg).eval()
    image, text, _ = _inputs(cfg, B=2, L=6)
    extra = torch.full((2, 5), 1)
    padded = torch.cat([text, extra], 1)
    pad = torch.zeros_like(padded, dtype=torch.bool)
    pad[:, 6:] = True
    with torch.no_grad():
        a = model(text=text)
        b = model(text=padded, text_padding_mask=pad)
        torch.testing.assert_close(b[:, :6], a, atol=1e-5, rtol=1e-5)
        fa = model(image=image, text=text)
        fb = model(image=image, text=padded, text_padding_mask=pad)
        n = 1 + cfg.num_patches + 6
        torch.testing.assert_close(fb[:, :n], fa, atol=1e-5, rtol=1e-5)


def test_sdpa_attention_equals_float64_reference():
    torch.manual_seed(1)
    D, H, B, L = 64, 4, 3, 11
    attn = MultiwayAttention(D, H, shared=False).double().eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    img, txt = torch.randn(B, 4, D, dtype=torch.float64), torch.randn(B, L - 4, D, dtype=torch.float64)
    mask = torch.rand(B, 1, L, L) > 0.3
    mask[..., 0] = True  # every query keeps at least one key
    out = attn((img, txt), mask)

    def ref():
        a, b = attn.norm.A(img), attn.norm.B(txt)
        qkv = torch.cat([attn.qkv.A(a), attn.qkv.B(b)], 1).view(B, L, 3, H, D // H)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        s = q @ k.transpose(-1, -2) / math.sqrt(D // H)
        s = s.masked_fill(~mask, float("-inf")).softmax(-1)
        o = (s @ v).transpose(1, 2).reshape(B, L, D)
        return attn.proj.A(attn.inner_norm.A(o[:, :4])), attn.proj.B(attn.inner_norm.B(o[:, 4:]))

    for x, y in zip(out, ref()):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-10)


def test_causal_fusion_mask_hides_future_text():
    cfg = BEiT3Config.from_preset("tiny")
    model = BEiT3(cfg).eval()
    image, text, _ = _inputs(cfg, B=1, L=8)
    Li, Lt = 1 + cfg.num_patches, 8
    allowed = torch.ones(Li + Lt, Li + Lt, dtype=torch.bool)
    allowed[:Li, Li:] = False  # image never sees text
    allowed[Li:, Li:] = torch.ones(Lt, Lt).tril().bool()  # causal text
    with torch.no_grad():
        a = model(image=image, text=text, attn_mask=allowed)
        for t in range(Lt - 1):
            changed = text.clone()
            changed[0, t + 1:] = torch.randint(4, 500, (Lt - t - 1,))
            b = model(image=image, text=changed, attn_mask=allowed)
            torch.testing.assert_close(b[:, :Li + t + 1], a[:, :Li + t + 1], atol=1e-5, rtol=1e-5)
            assert (b[:, Li + t + 1:] - a[:, Li + t + 1:]).abs().max() > 1e-3


def test_position_table_interpolates_for_larger_images():
    small = BEiT3(BEiT3Config.from_preset("tiny", img_size=32))
    big = BEiT3(BEiT3Config.from_preset("tiny", img_size=64))
    big.load_state_dict(small.state_dict())
    ps, pb = small.vision_embed.pos_embed.detach(), big.vision_embed.pos_embed.detach()
    assert pb.shape == (3 + 64, 192) and ps.shape == (3 + 16, 192)
    torch.testing.assert_close(pb[:3], ps[:3])  # 2 unused rows + CLS untouched
    grid = ps[3:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    exp = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(pb[3:], exp.permute(0, 2, 3, 1).reshape(64, -1))
    assert big(image=torch.randn(1, 3, 64, 64)).shape == (1, 65, 192)


def test_initialisation():
    cfg = BEiT3Config.from_preset("tiny", depth=2)
    model = BEiT3(cfg)
    w = model.layers[0].ffn.A.fc1.weight
    std = cfg.init_std  # 0.04 for tiny, 0.02 (unilm's) for the other presets
    assert abs(w.std().item() - std * 0.5396) < 0.03 * std and w.abs().max() <= std  # unilm: cut at +-std
    assert model.layers[0].ffn.A.fc1.bias.abs().sum() == 0
    ln = model.layers[0].attn.norm.shared
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    torch.manual_seed(0)
    plain = BEiT3(cfg)
    torch.manual_seed(0)
    scaled = BEiT3(cfg.replace(subln_init_scale=True))
    s = math.sqrt(math.log(2 * cfg.depth))
    for name in ["layers.1.ffn.B.fc2.weight", "layers.0.attn.proj.shared.weight"]:
        torch.testing.assert_close(scaled.get_parameter(name), plain.get_parameter(name) * s)
    qs, qp = scaled.layers[0].attn.qkv.shared.weight, plain.layers[0].attn.qkv.shared.weight
    D = cfg.embed_dim
    torch.testing.assert_close(qs[:2 * D], qp[:2 * D])  # q, k unscaled
    torch.testing.assert_close(qs[2 * D:], qp[2 * D:] * s)  # v scaled


def test_activation_checkpointing_matches_plain_backward():
    cfg = BEiT3Config.from_preset("tiny", drop_path_rate=0.1)
    model = BEiT3(cfg).train()
    image, text, pad = _inputs(cfg)
    torch.manual_seed(3)
    out = model(image=image, text=text, text_padding_mask=pad)
    out.square().mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True, every=1)
    torch.manual_seed(3)
    out2 = model(image=image, text=text, text_padding_mask=pad)
    out2.square().mean().backward()
    torch.testing.assert_close(out2, out)
    for n, g in ref.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, atol=1e-6, rtol=1e-5)


def test_drop_path_drops_both_streams_of_a_sample_together():
    # Linear schedule over depth: layer 0 has rate 0, layer 1 (the last) the full 0.5.
    cfg = BEiT3Config.from_preset("tiny", depth=2, vl_layers=0, drop_path_rate=0.5)
    model = BEiT3(cfg).train()
    assert model.layers[0].drop_path == 0.0 and model.layers[1].drop_path == 0.5
    image, text, _ = _inputs(cfg, B=64)
    torch.manual_seed(0)
    hidden = model.forward_streams(image=image, text=text, out_layers=[0, 1]).hidden
    out, (emb_i, emb_t) = hidden[1], hidden[0]
    # A sample whose two residual branches were both dropped equals its embedding in both streams.
    same_i = (out[0] - emb_i).abs().flatten(1).amax(1) < 1e-6
    same_t = (out[1] - emb_t).abs().flatten(1).amax(1) < 1e-6
    assert same_i.any()  # p(both dropped) = 0.25 at rate 0.5
    assert torch.equal(same_i, same_t)


def test_compile_traces_without_graph_breaks():
    cfg = BEiT3Config.from_preset("tiny", depth=2)
    model = BEiT3(cfg).eval()
    image, text, pad = _inputs(cfg)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(image=image, text=text, text_padding_mask=pad),
                                   model(image=image, text=text, text_padding_mask=pad))


def test_bad_inputs_fail_with_clear_errors():
    cfg = BEiT3Config.from_preset("tiny")
    model = BEiT3(cfg)
    with pytest.raises(ValueError, match=r"expected \(B, 3, 64, 64\)"):
        model(image=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"text must be \(B, L\) integer ids"):
        model(text=torch.tensor([[0.5, 3.0]]))
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        BEiT3Config.from_preset("huge")
    with pytest.raises(TypeError, match="no field"):
        BEiT3Config.from_preset("tiny", emb_dim=3)
    with pytest.raises(ValueError, match="layout"):
        BEiT3Config.from_preset("tiny", layout="other")


def test_config_from_dict_round_trips_and_names_unknown_keys():
    cfg = BEiT3Config.from_preset("base", layout="released")
    assert BEiT3Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(TypeError, match=r"no field\(s\) \['depht'\]; known fields: .*'depth'"):
        BEiT3Config.from_dict({**cfg.to_dict(), "depht": 3})
