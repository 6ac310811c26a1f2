"""Vision / text encoders: only one path's weights, and the full model's outputs for that path."""
import pytest
import torch

from beit3 import BEiT3, BEiT3Config
from beit3.weights.backbones import TextEncoder, VisionEncoder, text_encoder, vision_encoder
from beit3.weights import to_official
from beit3.model.params import count_parameters

TOL = 1e-6


def small_config(layout, **kw):
    return BEiT3Config.from_preset("tiny", layout=layout, embed_dim=64, num_heads=4, ffn_dim=128, depth=3,
                                   vl_layers=1, img_size=32, patch_size=8, vocab_size=120, **kw)


def randomized(cfg):
    model = BEiT3(cfg).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if (p.dim() == 1 and "norm" in name and name.endswith("weight")) else 0.2 * noise)
    return model


def images_and_texts(cfg, B=2, L=6):
    g = torch.Generator().manual_seed(6)
    image = torch.randn(B, 3, cfg.img_size, cfg.img_size, generator=g)
    text = torch.randint(3, cfg.vocab_size, (B, L), generator=g)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, 3:] = True
    return image, text, pad


def block_formula(cfg):
    """norm, qkv, inner norm, out proj; FFN norm, fc1, Sub-LN, fc2."""
    D, Fd = cfg.embed_dim, cfg.ffn_dim
    return (2 * D) + (3 * D * D + 3 * D) + (2 * D) + (D * D + D) + (2 * D) + (D * Fd + Fd) + (2 * Fd) + (Fd * D + D)


def vision_formula(cfg):
    D = cfg.embed_dim
    patch_embed, cls, pos, final_norm = cfg.in_chans * cfg.patch_size**2 * D + D, D, (1 + cfg.num_patches) * D, 2 * D
    return patch_embed + cls + pos + cfg.depth * block_formula(cfg) + final_norm


def test_base_vision_encoder_holds_only_the_vision_path():
    cfg = BEiT3Config.from_preset("base", layout="released")
    with torch.device("meta"):
        enc, txt, full = VisionEncoder(cfg), TextEncoder(cfg), BEiT3(cfg)
    n = sum(p.numel() for p in enc.parameters())
    assert n == vision_formula(cfg) == 85_890_816
    assert count_parameters(full)["total"] == 220_987_392
    D = cfg.embed_dim
    text_n = cfg.vocab_size * D + cfg.max_text_len * D + cfg.depth * block_formula(cfg) + 2 * D
    assert sum(p.numel() for p in txt.parameters()) == text_n == 135_092_736


@pytest.mark.parametrize("layout", ["released", "paper"])
def test_encoders_equal_the_full_model(layout):
    cfg = small_config(layout)
    model = randomized(cfg)
    image, text, pad = images_and_texts(cfg)
    venc = vision_encoder(model, out_indices=[0, 2])
    tenc = text_encoder(model, out_indices=[1])
    with torch.no_grad():
        full_v = model.forward_streams(image=image, out_layers=[0, 2])
        full_t = model.forward_streams(text=text, text_padding_mask=pad, out_layers=[1])
        v, t = venc(image), tenc(text, pad)
    assert (v.tokens - full_v.image).abs().max() <= TOL
    assert (v.pooled - full_v.image[:, 0]).abs().max() <= TOL
    h = cfg.grid_size
    for fmap, i in zip(v.features, [0, 2]):
        expected = full_v.hidden[i][0][:, 1:].transpose(1, 2).reshape(2, cfg.embed_dim, h, h)
        assert fmap.shape == (2, cfg.embed_dim, h, h)
        assert (fmap - expected).abs().max() <= TOL
    assert (t.tokens - full_t.text).abs().max() <= TOL  # every position, padding included
    assert (t.pooled - full_t.text[:, 0]).abs().max() <= TOL
    assert (t.features[0] - full_t.hidden[1][1]).abs().max() <= TOL
    n_vision = sum(p.numel() for p in venc.parameters())
    assert n_vision == vision_formula(cfg)
    qkv = venc.vit.blocks[0].attn.qkv.weight  # own copies, trainable: fine-tuning leaves the model alone
    assert qkv.requires_grad and qkv.data_ptr() != model.layers[0].attn.qkv.experts[0].weight.data_ptr()


def test_mean_pooling_and_sources_official_and_state_dict():
    cfg = small_config("released")
    model = randomized(cfg)
    image, text, pad = images_and_texts(cfg)
    official = {"model": to_official(model)}
    with torch.no_grad():
        full, full_text = model(image=image), model(text=text, text_padding_mask=pad)
        from_official = vision_encoder(official, cfg, pool="mean")(image)
        text_from_official = text_encoder(official, cfg)(text, pad)
        from_ours = vision_encoder({"model." + k: v for k, v in model.state_dict().items()}, cfg)(image)
    assert (from_official.pooled - full[:, 1:].mean(1)).abs().max() <= TOL
    assert (text_from_official.tokens - full_text).abs().max() <= TOL
    assert (from_ours.tokens - full).abs().max() <= TOL


def test_other_image_size_and_inferred_config():
    cfg = small_config("released")
    model = randomized(cfg)
    enc = vision_encoder(model.state_dict(), cfg, img_size=48)
    assert enc.vit.pos_embed.shape == (1, 1 + 36, cfg.embed_dim)
    assert torch.equal(enc.vit.pos_embed[0, 0], model.vision_embed.pos_embed[2].detach())  # CLS row kept
    out = enc(torch.randn(1, 3, 48, 48))
    assert out.tokens.shape == (1, 37, cfg.embed_dim)
    inferred = text_encoder(model.state_dict())  # sizes from the weights; heads guessed: 64 // 64 = 1
    assert (inferred.cfg.embed_dim, inferred.cfg.depth, inferred.cfg.vocab_size) == (64, 3, 120)


def test_bad_arguments_are_named():
    cfg = small_config("released")
    with pytest.raises(ValueError, match="out_indices \\[3\\]"):
        VisionEncoder(cfg, out_indices=[3])
    with pytest.raises(ValueError, match="pool='max'"):
        VisionEncoder(cfg, pool="max")


def test_each_encoder_ignores_the_other_paths_tables():
    """A vision encoder never reads the text tables, a text encoder never the patch embedding: a
    checkpoint whose text vocabulary differs from the preset's still gives its vision encoder."""
    cfg = small_config("released", max_text_positions=40)
    model = randomized(cfg)
    preset = cfg.replace(vocab_size=64000, max_text_positions=1024)
    image, text, pad = images_and_texts(cfg)
    with torch.no_grad():
        enc = vision_encoder(model.state_dict(), preset)
        assert torch.equal(enc(image).tokens, vision_encoder(model)(image).tokens)
        with pytest.raises(ValueError, match="vocab_size 120"):
            text_encoder(model.state_dict(), preset)
        other_patches = cfg.replace(patch_size=16)
        assert torch.equal(text_encoder(model.state_dict(), other_patches)(text, pad).tokens,
                           text_encoder(model)(text, pad).tokens)
